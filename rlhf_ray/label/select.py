"""Choosing what people label first (`select: uncertainty`): the items the reward model is least sure of.

A label changes a Bradley-Terry reward model most where `σ(r(a) - r(b))` is near 1/2, i.e. where the margin
is near 0 (uncertainty sampling, Lewis & Gale 1994); with several reward models (an ensemble: checkpoints of
differently seeded or fed runs) the std of their margins measures how much they disagree (query by
committee, Seung et al. 1992). Items are ranked most informative first, so an annotator who stops early has
labeled the pairs that teach the model most.

The ranking math is pure torch below; `score_items` loads the reward models in this process (no Ray: the
candidate set of a labeling session is small) through the RLHF reward actor's own loading and scoring, so
items are rendered and scored exactly as in reward-model training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.config_loader import ConfigError


def pair_margins(rewards: torch.Tensor) -> torch.Tensor:
    """Margins `r_i - r_j` of every pair i < j of an item's candidates.

    rewards: [..., k] (k >= 2 candidates' rewards); returns [..., k(k-1)/2], pairs in order (0,1), (0,2), ...
    """
    i, j = torch.triu_indices(rewards.shape[-1], rewards.shape[-1], offset=1)
    return rewards[..., i] - rewards[..., j]


def margin_uncertainty(margins: torch.Tensor) -> torch.Tensor:
    """Uncertainty of one reward model: `-min_p |margin_p|`, highest (0) where some pair is a coin toss.

    margins: [n, P] (n items, P pairs each); returns [n]. With k > 2 candidates the closest pair decides:
    that is the comparison the model would get wrong first.
    """
    return -margins.abs().min(dim=-1).values


def ensemble_disagreement(margins: torch.Tensor) -> torch.Tensor:
    """Disagreement of m reward models: the std over models of each pair's margin, the largest over pairs.

    margins: [m, n, P] (m >= 2 models); returns [n]. Population std (divides by m), so two models whose
    margins are +a and -a disagree by exactly a.
    """
    if margins.shape[0] < 2:
        raise ValueError(f"ensemble disagreement needs at least 2 models, got {margins.shape[0]}")
    return margins.std(dim=0, correction=0).max(dim=-1).values


def item_uncertainty(rewards: torch.Tensor) -> float:
    """How informative a label of one item is: margin uncertainty for one model, disagreement for several.

    rewards: [m, k] (m models' rewards of the item's k >= 2 candidates).
    """
    margins = pair_margins(rewards).unsqueeze(1)  # [m, 1, P]
    if rewards.shape[0] == 1:
        return float(margin_uncertainty(margins[0])[0])
    return float(ensemble_disagreement(margins)[0])


def most_uncertain_first(uncertainty: Sequence[float]) -> list[int]:
    """Item indices by decreasing uncertainty; equal values keep their file order (a stable sort)."""
    return sorted(range(len(uncertainty)), key=lambda i: -uncertainty[i])


def score_items(items: Sequence[Any], model_dirs: Sequence[str], device: str = "auto",
                micro_batch_size: int = 32) -> list[torch.Tensor]:
    """Each item's candidates scored by every reward model: a [m, k] tensor per item (m = len(model_dirs)).

    Scores are standardised with each model's `reward_stats.json` when it has one, so different models'
    margins are on a comparable scale for the ensemble's std.
    """
    import pyarrow as pa

    from rlhf_ray.config.rlhf import RewardConfig
    from rlhf_ray.label.items import prompt_messages
    from rlhf_ray.models.loading import resolve_device
    from rlhf_ray.roles.scorers import RewardActor

    messages, responses = [], []
    for item in items:
        for response in item.responses:
            messages.append(prompt_messages(item.prompt))
            responses.append(response)
    table = pa.table({"prompt_messages": messages, "response_text": responses})
    rows = list(range(len(responses)))
    per_model = []
    for i, path in enumerate(model_dirs):
        if not (Path(path) / "config.json").is_file():
            raise ConfigError(f"select_models[{i}]: {path} is not a reward-model directory (no config.json); "
                              "name the model/ directory of an `rlhf-ray rm` run")
        scorer = RewardActor(RewardConfig(model=path), resolve_device(device), micro_batch_size)
        per_model.append(torch.tensor(scorer.score(table, rows).column("score/reward_model").to_pylist()))
        del scorer
    scores = torch.stack(per_model)  # [m, total candidates]
    out, start = [], 0
    for item in items:
        out.append(scores[:, start:start + len(item.responses)])
        start += len(item.responses)
    return out


def order_by_uncertainty(items: Sequence[Any], model_dirs: Sequence[str], device: str = "auto") -> list[Any]:
    """`items` most informative first for the reward models of `model_dirs` (see the module docstring)."""
    uncertainty = [item_uncertainty(rewards) for rewards in score_items(items, model_dirs, device)]
    return [items[i] for i in most_uncertain_first(uncertainty)]
