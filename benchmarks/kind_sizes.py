"""The hand-designed baseline of every newer kind at a few budgets on one model: its parameters,
modules and size (what ``s3pet baseline --method KIND`` trains). Prints a markdown table and
writes JSON.

    python benchmarks/kind_sizes.py --model minilm --budgets 0.01%,0.1%,1% --out docs/results/kind_sizes.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def sizes(model: str, budgets: list[str]) -> list[dict]:
    from s3pet.baselines import KIND_METHODS, kind_specs
    from s3pet.budget import parse_budget
    from s3pet.deltas import KINDS
    from s3pet.models import load_backbone
    from s3pet.space import discover_sites, instantiate, load_space, total_params

    bb = load_backbone(model)
    n = sum(p.numel() for p in bb.parameters())
    sites = discover_sites(bb)
    rows = []
    for kind in KIND_METHODS:
        every = len([sp for sp in instantiate(load_space("unified"), sites) if sp.kind == kind])
        for b in budgets:
            limit = parse_budget(b, n)
            specs = kind_specs(kind, sites, limit)
            field = KINDS[kind].size_field
            rows.append({"kind": kind, "budget": b, "budget_params": limit, "params": total_params(specs),
                         "modules": len(specs), "sites": every, "units": sorted({sp.units for sp in specs}),
                         "size": sorted({sp.params[field] for sp in specs}) if field else None})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm")
    p.add_argument("--budgets", default="0.01%,0.1%,1%")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    rows = sizes(a.model, a.budgets.split(","))
    print("| kind | budget | params | modules / sites | units | size field |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['budget']} ({r['budget_params']:,}) | {r['params']:,} | {r['modules']} / {r['sites']} "
              f"| {'/'.join(map(str, r['units']))} | {'/'.join(map(str, r['size'])) if r['size'] else '–'} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": a.model, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
