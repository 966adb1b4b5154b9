"""Compute side of the heatmaps: structures and gate probabilities as (stack, layer, role,
kind) grids, and the title of a structure plot. Pure Python."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import PurePath
from typing import Iterable, NamedTuple, Sequence

from s3pet.errors import ConfigError, StructureError
from s3pet.plot.common import (Key, _code, _human, _infer_stack, _kind_key, _layer_rows, _Module, _pct,
                               _role_key, _short_model, _shows_rank, _stack_sort)
from s3pet.plot.read import _modules_of


def _roles_with(roles: Sequence[str], cells: Iterable[Key], stack: str, kind: str) -> tuple[str, ...]:
    """The roles (in the given order) of the cells of ``kind`` in ``stack``."""
    return tuple(r for r in roles if any(k[0] == stack and k[2] == r and k[3] == kind for k in cells))


def _axes(sizes: dict[str, int], cells: Iterable[Key]) -> tuple[list[Key], dict]:
    """The cell keys in display order, and the fields shared by both grids: stacks (encoder,
    decoder, others), n_layers, layers (rows), roles (columns, canonical order) and kinds."""
    stacks = _stack_sort(sizes)
    keys = sorted(cells, key=lambda k: (stacks.index(k[0]), k[1], _role_key(k[2]), _kind_key(k[3])))
    return keys, dict(
        stacks=stacks,
        n_layers={s: sizes[s] for s in stacks},
        layers={s: _layer_rows(sizes[s], (k[1] for k in keys if k[0] == s)) for s in stacks},
        roles={s: tuple(sorted({k[2] for k in keys if k[0] == s}, key=_role_key)) for s in stacks},
        kinds=tuple(sorted({k[3] for k in keys}, key=_kind_key)),
    )


class StructureGrid(NamedTuple):
    """What a structure heatmap shows: (stack, layer, role, kind) cells.

    For one structure ``keep`` is 1.0 on every kept module; for an average it is the fraction
    of structures that keep it, and ``rank`` / ``params`` are means over those that keep it.
    Several modules of one kind in a cell (several sites with one role) are summed.
    """

    stacks: tuple[str, ...]               # display order: encoder, decoder, others
    n_layers: dict[str, int]              # blocks per stack (layer n is the final norm)
    layers: dict[str, tuple[int, ...]]    # rows of each stack, top to bottom
    roles: dict[str, tuple[str, ...]]     # columns of each stack: roles present, canonical order
    kinds: tuple[str, ...]                # kinds present
    rank: dict[Key, float]
    params: dict[Key, float]
    keep: dict[Key, float]
    n_structures: int
    info: dict                            # title data: model, space, budget, n_params, ...

    def cell(self, stack: str, layer: int, role: str) -> dict[str, float]:
        """{kind: rank} of one cell, in kind order."""
        return {k: self.rank[(stack, layer, role, k)] for k in self.kinds
                if (stack, layer, role, k) in self.rank}

    def roles_of(self, stack: str, kind: str) -> tuple[str, ...]:
        """Columns of a per-kind panel: roles where ``kind`` occurs in ``stack``."""
        return _roles_with(self.roles[stack], self.keep, stack, kind)


def task_label(provenance: dict) -> str | None:
    """The task as a title names it: the card's name (``task_name``), not the path of a card file;
    for structures written before ``task_name``, a path's file name without its suffix."""
    name = provenance.get("task_name") or provenance.get("task")
    if not isinstance(name, str) or not name:
        return None
    if "/" in name or "\\" in name or name.endswith((".json", ".yaml", ".yml")):
        name = PurePath(name.replace("\\", "/")).stem or name
    return name


def _info_of(structure: dict) -> dict:
    base = structure.get("base_model") or {}
    budget = structure.get("budget") or {}
    prov = structure.get("provenance") or {}
    return {"model": str(base.get("name_or_path", "?")), "model_type": base.get("model_type"),
            "backbone_params": base.get("n_params"), "space": structure.get("space"),
            "budget_params": budget.get("params"), "budget_fraction": budget.get("fraction"),
            "n_params": structure.get("n_params"), "task": task_label(prov),
            "seed": prov.get("seed")}


