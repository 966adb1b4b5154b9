"""Hand-designed PET structures sized to a budget, and random structures from a space.

Each builder returns the structure a practitioner would pick by hand, as large as possible
without exceeding the budget:
- ``lora``: LoRA on query and value (Hu et al.) at the largest uniform rank that fits; if even
  rank 1 does not fit on every layer, rank 1 on the top layers. Wider placements (q,k,v,o; all
  linears) are taken when they use more of the budget at rank >= 1. alpha = 2r (scaling 2),
  as peft users usually set it.
- ``lora-all``: LoRA on every attention and FFN linear at the largest uniform rank that fits
  (rank 1 on all six linears is the strongest simple placement at ~0.2%: placement beats rank);
  below rank 1 everywhere, rank 1 on as many top-layer linears as fit.
- ``adapter``: Houlsby adapters after both sublayers of every layer at the largest uniform
  bottleneck; then FFN-only (Pfeiffer); then fewer (top) layers at bottleneck 1.
- ``bitfit``: every bias; if that exceeds the budget, the most useful ones first (BitFit's
  query and FFN-input biases; top layers first).
- ``lnfit``: the scale and the bias of every norm (LN-tuning: what HF + peft users train when
  they unfreeze the LayerNorms; a bias-free RMSNorm gets one); top layers first, scale before
  bias, when the budget holds fewer.
- ``random``: candidates of a space in a seeded random order, kept greedily under the budget
  (the same derivation as the search, with random scores).
- every other kind by its name (``ia3``, ``lowrank_adapter``, ``parallel_adapter``,
  ``adapterbias``, ``kronecker``, ``sparse_lora``, ``compacter``, ``fact``, ``prefix``): that kind
  alone on every site the ``unified`` space gives it, with the space's hyper-parameters, as
  large as fits: a kind with a ``size_field`` (prefix length, Kronecker and FacT rank) grows it
  on every site; a kind of several units (bottleneck units, rank-1 components) takes the
  largest uniform count up to the space's full module; below the smallest size on every site,
  the smallest on as many top-layer sites as fit. Shared tensors (Compacter's slow weights,
  FacT's factors) are paid once.
``full`` (every weight trains) and ``lst`` (a side network beside the frozen backbone,
``s3pet.lst``) have no structure.
"""

from __future__ import annotations

import torch
from torch import nn

from s3pet import budget as B
from s3pet import structure as S
from s3pet.errors import BudgetError, ConfigError
from s3pet.space import ModuleSpec, Site, discover_sites, instantiate, load_space, shared_needs, total_params
from s3pet.deltas import KINDS
from s3pet.supernet import kept_specs

#: kinds with a baseline of their own name (kind_specs); lora, adapter, bitfit and lnfit have
#: hand-written ones above
KIND_METHODS = ("ia3", "lowrank_adapter", "parallel_adapter", "adapterbias", "kronecker", "sparse_lora",
                "compacter", "fact", "prefix")
METHODS = ("full", "lora", "lora-all", "adapter", "bitfit", "lnfit", "random", "lst") + KIND_METHODS
COMPARE = ("random", "bitfit")  # what `s3pet run --compare` trains beside the searched structure


def _spec(site: Site, kind: str, units: int, **params) -> ModuleSpec:
    return ModuleSpec(site, kind, KINDS[kind].check_params(params), units)


def _total(specs) -> int:
    return total_params(specs)


def _top_first(sites: list[Site]) -> list[Site]:
    return sorted(sites, key=lambda s: (-s.layer, s.stack))


def _uniform(sites: list[Site], kind: str, budget: int, **params) -> list[ModuleSpec]:
    """Largest uniform size on all ``sites``; else size 1 on as many top-layer sites as fit."""
    if not sites:
        return []
    per_unit = sum(_spec(s, kind, 1, **params).unit_params for s in sites)
    units = budget // per_unit
    if units >= 1:
        return [_spec(s, kind, int(units), **params) for s in sites]
    chosen, used = [], 0
    for s in _top_first(sites):
        sp = _spec(s, kind, 1, **params)
        if used + sp.n_params <= budget:
            chosen.append(sp)
            used += sp.n_params
    return chosen



def _lora_alpha_2r(specs: list[ModuleSpec]) -> list[ModuleSpec]:
    """alpha = 2r on every module (scaling 2, whatever the rank), as peft users set it."""
    return [_spec(s.site, "lora", s.units, alpha=2.0 * s.units) for s in specs]


def _linears(sites: list[Site]) -> list[Site]:
    return [s for s in sites if s.host == "linear" and s.role != "other"]


def lora_specs(sites: list[Site], budget: int) -> list[ModuleSpec]:
    lin = [s for s in sites if s.host == "linear"]
    qv = [s for s in lin if s.role in ("attn.q", "attn.v", "attn.qkv")]
    attn = [s for s in lin if s.role.startswith("attn.") and s.role != "attn.other"]
    options = []
    for group in (qv, attn, _linears(sites)):
        sp = _uniform(group, "lora", budget)
        if sp and all(x.units >= 1 for x in sp) and len(sp) == len(group):
            options.append(sp)
    if not options:  # not even rank 1 on every q/v: rank 1 on the top layers
        options.append(_uniform(qv or lin, "lora", budget))
    # Prefer the conventional q,v placement unless a wider one fills clearly more (>10%) of the budget.
    best = options[0]
    for o in options[1:]:
        if _total(o) > 1.1 * _total(best):
            best = o
    return _lora_alpha_2r(best)


