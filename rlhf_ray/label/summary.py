"""What the labels say: judgements per annotator, agreement where annotators judged the same item, and the A/B
win rate with a confidence interval. Pure functions over log records (`store.read_log`); only the latest
judgement of each (annotator, item) counts, earlier ones are counted as changes.

Agreement, per pair of annotators over the items both judged:
- pairwise, ab: the share of identical verdicts (the same response preferred, or both "tie", or both "both
  bad") and Cohen's kappa (Cohen 1960): that agreement corrected for what two annotators with the same label
  frequencies would reach by chance;
- rating: Spearman's rho between their scores of the same responses, and the share of identical scores;
- ranking: the mean over items of Spearman's rho between their two rankings, and the share of identical ones.
`overall` pools every annotator pair on every item judged more than once.

A/B: each latest judgement is one comparison. The win rate of A over B counts a tie or "both bad" as half a
win (`ab.ties=half`; they stay in n) or leaves them out (`exclude`). Its 95% interval is Wilson's score
interval (Wilson 1927), which stays within [0, 1] and holds up at small n and rates near 0 or 1, where the
normal approximation does not. Judgements of one item by several annotators are not independent; the
interval treats them as if they were.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from typing import Any, Optional

from rlhf_ray.algorithms.metrics import spearman
from rlhf_ray.label.judgements import ab_outcome
from rlhf_ray.label.store import latest_by_key

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / n`; (0, 1) when n is 0. Successes may be
    fractional (ties counted as half a win)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int
    both_bad: int
    n: int
    rate: Optional[float]
    low: float
    high: float
    ties_counted: str


def win_rate(outcomes: Sequence[str], ties: str = "half") -> WinRate:
    """Win rate of A from outcomes "a", "b", "tie", "both_bad", with its Wilson 95% interval."""
    count = Counter(outcomes)
    unknown = set(count) - {"a", "b", "tie", "both_bad"}
    if unknown or ties not in ("half", "exclude"):
        raise ValueError(f"win_rate: outcomes must be a, b, tie or both_bad and ties half or exclude; got "
                         f"{sorted(unknown)}, {ties!r}")
    draws = count["tie"] + count["both_bad"]
    if ties == "half":
        n, successes = count["a"] + count["b"] + draws, count["a"] + 0.5 * draws
    else:
        n, successes = count["a"] + count["b"], float(count["a"])
    low, high = wilson_interval(successes, n)
    return WinRate(count["a"], count["b"], count["tie"], count["both_bad"], n, successes / n if n else None, low,
                   high, ties)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """Cohen's kappa of two annotators' labels of the same items, (p_o - p_e) / (1 - p_e). NaN when chance
    agreement is 1 (both gave one and the same label throughout: nothing to correct for)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa: needs two equally long non-empty label lists, got {len(a)} and {len(b)}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    chance = sum(count_a[c] * count_b[c] for c in count_a) / (n * n)
    return float("nan") if chance >= 1.0 else (observed - chance) / (1.0 - chance)


def _verdict(record: dict[str, Any]) -> str:
    """Which candidate (by original index) won, or tie / both_bad."""
    return record["verdict"] if record["preferred"] is None else f"response {record['preferred']}"


def _ranks(ranking: Sequence[int]) -> list[int]:
    """Position of each candidate in a best-first ranking."""
    ranks = [0] * len(ranking)
    for position, candidate in enumerate(ranking):
        ranks[candidate] = position
    return ranks


