"""Evaluation statistics as pure functions."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of `values`, ties given the mean of the ranks they span (as Spearman's rho needs)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson correlation of the average ranks. NaN if either is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ ({len(x)} vs {len(y)})")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float(np.sqrt((rx ** 2).sum() * (ry ** 2).sum()))
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def preference_metrics(kinds: Sequence[str], orders: Sequence[Sequence[int]], targets: Sequence[Sequence[float]],
                       rewards: Sequence[Sequence[float]]) -> dict[str, float]:
    """Held-out reward-model statistics.

    Args:
        kinds: per row, "pair" | "ranking" | "rating".
        orders: per row, candidate indices best first (pairs and rankings).
        targets: per row, the normalised rating (rating rows).
        rewards: per row, the model's reward for each candidate.
    Returns:
        accuracy (share of ordered pairs the model ranks the right way round, over pair and ranking rows),
        margin (mean reward of the better minus the worse candidate), spearman (rank correlation of reward
        and rating, over rating rows), and the mean/std of every reward.
    """
    correct, margins, rated, ratings = [], [], [], []
    for kind, order, target, reward in zip(kinds, orders, targets, rewards):
        if kind == "rating":
            rated.append(reward[0])
            ratings.append(target[0])
            continue
        for i in range(len(order)):
            for j in range(i + 1, len(order)):
                diff = reward[order[i]] - reward[order[j]]
                correct.append(diff > 0)
                margins.append(diff)
    every = [r for row in rewards for r in row]
    out = {"reward_mean": float(np.mean(every)), "reward_std": float(np.std(every))} if every else {}
    if correct:
        out.update(accuracy=float(np.mean(correct)), margin=float(np.mean(margins)))
    if len(rated) >= 2:
        out["spearman"] = spearman(rated, ratings)
    return out
