"""KL estimators on hand-computed values and on their defining properties; the KL controllers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.algorithms.kl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    kl_estimate,
    make_kl_controller,
)

LOG2 = math.log(2.0)
# π = 1/2, π_ref = 1/4 on the sampled token: log r = log π_ref - log π = -log 2.
LOGP = torch.log(torch.tensor([[0.5, 0.25]]))
REF = torch.log(torch.tensor([[0.25, 0.25]]))


def test_estimator_table():
    assert set(KL_ESTIMATORS) == {"k1", "k2", "k3"}


def test_k1_k2_k3_by_hand():
    torch.testing.assert_close(kl_estimate(LOGP, REF, "k1"), torch.tensor([[LOG2, 0.0]]))
    torch.testing.assert_close(kl_estimate(LOGP, REF, "k2"), torch.tensor([[0.5 * LOG2 ** 2, 0.0]]))
    # r - 1 - log r with r = 1/2
    torch.testing.assert_close(kl_estimate(LOGP, REF, "k3"), torch.tensor([[0.5 - 1.0 + LOG2, 0.0]]))


def test_k2_and_k3_are_never_negative_and_k1_can_be():
    gen = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(4, 50, generator=gen), torch.randn(4, 50, generator=gen)
    assert (kl_estimate(logp, ref, "k2") >= 0).all()
    assert (kl_estimate(logp, ref, "k3") >= 0).all()
    assert (kl_estimate(logp, ref, "k1") < 0).any()


@pytest.mark.parametrize("name", ["k1", "k3"])
def test_unbiased_estimators_average_to_the_exact_kl(name):
    """Tokens drawn from π: the mean of k1 and of k3 is KL(π || π_ref)."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (p * (p / q).log()).sum()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    estimate = kl_estimate(p.log()[tokens], q.log()[tokens], name).mean()
    assert abs(estimate.item() - exact.item()) < 0.01


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(LOGP, REF, "k4")


def test_shapes_must_match():
    with pytest.raises(ValueError, match="differ"):
        kl_estimate(LOGP, REF[:, :1], "k1")


def test_fixed_controller_never_moves():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == 0.05


def test_adaptive_controller_by_hand():
    # error clipped to +0.2: β (1 + 0.2 · 100 / 10000)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_steps=100)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    # error 6.6/6 - 1 = 0.1, unclipped
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=6.6, n_steps=100)
    assert ctl.value == pytest.approx(0.1 * 1.001)
    # error clipped to -0.2
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=0.0, n_steps=100)
    assert ctl.value == pytest.approx(0.1 * 0.998)


def test_adaptive_controller_moves_toward_the_target():
    up, down, still = (AdaptiveKLController(0.1, target=1.0, horizon=100) for _ in range(3))
    for _ in range(10):
        up.update(current_kl=2.0, n_steps=8)
        down.update(current_kl=0.5, n_steps=8)
        still.update(current_kl=1.0, n_steps=8)
    assert up.value > 0.1 > down.value > 0
    assert still.value == pytest.approx(0.1)


@pytest.mark.parametrize("make", [lambda: FixedKLController(0.2), lambda: AdaptiveKLController(0.2, 1.0, 50)])
def test_state_round_trips_through_json(make):
    ctl = make()
    ctl.update(current_kl=3.0, n_steps=10)
    state = json.loads(json.dumps(ctl.state_dict()))
    restored = make()
    restored.load_state_dict(state)
    assert restored.value == ctl.value and restored.state_dict() == ctl.state_dict()
    ctl.update(current_kl=0.1, n_steps=10)
    restored.update(current_kl=0.1, n_steps=10)
    assert restored.value == ctl.value


def test_state_of_another_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        AdaptiveKLController(0.1, 1.0, 10).load_state_dict(FixedKLController(0.1).state_dict())


def test_make_kl_controller():
    assert isinstance(make_kl_controller("fixed", 0.1), FixedKLController)
    ctl = make_kl_controller("adaptive", 0.1, target=6.0, horizon=10_000)
    assert isinstance(ctl, AdaptiveKLController) and (ctl.target, ctl.horizon) == (6.0, 10_000)
    with pytest.raises(ValueError, match="adaptive, fixed"):
        make_kl_controller("pid", 0.1)
    with pytest.raises(ValueError, match="target and horizon"):
        make_kl_controller("adaptive", 0.1)


def test_invalid_controller_settings_are_errors():
    with pytest.raises(ValueError, match=">= 0"):
        FixedKLController(-1.0)
    with pytest.raises(ValueError, match="target > 0"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