def _clean(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isnan(x) else round(x, 4)


def pair_agreement(mode: str, first: Sequence[dict[str, Any]], second: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement of two annotators' judgements of the same items (`first[i]`, `second[i]`: one item)."""
    out: dict[str, Any] = {"items": len(first)}
    if mode in ("pairwise", "ab"):
        a, b = [_verdict(r) for r in first], [_verdict(r) for r in second]
        out.update(agreement=_clean(sum(x == y for x, y in zip(a, b)) / len(a)), kappa=_clean(cohen_kappa(a, b)))
    elif mode == "rating":
        a = [s for r in first for s in r["scores"]]
        b = [s for r in second for s in r["scores"]]
        out.update(agreement=_clean(sum(x == y for x, y in zip(a, b)) / len(a)), spearman=_clean(spearman(a, b)),
                   mean_abs_difference=_clean(sum(abs(x - y) for x, y in zip(a, b)) / len(a)))
    else:
        rhos = [spearman(_ranks(x["ranking"]), _ranks(y["ranking"])) for x, y in zip(first, second)]
        same = sum(x["ranking"] == y["ranking"] for x, y in zip(first, second))
        out.update(agreement=_clean(same / len(first)), spearman=_clean(sum(rhos) / len(rhos)))
    return out


def agreement(mode: str, latest: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Agreement between annotators on the items two or more of them judged: per pair of annotators, and
    `overall` over all pairs of judgements of the same item."""
    by_item: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for record in latest:
        by_item[record["item_id"]][record["annotator"]] = record
    shared = {item: judged for item, judged in by_item.items() if len(judged) >= 2}
    pairs: dict[tuple[str, str], tuple[list, list]] = defaultdict(lambda: ([], []))
    for judged in shared.values():
        for x, y in combinations(sorted(judged), 2):
            pairs[(x, y)][0].append(judged[x])
            pairs[(x, y)][1].append(judged[y])
    result: dict[str, Any] = {"items_judged_twice_or_more": len(shared), "pairs": {}}
    if pairs:
        every_first = [r for first, _ in pairs.values() for r in first]
        every_second = [r for _, second in pairs.values() for r in second]
        result["overall"] = pair_agreement(mode, every_first, every_second)
        result["pairs"] = {f"{x} / {y}": pair_agreement(mode, *pairs[(x, y)]) for x, y in sorted(pairs)}
    return result


def annotator_counts(mode: str, records: Sequence[dict[str, Any]],
                     latest: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per annotator: items judged, answers changed later, and (pairwise, ab) ties and "both bad"."""
    logged = Counter(r["annotator"] for r in records)
    out: dict[str, dict[str, int]] = {}
    for name in sorted(logged):
        mine = [r for r in latest if r["annotator"] == name]
        counts = {"judged": len(mine), "changed": logged[name] - len(mine)}
        if mode in ("pairwise", "ab"):
            counts.update(tie=sum(r["verdict"] == "tie" for r in mine),
                          both_bad=sum(r["verdict"] == "both_bad" for r in mine))
        out[name] = counts
    return out


def summarize(records: Sequence[dict[str, Any]], mode: str, name_a: str = "A", name_b: str = "B",
              ties: str = "half") -> dict[str, Any]:
    """Counts, agreement and (ab) the win rate of A over B, from every logged record in log order."""
    latest = list(latest_by_key([r for r in records if r["mode"] == mode]).values())
    summary: dict[str, Any] = {"mode": mode, "judgements_logged": len(records), "judgements": len(latest),
                               "items_judged": len({r["item_id"] for r in latest}),
                               "annotators": annotator_counts(mode, records, latest),
                               "agreement": agreement(mode, latest)}
    if mode == "ab":
        rate = win_rate([ab_outcome(r) for r in latest], ties)
        summary["ab"] = {"a": name_a, "b": name_b, **asdict(rate), "rate": _clean(rate.rate),
                         "low": _clean(rate.low), "high": _clean(rate.high)}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as text for the terminal."""
    lines = [f"{summary['mode']} labels: {summary['judgements']} judgements of {summary['items_judged']} items "
             f"({summary['judgements_logged']} logged, counting changed answers)", "", "per annotator:"]
    for name, counts in summary["annotators"].items():
        lines.append(f"  {name:<20} " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()))
    agree = summary["agreement"]
    lines += ["", f"agreement on {agree['items_judged_twice_or_more']} items judged by two or more annotators:"]
    rows = {"overall": agree["overall"], **agree["pairs"]} if "overall" in agree else {}
    for name, stats in rows.items():
        lines.append(f"  {name:<20} " + ", ".join(f"{k.replace('_', ' ')} {'n/a' if v is None else v}"
                                                  for k, v in stats.items()))
    if "ab" in summary:
        ab = summary["ab"]
        how = ("ties and both-bad count as half a win" if ab["ties_counted"] == "half" else
               "ties and both-bad left out")
        rate = "n/a" if ab["rate"] is None else f"{ab['rate']:.1%} (95% CI {ab['low']:.1%} - {ab['high']:.1%})"
        lines += ["", f"A/B: {ab['a']} wins {ab['wins']}, {ab['b']} wins {ab['losses']}, ties {ab['ties']}, "
                      f"both bad {ab['both_bad']}",
                  f"win rate of {ab['a']} over {ab['b']}: {rate}, n = {ab['n']}; {how} (Wilson interval)"]
    return "\n".join(lines)
