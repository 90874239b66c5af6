"""Per-token KL estimators and the KL-coefficient controllers.

Estimators follow J. Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html).
Tokens are sampled from the policy π, so with `log r = log π_ref(x) - log π(x)` each is an estimate of
`KL(π || π_ref)`:

| name | per-token value            | unbiased | always >= 0 | note                                          |
|------|----------------------------|----------|-------------|-----------------------------------------------|
| k1   | -log r                     | yes      | no          | the naive estimate; high variance             |
| k2   | ½ (log r)²                 | no       | yes         | low variance, biased when π, π_ref far apart   |
| k3   | (r - 1) - log r            | yes      | yes         | low variance; GRPO's KL-in-loss estimator      |

Padded positions are not masked here (the caller reduces with a mask); they may hold any value.

Controllers set the coefficient β of the KL penalty in `reward - β KL`:

| kind     | rule                                                                                          |
|----------|-----------------------------------------------------------------------------------------------|
| fixed    | β never changes                                                                               |
| adaptive | Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec 2.2:            |
|          | e = clip(KL / target - 1, -0.2, 0.2);  β <- β (1 + e · n_steps / horizon)                       |
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor


def _k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return logprobs - ref_logprobs


def _k2(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    return 0.5 * (logprobs - ref_logprobs) ** 2


def _k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    log_r = ref_logprobs - logprobs
    return log_r.exp() - log_r - 1


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of `KL(π || π_ref)` from tokens sampled from π (see the module table).

    Args:
        logprobs: [B, T] log π(token), the policy that sampled the tokens.
        ref_logprobs: [B, T] log π_ref(token).
        estimator: "k1" | "k2" | "k3".
    Returns:
        [B, T] estimates, unmasked.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(sorted(KL_ESTIMATORS))}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ")
    return KL_ESTIMATORS[estimator](logprobs, ref_logprobs)


class FixedKLController:
    """A constant KL coefficient. `update` is a no-op, kept so both controllers are used the same way."""

    kind = "fixed"

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to do: the coefficient is fixed."""

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self.kind, state)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller driving the measured KL towards `target` (Ziegler et al. 2019, sec 2.2).

    `horizon` is how many samples (n_steps counts samples, e.g. the rollout batch size) it takes for a
    sustained 20 % error to change β by a factor of about e^0.2.
    """

    kind = "adaptive"

    def __init__(self, init_coef: float, target: float, horizon: float):
        if init_coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {init_coef}")
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got target={target}, "
                             f"horizon={horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """β <- β (1 + clip(KL / target - 1, -0.2, 0.2) · n_steps / horizon).

        Args:
            current_kl: the mean KL (per sequence, as the penalty is summed) of the latest rollouts.
            n_steps: samples since the last update.
        """
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        # target and horizon come from the config on resume; only β is state.
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        _check_kind(self.kind, state)
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def _check_kind(kind: str, state: dict) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"KL controller state is for kind {state.get('kind')!r}, but this controller is "
                         f"{kind!r}; the config's kl controller kind changed since the checkpoint")


KL_CONTROLLERS: dict[str, Callable[..., KLController]] = {
    "fixed": lambda coef, target, horizon: FixedKLController(coef),
    "adaptive": lambda coef, target, horizon: AdaptiveKLController(coef, target, horizon),
}


def make_kl_controller(kind: str, coef: float, target: float | None = None,
                       horizon: float | None = None) -> KLController:
    """A KL controller from the config's choice.

    Args:
        kind: "fixed" | "adaptive".
        coef: the (initial) coefficient β.
        target: the KL to steer to (adaptive only).
        horizon: samples over which to steer (adaptive only).
    """
    if kind not in KL_CONTROLLERS:
        raise ValueError(f"unknown KL controller {kind!r}; valid: {', '.join(sorted(KL_CONTROLLERS))}")
    if kind == "adaptive" and (target is None or horizon is None):
        raise ValueError("the adaptive KL controller needs both target and horizon")
    return KL_CONTROLLERS[kind](coef, target, horizon)
