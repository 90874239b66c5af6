"""The errors that stop a run for a fault it cannot survive (the CLI prints them as messages, exit status 3).

Kept free of heavy imports: the CLI names them before any stage (or Ray) is loaded.
"""

from __future__ import annotations


class RoleLostError(RuntimeError):
    """The run cannot go on: a learner or critic rank died, or a role kept failing past run.max_restarts."""