def _grid_from(per_structure: list[tuple[dict[str, int], list[_Module]]],
               info: dict) -> StructureGrid:
    n = len(per_structure)
    n_layers: dict[str, int] = {}
    rank_sum: dict[Key, float] = defaultdict(float)
    param_sum: dict[Key, float] = defaultdict(float)
    count: dict[Key, int] = defaultdict(int)
    for stacks, mods in per_structure:
        for s, size in stacks.items():
            n_layers[s] = max(n_layers.get(s, 0), size)
        seen: dict[Key, tuple[float, float]] = {}
        for m in mods:
            key = (m.stack, m.layer, m.role, m.kind)
            r, p = seen.get(key, (0.0, 0.0))
            seen[key] = (r + m.rank, p + m.n_params)
        for key, (r, p) in seen.items():
            rank_sum[key] += r
            param_sum[key] += p
            count[key] += 1
    keys, axes = _axes(n_layers, count)
    return StructureGrid(
        **axes,
        rank={k: rank_sum[k] / count[k] for k in keys},
        params={k: param_sum[k] / count[k] for k in keys},
        keep={k: count[k] / n for k in keys},
        n_structures=n,
        info=info,
    )


def structure_grid(structure: dict) -> StructureGrid:
    """Layers x roles grid of one structure, with the rank and parameters of each kind per cell.

    Raises:
        StructureError: ``structure`` is not an s3pet structure.
    """
    return _grid_from([_modules_of(structure)], _info_of(structure))


def average_grid(structures: Sequence[dict]) -> StructureGrid:
    """Average of several structures (across seeds or tasks): ``keep`` is the fraction of
    structures keeping each (stack, layer, role, kind); ``rank`` the mean rank when kept.

    Raises:
        StructureError: an entry is not a structure, or the list is empty.
    """
    if not structures:
        raise StructureError("no structures to average")
    parsed = [_modules_of(s, where=f"structure {i}") for i, s in enumerate(structures)]
    infos = [_info_of(s) for s in structures]

    def values(field):
        return sorted({str(i[field]) for i in infos if i[field] is not None})

    info = {"model": " / ".join(values("model")) or "?",
            "model_type": "/".join(values("model_type")) or None,
            "space": "/".join(values("space")) or None,
            "tasks": values("task"), "seeds": values("seed"),
            "budget_params": infos[0]["budget_params"] if len(values("budget_params")) == 1
            else None,
            "budget_fraction": infos[0]["budget_fraction"]
            if len(values("budget_fraction")) == 1 else None}
    return _grid_from(parsed, info)


def structure_title(grid: StructureGrid) -> str:
    """Two or three lines: model and space; parameters used against backbone and budget."""
    i = grid.info
    model = " / ".join(_short_model(m) for m in i["model"].split(" / "))
    head = model + (f" ({i['model_type']})" if i.get("model_type") else "")
    if i.get("space"):
        head += f" · space {i['space']}"
    if grid.n_structures > 1:
        lines = [f"average of {grid.n_structures} structures · " + head]
        ctx = []
        if i.get("tasks"):
            ctx.append("tasks " + ", ".join(i["tasks"]))
        if i.get("seeds"):
            ctx.append("seeds " + ", ".join(i["seeds"]))
        if i.get("budget_params"):
            ctx.append(f"budget {int(i['budget_params']):,} params")
        if ctx:
            lines.append(" · ".join(ctx))
        return "\n".join(lines)
    prov = [f"{k} {i[k]}" for k in ("task", "seed") if i.get(k) is not None]
    if prov:
        head += " · " + ", ".join(prov)
    used, budget, backbone = i.get("n_params"), i.get("budget_params"), i.get("backbone_params")
    if used is None:
        used = sum(grid.params.values())
    parts = [f"{int(used):,} trainable params"]
    if backbone:
        parts[0] += f" = {_pct(used / backbone)} of the {_human(backbone)} backbone"
    if budget:
        frac = i.get("budget_fraction")
        parts.append(f"{_pct(used / budget)} of the {int(budget):,}-param budget"
                     + (f" ({_pct(frac)})" if frac else ""))
    return head + "\n" + " · ".join(parts)


def cell_label(ranks: dict[str, float]) -> str:
    """Text of a combined-heatmap cell, e.g. {'lora': 2, 'bitfit': 1} -> 'L2+B'."""
    out = []
    for kind, r in ranks.items():
        code = _code(kind)
        if _shows_rank(kind, r):
            code += f"{r:.3g}"
        out.append(code)
    return "+".join(out)