def lora_all_specs(sites: list[Site], budget: int) -> list[ModuleSpec]:
    return _order(_lora_alpha_2r(_uniform(_linears(sites), "lora", budget)), sites)


def adapter_specs(sites: list[Site], budget: int) -> list[ModuleSpec]:
    blocks = [s for s in sites if s.host == "block"]
    both = blocks
    ffn = [s for s in blocks if s.role == "ffn.block"]
    for group in (both, ffn):
        per = sum(_spec(s, "adapter", 1).unit_params for s in group)
        if group and budget // per >= 1:
            return [_spec(s, "adapter", int(budget // per)) for s in group]
    return _uniform(ffn or blocks, "adapter", budget)


def _fill(specs: list[ModuleSpec], budget: int) -> list[ModuleSpec]:
    out, used = [], 0
    for sp in specs:
        if used + sp.n_params <= budget:
            out.append(sp)
            used += sp.n_params
    return out


def bitfit_specs(sites: list[Site], budget: int) -> list[ModuleSpec]:
    pri = {"attn.q": 0, "ffn.in": 1}
    cands = [s for s in sites if s.host in ("linear", "norm")]
    cands.sort(key=lambda s: (pri.get(s.role, 2), -s.layer))
    return _order(_fill([_spec(s, "bitfit", 1) for s in cands], budget), sites)


def lnfit_specs(sites: list[Site], budget: int) -> list[ModuleSpec]:
    cands = _top_first([s for s in sites if s.host == "norm"])
    return _order(_fill([_spec(s, k, 1) for s in cands for k in ("lnfit", "bitfit")], budget), sites)


def _order(specs: list[ModuleSpec], sites: list[Site]) -> list[ModuleSpec]:
    pos = {(s.path, s.role): i for i, s in enumerate(sites)}
    return sorted(specs, key=lambda m: pos[(m.site.path, m.site.role)])


def _sized(sp: ModuleSpec, units: int, **params) -> ModuleSpec:
    """``sp`` (a full module of the space) with its first ``units`` units and ``params`` changed."""
    kind = KINDS[sp.kind]
    full = kind.check_params({**sp.params, **params})
    units = min(units, kind.max_units(sp.site, full))
    kept = kind.first_units(sp.site, full, units)
    return ModuleSpec(sp.site, sp.kind, kind.check_params(kind.derived_params(full, kept)), units)


def kind_specs(kind: str, sites: list[Site], budget: int, space: str = "unified") -> list[ModuleSpec]:
    """The hand-designed baseline of one kind: alone on every site ``space`` gives it, as large
    as ``budget`` allows (module docstring)."""
    base = [sp for sp in instantiate(load_space(space), sites) if sp.kind == kind]
    if not base:
        raise BudgetError(f"the {space} space puts no {kind} module on this model")
    field = KINDS[kind].size_field
    best = None
    if field:
        v = 1
        while v <= 4096:
            specs = [_sized(sp, sp.units, **{field: v}) for sp in base]
            if total_params(specs) > budget:
                break
            best, v = specs, v + 1
        smallest = [_sized(sp, sp.units, **{field: 1}) for sp in base]
    else:
        for u in range(max(sp.units for sp in base), 0, -1):
            specs = [_sized(sp, u) for sp in base]
            if total_params(specs) <= budget:
                best = specs
                break
        smallest = [_sized(sp, 1) for sp in base]
    if best is not None:
        return best
    chosen = []  # the smallest module on as many top-layer sites as fit, shared tensors paid once
    for sp in sorted(smallest, key=lambda m: (-m.site.layer, m.site.stack)):
        if total_params(chosen + [sp]) <= budget:
            chosen.append(sp)
    return _order(chosen, sites)


def random_specs(sites: list[Site], budget: int, space: str = "s3pet-m", seed: int = 0):
    """A random structure of a space: random scores, then the search's greedy derivation."""
    specs = instantiate(load_space(space), sites)
    off = 0
    for sp in specs:
        sp.offset = off
        off += sp.units
    n = torch.tensor([sp.unit_params for sp in specs for _ in range(sp.units)], dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(off, generator=g, dtype=torch.float64)
    needs, costs = shared_needs(specs)
    keep = B.derive(p, n, budget, needs=needs, shared=costs)
    return kept_specs(specs, keep, p)


def baseline_structure(method: str, backbone: nn.Module, budget: int, seed: int = 0, space: str = "s3pet-m",
                       budget_record: dict | None = None) -> S.Structure | None:
    """The structure of a baseline method under ``budget`` (None for full fine-tuning)."""
    if method not in METHODS:
        raise ConfigError(f"unknown baseline method {method!r}; choose from {', '.join(METHODS)}")
    if method == "full":
        return None
    if method == "lst":
        raise ConfigError("lst has no structure: it trains a side network (s3pet.lst, pipeline.train_lst)")
    sites = discover_sites(backbone)
    if method == "random":
        kept = random_specs(sites, budget, space, seed)
        space_name = f"random:{load_space(space).name}"
    elif method in KIND_METHODS:
        kept = [(sp, None) for sp in kind_specs(method, sites, budget)]
        space_name = method
    else:
        build = {"lora": lora_specs, "lora-all": lora_all_specs, "adapter": adapter_specs, "bitfit": bitfit_specs, "lnfit": lnfit_specs}[method]
        kept = [(sp, None) for sp in build(sites, budget)]
        space_name = method
    if not kept:
        raise BudgetError(f"budget {budget} is too small for any {method} module on this model")
    brec = budget_record or {"params": budget, "fraction": None}
    return S.from_specs(kept, backbone, space_name, brec, {"method": method, "seed": seed})

