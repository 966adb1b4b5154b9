"""The ``s3pet`` command. Every S3petError becomes one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from s3pet.errors import S3petError

log = logging.getLogger("s3pet")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present
        pass


# --------------------------------------------------------------------------- space

def cmd_space(args) -> int:
    from s3pet.models import count_params, load_backbone
    from s3pet.space import discover_sites, instantiate, load_space

    backbone = load_backbone(args.model)
    space = load_space(args.space)
    specs = instantiate(space, discover_sites(backbone))
    report = space_report(specs, count_params(backbone), args.model, space.name)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_space_report(report))
    return 0


def space_report(specs, backbone_params: int, model: str, space: str) -> dict:
    """Candidates of a space on a model, with totals per kind and per layer."""
    rows, per_kind, per_layer = [], {}, {}
    for s in specs:
        n = s.n_params
        rows.append({"site": s.site.path, "stack": s.site.stack, "layer": s.site.layer, "role": s.site.role,
                     "kind": s.kind, "units": s.units, "unit_params": s.unit_params, "n_params": n})
        k = per_kind.setdefault(s.kind, {"modules": 0, "candidates": 0, "params": 0})
        k["modules"] += 1
        k["candidates"] += s.units
        k["params"] += n
        lk = f"{s.site.stack}.{s.site.layer}"
        per_layer[lk] = per_layer.get(lk, 0) + n
    total = sum(r["n_params"] for r in rows)
    return {"model": model, "space": space, "backbone_params": backbone_params, "modules": rows,
            "per_kind": per_kind, "per_layer": per_layer, "total_params": total,
            "candidates": sum(r["units"] for r in rows), "share_of_backbone": total / backbone_params}


def format_space_report(r: dict) -> str:
    lines = [f"space {r['space']} on {r['model']} ({r['backbone_params']:,} backbone parameters)", ""]
    head = f"{'site':58} {'stack':7} {'layer':>5} {'role':11} {'kind':15} {'units':>5} {'n/unit':>7} {'params':>9}"
    lines += [head, "-" * len(head)]
    for m in r["modules"]:
        lines.append(f"{m['site'][-58:]:58} {m['stack']:7} {m['layer']:>5} {m['role']:11} {m['kind']:15} "
                     f"{m['units']:>5} {m['unit_params']:>7,} {m['n_params']:>9,}")
    lines += ["", "per kind:"]
    for k, v in sorted(r["per_kind"].items()):
        lines.append(f"  {k:15} {v['modules']:>5} modules {v['candidates']:>6} candidates {v['params']:>11,} params")
    lines += ["", "per layer:"]
    for k, v in r["per_layer"].items():
        lines.append(f"  {k:12} {v:>11,} params")
    lines += ["", f"total: {r['candidates']:,} candidates, {r['total_params']:,} parameters = "
                  f"{100 * r['share_of_backbone']:.3f}% of the backbone"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3pet", description="Search where to put parameter-efficient tuning "
                                "modules under a parameter budget (S3PET).")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sp = sub.add_parser("space", help="list every candidate of a search space on a model")
    sp.add_argument("model", help="hub id, local folder, or alias (minilm, tiny-bert, tiny-t5, tiny-gpt2, tiny-llama)")
    sp.add_argument("--space", default="s3pet-m", help="s3pet-m | s3pet-l | unified | path to a space JSON")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_space)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except S3petError as e:
        print(f"s3pet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s3pet: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
