"""Transfer a structure: to another model of the same family (sites mapped by role and
relative depth), or average several searches' gate scores and re-derive one structure.

Depth mapping (``mapping``):
- ``depth`` (default): each source module goes to the target layer at the same relative depth,
  round(l * (L_t - 1) / (L_s - 1)); the module count is held, so on a deeper model the budget
  (in modules) is held and its parameter count follows the target's widths.
- ``stretch``: every target layer takes the modules of the source layer at its relative depth,
  so a 6-layer structure on a 12-layer model has twice the modules: the budget scales with depth.
Ranks are kept in both. The new structure's budget is its own parameter count, and the
provenance records the source, the mapping and whether the budget was held or scaled.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from s3pet import budget as B
from s3pet import structure as S
from s3pet.configs import MAPPINGS
from s3pet.deltas import KINDS
from s3pet.errors import ConfigError, StructureError
from s3pet.io import read_json
from s3pet.models import count_params, load_backbone
from s3pet.space import ModuleSpec, discover_sites, instantiate, load_space, shared_needs, stack_depths, total_params
from s3pet.supernet import kept_specs


def _map_layer(layer: int, src: int, dst: int) -> int:
    if layer < 0:
        return layer
    if layer >= src:  # after the blocks (final norm)
        return dst
    return int(round(layer * (dst - 1) / max(src - 1, 1)))


def map_structure(st: S.Structure, backbone: nn.Module, mapping: str = "depth") -> S.Structure:
    """Map a structure onto another model by (stack, role, relative depth); ranks kept."""
    if mapping not in MAPPINGS:
        raise ConfigError(f"mapping must be one of {', '.join(MAPPINGS)}, got {mapping!r}")
    sites = discover_sites(backbone)
    dst_depth = stack_depths(sites)
    src_depth = st.base_model.get("stacks") or {}
    by_key = {(s.stack, s.layer, s.role): s for s in sites}
    out: dict[tuple, tuple[ModuleSpec, float | None]] = {}
    for i, m in enumerate(st.modules):
        stack = m["stack"]
        if stack not in dst_depth:
            raise StructureError(f"modules[{i}] ({m['site']}): the target model has no {stack} stack")
        ls, ld = int(src_depth.get(stack, st.base_model.get("layers", 1))), dst_depth[stack]
        if mapping == "depth" or m["layer"] < 0 or m["layer"] >= ls:
            targets = [_map_layer(m["layer"], ls, ld)]
        else:
            targets = [t for t in range(ld) if _map_layer(t, ld, ls) == m["layer"]]
        for t in targets:
            site = by_key.get((stack, t, m["role"]))
            if site is None:
                raise StructureError(f"modules[{i}] ({m['kind']} at {m['site']}): the target model has no "
                                     f"{m['role']} site in {stack} layer {t}")
            kind = KINDS[m["kind"]]
            spec = ModuleSpec(site, m["kind"], kind.check_params(dict(m.get("params") or {})), int(m["rank"]))
            out[(site.path, site.role, m["kind"])] = (spec, m.get("score"))
    kept = sorted(out.values(), key=lambda t: [s.path for s in sites].index(t[0].site.path))
    n = total_params([sp for sp, _ in kept])
    bb = count_params(backbone)
    prov = {"transfer": {"from_model": st.base_model.get("name_or_path"), "mapping": mapping,
                         "budget": "held" if mapping == "depth" else "scaled",
                         "source_n_params": st.n_params}, "source_provenance": st.provenance}
    return S.from_specs(kept, backbone, st.space, B.budget_record(n, bb), prov)


def _alphas_path(run: Path) -> Path:
    for p in (run / "alphas.csv", run / "search" / "alphas.csv"):
        if p.is_file():
            return p
    raise ConfigError(f"{run}: no alphas.csv (give search run directories)")


def average_runs(runs: list[str | Path], budget: str | int, model: str | None = None) -> S.Structure:
    """Average gate probabilities over several searches of one model and space; re-derive under budget."""
    if not runs:
        raise ConfigError("give at least one search run directory")
    paths = [_alphas_path(Path(r)) for r in runs]
    configs = [read_json(p.parent / "config.json") for p in paths]
    keys = {(c["model"], c["space"]) for c in configs}
    if len(keys) != 1:
        raise ConfigError(f"runs differ in model/space: {sorted(keys)}; average searches of one model and space")
    cfg = configs[0]
    backbone = load_backbone(model or cfg["model"])
    specs = instantiate(load_space(cfg["space_spec"]), discover_sites(backbone))
    off = 0
    for sp in specs:
        sp.offset = off
        off += sp.units
    ps, alphas = [], []
    for p in paths:
        with open(p) as f:
            rows = list(csv.DictReader(f))
        if len(rows) != off:
            raise ConfigError(f"{p}: {len(rows)} candidates, expected {off} for {cfg['model']} / {cfg['space']}")
        ps.append(torch.tensor([float(r["p"]) for r in rows], dtype=torch.float64))
        alphas.append(torch.tensor([float(r["alpha"]) for r in rows], dtype=torch.float64))
    p = torch.stack(ps).mean(0)
    n = torch.tensor([sp.unit_params for sp in specs for _ in range(sp.units)], dtype=torch.float64)
    bb = count_params(backbone)
    b = B.parse_budget(budget, bb)
    # The mean logits break ties in p, as the search's own derivation does (after restarts, too).
    needs, costs = shared_needs(specs)
    keep = B.derive(p, n, b, alpha=torch.stack(alphas).mean(0), needs=needs, shared=costs)
    prov = {"average_of": [str(Path(r)) for r in runs], "tasks": sorted({c["task"] for c in configs})}
    return S.from_specs(kept_specs(specs, keep, p), backbone, load_space(cfg["space_spec"]).name,
                        B.budget_record(b, bb), prov)