class GateGrid(NamedTuple):
    """Gate probabilities from ``alphas.csv``, aggregated per (stack, layer, role, kind) cell."""

    stacks: tuple[str, ...]
    n_layers: dict[str, int]
    layers: dict[str, tuple[int, ...]]
    roles: dict[str, tuple[str, ...]]
    kinds: tuple[str, ...]
    p: dict[Key, float]          # ``agg`` ("mean" or "max") of the candidates' p in the cell
    count: dict[Key, int]        # candidates in the cell (LoRA rank components, adapter units)
    n_open: dict[Key, int]       # candidates with p > 0.5
    agg: str
    kept: dict[Key, int] = {}    # units the derived structure keeps in the cell (its rank), when given
    n_kept_modules: int = 0      # modules of that structure

    @property
    def n_candidates(self) -> int:
        return sum(self.count.values())

    @property
    def p_range(self) -> tuple[float, float]:
        """Smallest and largest cell value (NaN, NaN without cells)."""
        return (min(self.p.values()), max(self.p.values())) if self.p else (math.nan, math.nan)

    def roles_of(self, stack: str, kind: str) -> tuple[str, ...]:
        """Roles where ``kind`` has candidates in ``stack``."""
        return _roles_with(self.roles[stack], self.p, stack, kind)


def gate_grid(rows: Iterable[dict], agg: str = "mean",
              n_layers: dict[str, int] | None = None, structure: dict | None = None) -> GateGrid:
    """Aggregate candidate gate probabilities per cell.

    Args:
        rows: ``alphas.csv`` rows (strings or numbers; needs layer, role, kind, p and a stack or
            a site naming it).
        agg: "mean" or "max" of the candidates' p in a cell.
        n_layers: blocks per stack, when known (from a structure); else inferred (and taken
            from ``structure`` when given).
        structure: the structure derived from these gates: ``kept`` gives its units per cell.

    Raises:
        ConfigError: ``agg`` is neither "mean" nor "max".
        StructureError: a row lacks a field or holds a non-number.
    """
    if agg not in ("mean", "max"):
        raise ConfigError(f"gate aggregation must be 'mean' or 'max', not {agg!r}")
    rows = list(rows)
    kept: dict[Key, int] = defaultdict(int)
    n_modules = 0
    if structure is not None:
        stacks, mods = _modules_of(structure)
        n_layers = n_layers or stacks
        for m in mods:
            kept[(m.stack, m.layer, m.role, m.kind)] += int(m.rank)
        n_modules = len(mods)
    known = list(n_layers) if n_layers else sorted({r["stack"] for r in rows if r.get("stack")})
    values: dict[Key, list[float]] = defaultdict(list)
    blocks: dict[str, int] = {}  # last block index per stack, over every row
    for i, r in enumerate(rows):
        try:
            stack = r.get("stack") or _infer_stack(str(r.get("site", "")), known or ["model"])
            key = (str(stack), int(r["layer"]), str(r["role"]), str(r["kind"]))
            p = float(r["p"])
        except (KeyError, TypeError, ValueError) as e:
            raise StructureError(f"alphas row {i}: bad or missing field ({e})") from e
        if stack is None:
            raise StructureError(f"alphas row {i} ({r.get('site', '?')}) names no stack")
        if key[2] != "norm.final":
            blocks[key[0]] = max(blocks.get(key[0], -1), key[1])
        if math.isfinite(p):
            values[key].append(p)
    sizes = dict(n_layers or {})
    for s in {k[0] for k in values}:
        sizes.setdefault(s, blocks.get(s, -1) + 1)
    keys, axes = _axes(sizes, values)
    reduce = max if agg == "max" else (lambda v: sum(v) / len(v))
    return GateGrid(
        **axes,
        p={k: reduce(values[k]) for k in keys},
        count={k: len(values[k]) for k in keys},
        n_open={k: sum(v > 0.5 for v in values[k]) for k in keys},
        agg=agg,
        kept={k: kept[k] for k in keys if kept.get(k)},
        n_kept_modules=n_modules,
    )


def gates_title(grid: GateGrid) -> str:
    """Title of the gate plot: what a cell shows, the spread of p, and what the derivation kept.

    No count of p > 0.5: the shift holds sum_i n_i p_i at the budget, so under a small budget
    every p stays far below 0.5 and what matters is the order, which the derivation follows."""
    lo, hi = grid.p_range
    head = (f"gate probabilities: {grid.agg} p of each cell's {grid.n_candidates:,} candidates"
            + (f" · p from {lo:.2f} to {hi:.2f}" if grid.p else ""))
    if not grid.n_kept_modules:
        return head
    units = sum(grid.kept.values())
    return (head + f"\noutlined: the {grid.n_kept_modules} module{'s' * (grid.n_kept_modules != 1)} of the "
            f"derived structure ({units:,} of the candidates, kept greedily by p under the budget)")
