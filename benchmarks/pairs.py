"""Paired differences of named method pairs over the (task, seed) both ran, from a results.json.

The quality report pairs only methods that ran every task; a search ablation that ran a few
tasks is compared here, with the same statistic (``s3pet.stats``: the difference of task
averages, a bootstrap stratified by task):

    python benchmarks/pairs.py docs/results/quality/results.json s3pet:random s3pet-warmup:s3pet
"""

from __future__ import annotations

import argparse
import sys

from s3pet.io import read_json
from s3pet.stats import pair_up, paired_difference


def scores(runs: list[dict], method: str, budget: str) -> dict[tuple[str, int], float]:
    return {(r["task"], r["seed"]): 100 * r["test"] for r in runs
            if r["method"] == method and r.get("test") is not None and r.get("budget") in (budget, "-")}


def table(runs: list[dict], pairs: list[tuple[str, str]], budget: str) -> str:
    lines = ["| A | B | tasks | pairs (fewest per task) | A - B (x100) | 95% interval | wins / losses |", "|---|---|---|---|---|---|---|"]
    for a, b in pairs:
        diffs = pair_up(scores(runs, a, budget), scores(runs, b, budget))
        if not diffs:
            lines.append(f"| `{a}` | `{b}` | – | 0 | – | – | – |")
            continue
        p = paired_difference(diffs)
        lines.append(f"| `{a}` | `{b}` | {', '.join(sorted(diffs))} | {p.pairs} ({p.min_pairs}) | {p.mean:+.1f} | "
                     f"[{p.low:+.1f}, {p.high:+.1f}] | {p.wins} / {p.losses} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results")
    ap.add_argument("pairs", nargs="+", help="A:B (method names)")
    ap.add_argument("--budget", default="0.1%")
    args = ap.parse_args(argv)
    bad = [p for p in args.pairs if p.count(":") != 1]
    if bad:
        ap.error(f"pairs are written A:B, got {', '.join(bad)}")
    print(table(read_json(args.results)["runs"], [tuple(p.split(":")) for p in args.pairs], args.budget))
    return 0


if __name__ == "__main__":
    sys.exit(main())
