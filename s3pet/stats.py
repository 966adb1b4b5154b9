"""Paired comparisons of two methods over (task, seed), with a bootstrap interval.

Two methods run with the same seeds on the same tasks form pairs: same seed, same split, same
data order. The statistic is the difference of their averages over tasks (each task weighs the
same, however many seeds it has), which is the mean over tasks of the mean paired difference
per task. Its 95% interval comes from a stratified bootstrap: seeds are resampled with
replacement within each task, so that a task with 5 seeds and one with 3 keep their shares.
A task with a single pair contributes no variance, so an interval over such tasks is too
narrow: ``min_pairs`` says so, and a report should not call such a difference significant.
"""

from __future__ import annotations

import random
from typing import NamedTuple, Sequence


class Paired(NamedTuple):
    """The paired difference ``a - b`` of two methods' task averages."""

    mean: float  # difference of the task averages
    low: float  # 2.5th percentile of the bootstrap
    high: float  # 97.5th percentile
    wins: int  # pairs where a scored higher
    losses: int
    ties: int
    pairs: int
    tasks: int
    min_pairs: int  # the fewest pairs of any task: with 1, that task adds no variance and the interval is too narrow


def pair_up(a: dict[tuple[str, int], float], b: dict[tuple[str, int], float]) -> dict[str, list[float]]:
    """Per task, the differences a - b over the seeds both methods ran."""
    out: dict[str, list[float]] = {}
    for key in sorted(set(a) & set(b)):
        out.setdefault(key[0], []).append(a[key] - b[key])
    return out


def paired_difference(diffs: dict[str, Sequence[float]], n_boot: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> Paired:
    """Mean over tasks of the mean difference per task, with a stratified bootstrap interval.

    ``diffs`` maps a task to its per-seed differences. Raises ValueError when no task has a pair.
    """
    tasks = {t: list(d) for t, d in diffs.items() if len(d)}
    if not tasks:
        raise ValueError("no paired runs to compare")
    flat = [x for d in tasks.values() for x in d]
    point = sum(sum(d) / len(d) for d in tasks.values()) / len(tasks)
    rng = random.Random(seed)
    boots = []
    for _ in range(n_boot):
        tot = 0.0
        for d in tasks.values():
            k = len(d)
            tot += sum(d[rng.randrange(k)] for _ in range(k)) / k
        boots.append(tot / len(tasks))
    boots.sort()
    alpha = (1 - level) / 2
    lo = boots[int(alpha * (n_boot - 1))]
    hi = boots[int(round((1 - alpha) * (n_boot - 1)))]
    wins = sum(x > 0 for x in flat)
    losses = sum(x < 0 for x in flat)
    return Paired(point, lo, hi, wins, losses, len(flat) - wins - losses, len(flat), len(tasks),
                  min(len(d) for d in tasks.values()))
