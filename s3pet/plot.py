"""Plots of searched structures, gate probabilities and search trajectories.

Split in two, like Optuna's visualisation: a *compute* function turns run files into a
small NamedTuple of what to draw (pure Python, unit-tested on its values), and a *renderer*
draws it (``ax=None`` draws on a new Agg figure; it returns the Axes, or an array of Axes
for several panels). matplotlib and networkx are imported only when needed.

    grid = structure_grid(read_structure("run/structure.json"))
    ax = plot_structure(grid)                 # or plot_structure(grid, ax=my_ax)
    ax.figure.savefig("structure.png")

``plot_paths`` draws every plot that a run directory or structure file allows (the CLI).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

from s3pet.errors import ConfigError, StructureError
from s3pet.io import atomic_write_bytes

logger = logging.getLogger(__name__)

# Canonical column order of roles; roles not listed here follow, sorted by name.
ROLES = (
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o",
    "ffn.gate", "ffn.in", "ffn.out",
    "norm.attn", "norm.xattn", "norm.ffn",
    "attn.block", "xattn.block", "ffn.block",
    "norm.emb", "norm.final",
)
KINDS = ("lora", "adapter", "lowrank_adapter", "bitfit", "lnfit", "ia3")
# Kinds whose rank is searched; the others always have rank 1, so their rank is not printed.
RANKED_KINDS = frozenset({"lora", "adapter"})
# Short codes written in cells ("L2+B"): one legend entry per code.
KIND_CODES = {"lora": "L", "adapter": "A", "lowrank_adapter": "LRA", "bitfit": "B",
              "lnfit": "N", "ia3": "IA3"}
# Okabe-Ito colours (colour-blind safe), lightened in the renderers so black text stays legible.
KIND_COLOURS = {"lora": "#56B4E9", "adapter": "#F0E442", "lowrank_adapter": "#CC79A7",
                "bitfit": "#E69F00", "lnfit": "#009E73", "ia3": "#D55E00"}
# Further kinds (Paul Tol's muted palette, picked to differ in hue from the six above).
_EXTRA_COLOURS = ("#999933", "#332288", "#882255", "#44AA99", "#999999", "#AA4499")
# Encoder-only and post-LN models: the norm follows its sublayer (only used to order the graph).
_POST_LN = frozenset({"bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert",
                      "deberta", "deberta-v2", "camembert", "ernie", "mpnet", "bart", "marian",
                      "xlm", "flaubert", "mobilebert", "megatron-bert"})
_STACK_ORDER = ("encoder", "decoder")
STAGES = ("search", "retrain")
FORMATS = ("png", "svg", "pdf")
DPI = 150

Key = tuple  # (stack, layer, role, kind)


# --------------------------------------------------------------------------- reading


def read_structure(path: str | os.PathLike) -> dict:
    """Load and check a ``structure.json``.

    Raises:
        ConfigError: the file does not exist.
        StructureError: it is not JSON or not an s3pet structure.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such structure file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StructureError(f"{path}: not a JSON file ({e})") from e
    _modules_of(obj, where=str(path))  # validates
    return obj


def read_alphas(path: str | os.PathLike) -> list[dict]:
    """Rows of an ``alphas.csv`` as dicts (values still strings; ``gate_grid`` converts)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"layer", "role", "kind", "p"} - set(reader.fieldnames or ())
        if missing:
            raise StructureError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        return list(reader)


def read_history(path: str | os.PathLike) -> list[dict]:
    """Records of a ``history.jsonl``; a truncated last line (a killed run) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):
                logger.warning("%s: skipping a truncated last line", path)
                break
            raise StructureError(f"{path}:{i}: not a JSON record ({e.msg})") from e
        if isinstance(rec, dict):
            records.append(rec)
    return records


class _Module(NamedTuple):
    stack: str
    layer: int
    role: str
    kind: str
    rank: float
    n_params: float
    site: str
    score: float | None


def _stack_sort(stacks: Iterable[str]) -> tuple[str, ...]:
    s = set(stacks)
    return tuple(x for x in _STACK_ORDER if x in s) + tuple(sorted(s - set(_STACK_ORDER)))


def _role_key(role: str):
    return (ROLES.index(role), "") if role in ROLES else (len(ROLES), role)


def _kind_key(kind: str):
    return (KINDS.index(kind), "") if kind in KINDS else (len(KINDS), kind)


def _infer_stack(site: str, stacks: Sequence[str]) -> str | None:
    if len(stacks) == 1:
        return stacks[0]
    parts = site.split(".")
    hits = [s for s in stacks if s in parts]
    return hits[0] if len(hits) == 1 else None


def _stacks_of(structure: dict) -> dict[str, int]:
    base = structure.get("base_model") or {}
    stacks = base.get("stacks")
    if isinstance(stacks, dict) and stacks:
        return {str(k): int(v) for k, v in stacks.items()}
    named = {m.get("stack") for m in structure.get("modules", []) if isinstance(m, dict)}
    named.discard(None)
    if len(named) > 1:
        return {s: -1 for s in named}  # sizes filled in from the modules
    name = next(iter(named), "model")
    return {name: int(base["layers"]) if "layers" in base else -1}


def _modules_of(structure: Any, where: str = "structure") -> tuple[dict[str, int], list[_Module]]:
    """Stacks ({name: n_layers}) and checked module entries of a structure dict."""
    if not isinstance(structure, dict) or not str(structure.get("schema", "")).startswith(
            "s3pet.structure/"):
        raise StructureError(f"{where}: not an s3pet structure (no 's3pet.structure/...' schema)")
    entries = structure.get("modules")
    if not isinstance(entries, list):
        raise StructureError(f"{where}: 'modules' must be a list")
    stacks = _stacks_of(structure)
    names = list(stacks)
    mods = []
    for i, m in enumerate(entries):
        if not isinstance(m, dict):
            raise StructureError(f"{where}: modules[{i}] is not an object")
        missing = [k for k in ("layer", "role", "kind") if k not in m]
        if missing:
            raise StructureError(f"{where}: modules[{i}] ({m.get('site', '?')}) lacks "
                                 f"{', '.join(missing)}")
        stack = m.get("stack") or _infer_stack(str(m.get("site", "")), names)
        if stack is None:
            raise StructureError(f"{where}: modules[{i}] ({m.get('site', '?')}) names no stack")
        try:
            layer = int(m["layer"])
            rank = float(m.get("rank", 1) or 1)
            n_params = float(m.get("n_params", 0) or 0)
        except (TypeError, ValueError) as e:
            raise StructureError(f"{where}: modules[{i}] has a non-numeric field ({e})") from e
        score = m.get("score")
        mods.append(_Module(str(stack), layer, str(m["role"]), str(m["kind"]), rank, n_params,
                            str(m.get("site", f"{stack}.{layer}.{m['role']}")),
                            float(score) if isinstance(score, (int, float)) else None))
    for mod in mods:
        stacks.setdefault(mod.stack, -1)
    for s, n in stacks.items():
        if n < 0:  # size unknown: blocks are the layers below any final norm
            blocks = [m.layer for m in mods if m.stack == s and m.role != "norm.final"]
            stacks[s] = max(blocks, default=-1) + 1
    return stacks, mods


def _layer_rows(n_layers: int, observed: Iterable[int]) -> tuple[int, ...]:
    """Rows of a stack: every block 0..n-1, plus the embedding (-1) / final (n) rows if used."""
    return tuple(sorted(set(range(n_layers)) | set(observed)))


def layer_label(layer: int, n_layers: int) -> str:
    """'emb' for layer -1, 'final' for the row after the last block, else the block index."""
    if layer < 0:
        return "emb"
    if layer == n_layers:
        return "final"
    return str(layer)


# --------------------------------------------------------------------------- structure grids


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
        return tuple(r for r in self.roles[stack]
                     if any(k[0] == stack and k[2] == r and k[3] == kind for k in self.keep))


def _info_of(structure: dict) -> dict:
    base = structure.get("base_model") or {}
    budget = structure.get("budget") or {}
    prov = structure.get("provenance") or {}
    return {"model": str(base.get("name_or_path", "?")), "model_type": base.get("model_type"),
            "backbone_params": base.get("n_params"), "space": structure.get("space"),
            "budget_params": budget.get("params"), "budget_fraction": budget.get("fraction"),
            "n_params": structure.get("n_params"), "task": prov.get("task"),
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
    stacks = _stack_sort(n_layers)
    keys = sorted(count, key=lambda k: (stacks.index(k[0]), k[1], _role_key(k[2]), _kind_key(k[3])))
    return StructureGrid(
        stacks=stacks,
        n_layers={s: n_layers[s] for s in stacks},
        layers={s: _layer_rows(n_layers[s], (k[1] for k in keys if k[0] == s)) for s in stacks},
        roles={s: tuple(sorted({k[2] for k in keys if k[0] == s}, key=_role_key)) for s in stacks},
        kinds=tuple(sorted({k[3] for k in keys}, key=_kind_key)),
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


def _short_model(name: str) -> str:
    parts = [p for p in str(name).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else "?"


def _pct(x: float) -> str:
    v = 100.0 * float(x)
    if v >= 10:
        return f"{v:.0f}%"
    if v >= 1:
        return f"{v:.1f}%"
    return f"{v:.2g}%"


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


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
        code = KIND_CODES.get(kind, kind[:3])
        if kind in RANKED_KINDS or abs(r - 1) > 1e-9:
            code += f"{r:.3g}"
        out.append(code)
    return "+".join(out)


# --------------------------------------------------------------------------- gate grid


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

    def roles_of(self, stack: str, kind: str) -> tuple[str, ...]:
        """Roles where ``kind`` has candidates in ``stack``."""
        return tuple(r for r in self.roles[stack]
                     if any(k[0] == stack and k[2] == r and k[3] == kind for k in self.p))


def gate_grid(rows: Iterable[dict], agg: str = "mean",
              n_layers: dict[str, int] | None = None) -> GateGrid:
    """Aggregate candidate gate probabilities per cell.

    Args:
        rows: ``alphas.csv`` rows (strings or numbers; needs layer, role, kind, p and a stack or
            a site naming it).
        agg: "mean" or "max" of the candidates' p in a cell.
        n_layers: blocks per stack, when known (from a structure); else inferred.

    Raises:
        ConfigError: ``agg`` is neither "mean" nor "max".
        StructureError: a row lacks a field or holds a non-number.
    """
    if agg not in ("mean", "max"):
        raise ConfigError(f"gate aggregation must be 'mean' or 'max', not {agg!r}")
    rows = list(rows)
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
    stacks = _stack_sort(sizes)
    keys = sorted(values, key=lambda k: (stacks.index(k[0]), k[1], _role_key(k[2]),
                                         _kind_key(k[3])))
    reduce = max if agg == "max" else (lambda v: sum(v) / len(v))
    return GateGrid(
        stacks=stacks,
        n_layers={s: sizes[s] for s in stacks},
        layers={s: _layer_rows(sizes[s], (k[1] for k in keys if k[0] == s)) for s in stacks},
        roles={s: tuple(sorted({k[2] for k in keys if k[0] == s}, key=_role_key)) for s in stacks},
        kinds=tuple(sorted({k[3] for k in keys}, key=_kind_key)),
        p={k: reduce(values[k]) for k in keys},
        count={k: len(values[k]) for k in keys},
        n_open={k: sum(v > 0.5 for v in values[k]) for k in keys},
        agg=agg,
    )


# --------------------------------------------------------------------------- trajectory


class Series(NamedTuple):
    step: tuple[float, ...]
    value: tuple[float, ...]


class Trajectory(NamedTuple):
    """Series of a ``history.jsonl``; a key absent from every record gives an empty Series."""

    loss_w: Series
    loss_alpha: Series
    loss: Series                 # retrain runs
    lr: Series                   # retrain runs
    shift: Series
    expected_params: Series
    budget: Series
    gate_entropy: Series
    gates_open: Series
    evals: dict[str, Series]     # every numeric field of the "eval" records ("main", ...)

    @property
    def eval_main(self) -> Series:
        return self.evals.get("main", Series((), ()))


_TRAJ_FIELDS = ("loss_w", "loss_alpha", "loss", "lr", "shift", "expected_params", "budget",
                "gate_entropy", "gates_open")


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def trajectory(records: Iterable[dict]) -> Trajectory:
    """Collect the series of history records; missing keys and non-finite values are skipped.

    A record without "step" takes the previous record's step (or its index if none yet).
    """
    pts: dict[str, list[tuple[float, float]]] = defaultdict(list)
    evals: dict[str, list[tuple[float, float]]] = defaultdict(list)
    step = None
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        s = _number(rec.get("step"))
        step = s if s is not None else (step if step is not None else float(i))
        for f in _TRAJ_FIELDS:
            v = _number(rec.get(f))
            if v is not None:
                pts[f].append((step, v))
        ev = rec.get("eval")
        if isinstance(ev, dict):
            for name, v in ev.items():
                v = _number(v)
                if v is not None:
                    evals[str(name)].append((step, v))

    def series(p):
        return Series(tuple(a for a, _ in p), tuple(b for _, b in p))

    return Trajectory(**{f: series(pts[f]) for f in _TRAJ_FIELDS},
                      evals={k: series(v) for k, v in evals.items()})


# --------------------------------------------------------------------------- graph


def _sublayers(model_type: str | None, cross: bool) -> tuple[str, ...]:
    """Sublayers of a block in forward order (pre-LN unless the family is post-LN)."""
    post = (model_type or "").lower() in _POST_LN
    out: list[str] = []
    for s in ("attn", "xattn", "ffn") if cross else ("attn", "ffn"):
        out += [s, f"norm.{s}"] if post else [f"norm.{s}", s]
    return tuple(out)


def role_sublayer(role: str) -> str:
    """The sublayer a role's module attaches to: 'attn', 'xattn', 'ffn', 'norm.attn', ...,
    'in' (embedding norm), 'out' (final norm), or 'block' for unknown roles."""
    if role in ("norm.attn", "norm.xattn", "norm.ffn"):
        return role
    if role == "norm.emb":
        return "in"
    if role == "norm.final":
        return "out"
    head = role.split(".")[0]
    return head if head in ("attn", "xattn", "ffn") else "block"


_SUB_LABELS = {"attn": "attention", "xattn": "x-attention", "ffn": "FFN", "norm.attn": "norm",
               "norm.xattn": "norm", "norm.ffn": "norm"}


def module_label(kind: str, rank: float) -> str:
    """Graph label of a kept module: kind, plus the rank for kinds whose rank is searched."""
    if kind in RANKED_KINDS or abs(rank - 1) > 1e-9:
        return f"{kind} r{rank:g}"
    return kind


def structure_graph(structure: dict):
    """A networkx DiGraph of the model's residual stream with the kept modules attached.

    Nodes (attribute ``type``): ``"{stack}.in"`` (embeddings, "embed"), ``"{stack}.{i}"``
    (block i, "block"), ``"{stack}.{i}.{sublayer}"`` ("sublayer" or "norm"; sublayer in
    attn, xattn, ffn, norm.attn, norm.xattn, norm.ffn), ``"{stack}.out"`` ("output") and one
    "module" node per kept module (``"{site}:{kind}"``; attributes kind, rank, role, site,
    n_params, label). Edges (attribute ``type``): "residual" along the stream (in -> block ->
    its sublayers -> next block -> ... -> out), "delta" from a sublayer to each of its
    modules, and "cross" from the encoder output to each decoder cross-attention.

    Raises:
        StructureError: ``structure`` is not an s3pet structure.
    """
    import networkx as nx

    stacks, mods = _modules_of(structure)
    model_type = (structure.get("base_model") or {}).get("model_type")
    g = nx.DiGraph(title=structure_title(structure_grid(structure)), model_type=model_type)
    order = _stack_sort(stacks)
    g.graph["stacks"] = {s: stacks[s] for s in order}
    g.graph["sublayers"] = {}
    for s in order:
        cross = (s == "decoder" and "encoder" in stacks) or any(
            m.stack == s and m.role.startswith("xattn.") for m in mods)
        subs = _sublayers(model_type, cross)
        g.graph["sublayers"][s] = subs
        chain = [f"{s}.in"]
        g.add_node(f"{s}.in", type="embed", stack=s, layer=-1, label="embeddings")
        for i in range(stacks[s]):
            g.add_node(f"{s}.{i}", type="block", stack=s, layer=i, label=str(i))
            chain.append(f"{s}.{i}")
            for sub in subs:
                g.add_node(f"{s}.{i}.{sub}", type="norm" if sub.startswith("norm") else "sublayer",
                           stack=s, layer=i, sublayer=sub, label=_SUB_LABELS[sub])
                chain.append(f"{s}.{i}.{sub}")
        g.add_node(f"{s}.out", type="output", stack=s, layer=stacks[s], label="output")
        chain.append(f"{s}.out")
        nx.add_path(g, chain, type="residual")
    if "encoder" in stacks and "decoder" in stacks:
        for i in range(stacks["decoder"]):
            g.add_edge("encoder.out", f"decoder.{i}.xattn", type="cross")
    for m in mods:
        sub = role_sublayer(m.role)
        host = {"in": f"{m.stack}.in", "out": f"{m.stack}.out",
                "block": f"{m.stack}.{m.layer}"}.get(sub, f"{m.stack}.{m.layer}.{sub}")
        if host not in g:  # a role this block lacks, or a layer outside the blocks
            host = (f"{m.stack}.{m.layer}" if f"{m.stack}.{m.layer}" in g
                    else f"{m.stack}.in" if m.layer < 0 else f"{m.stack}.out")
        node, n = f"{m.site}:{m.kind}", 1
        while node in g:
            n += 1
            node = f"{m.site}:{m.kind}#{n}"
        g.add_node(node, type="module", stack=m.stack, layer=m.layer, role=m.role, kind=m.kind,
                   rank=m.rank, n_params=m.n_params, site=m.site, host=host,
                   label=module_label(m.kind, m.rank))
        g.add_edge(host, node, type="delta")
    return g


_CROSS = "#0072B2"  # frames of the encoder output and the cross-attentions reading it
# Graph layout units are inches: one sublayer column is _GX wide, one text line _GY high.
_GX, _GY = 0.85, 0.2


def graph_layout(graph) -> dict[str, tuple[float, float]]:
    """Deterministic positions (inches) for ``plot_graph``: one row per layer (embeddings on
    top, output at the bottom), the block then its sublayers left to right in forward order,
    each sublayer's modules listed under it; stacks side by side (encoder left)."""
    pos: dict[str, tuple[float, float]] = {}
    x0 = 0.0
    for s, n in graph.graph["stacks"].items():
        subs = graph.graph["sublayers"][s]
        y = 0.0
        for layer in range(-1, n + 1):
            if layer < 0:
                hosts = [f"{s}.in"]
            elif layer == n:
                hosts = [f"{s}.out"]
            else:
                hosts = [f"{s}.{layer}"] + [f"{s}.{layer}.{sub}" for sub in subs]
            depth = 0
            for j, h in enumerate(hosts):
                pos[h] = (x0 + j * _GX, y)
                kids = sorted((v for v in graph.successors(h)
                               if graph.nodes[v].get("type") == "module"),
                              key=lambda v: (_role_key(graph.nodes[v]["role"]),
                                             _kind_key(graph.nodes[v]["kind"]), v))
                for k, v in enumerate(kids, 1):
                    pos[v] = (x0 + j * _GX - 0.36 * _GX, y - k * _GY)
                depth = max(depth, len(kids))
            y -= (depth + 1.8) * _GY
        x0 += (len(subs) + 1) * _GX + 0.9
    return pos


# --------------------------------------------------------------------------- drawing helpers


def _new_figure(width: float, height: float):
    """A Figure on an Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _light(colour: str, amount: float = 0.35) -> tuple[float, float, float]:
    """Blend a colour with white so that black text on it stays readable."""
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(colour)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _text_colour(fills) -> str:
    """Black on light fills, white on dark ones (mean relative luminance of the stripes)."""
    from matplotlib.colors import to_rgb

    def lum(c):
        r, g, b = (x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in to_rgb(c))
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    return "black" if sum(map(lum, fills)) / len(fills) > 0.18 else "white"


def kind_colour(kind: str, kinds: Sequence[str] = ()) -> str:
    """Fixed colour of a kind; unknown kinds take spare colours in their order in ``kinds``."""
    if kind in KIND_COLOURS:
        return KIND_COLOURS[kind]
    extra = [k for k in kinds if k not in KIND_COLOURS]
    i = extra.index(kind) if kind in extra else sum(map(ord, kind))
    return _EXTRA_COLOURS[i % len(_EXTRA_COLOURS)]


def _text_width(text: str, size: float) -> float:
    """Rough width in inches of ``text`` at font ``size`` (DejaVu Sans averages ~0.6 em)."""
    return len(text) * size * 0.6 / 72


class _Panel(NamedTuple):
    """One heatmap panel: cells (row, col) -> (fill colours, one vertical stripe each; text;
    text colour), drawn with rectangles so that a cell can hold several kinds."""

    title: str
    x_labels: tuple[str, ...]
    y_labels: tuple[str, ...]
    cells: dict
    col_w: float                  # inches per column
    boundaries: tuple[int, ...]   # dashed lines under these rows (embedding / final rows)


_ROW_H = 0.24     # inches per heatmap row: fits 7 pt text with space to spare
_FONT = 7.0       # cell text
_TICK = 7.5       # tick labels
_PANEL_TITLE = 8.5


def _heatmap_panels(ax, rows: list[list[_Panel]], right: float, title: str | None):
    """Place and draw rows of panels with exact cell sizes in inches.

    Panels of one row share the layer labels (drawn on the first). The figure is as large as
    the panels need (centred under a wider title); ``right`` inches are kept free after the
    widest row for a legend or colour bar. With ``ax`` given, the panels split its area.

    Returns (figure, flat list of Axes, (x, y) figure fraction of the free area's top left).
    """
    title_lines = title.count("\n") + 1 if title else 0
    top_pad = 0.15 + 0.19 * title_lines
    panel_top = 0.3
    layout = []  # per row: [(x offset, width)], height, bottom margin
    for row in rows:
        x, slots, bottom = 0.0, [], 0.0
        for k, p in enumerate(row):
            labelled = k == 0 or p.y_labels != row[k - 1].y_labels
            if labelled:
                x += max(_text_width(t, _TICK) for t in p.y_labels) + 0.38
            w = len(p.x_labels) * p.col_w
            slots.append((x, w, labelled))
            # the next panel starts after this one and after its (left-aligned) title
            x += max(w, _text_width(p.title, _PANEL_TITLE) + 0.05) + 0.2
            lab = max(_text_width(t, _TICK) for t in p.x_labels)
            bottom = max(bottom, lab * 0.72 + 0.2)  # tick labels rotated by 45 degrees
        layout.append((slots, x, max(len(p.y_labels) for p in row) * _ROW_H, bottom))
    content_w = max(x for _, x, _, _ in layout) + right
    total_w = content_w
    if title:
        longest = max(len(line) for line in title.split("\n"))
        total_w = max(total_w, min(longest * 9.5 * 0.6 / 72 + 0.3, 16.0))
    total_w = max(total_w, 3.0)
    shift = (total_w - content_w) / 2
    total_h = top_pad + sum(panel_top + h + b for _, _, h, b in layout)

    if ax is None:
        fig = _new_figure(total_w, total_h)
        if title:
            fig.suptitle(title, fontsize=9.5, y=1 - 0.08 / total_h, va="top")

        def make(rect):
            return fig.add_axes(rect)

        def to_fig(xy):
            return xy
    else:
        fig = ax.figure
        ax.set_axis_off()
        if title:
            ax.set_title(title, fontsize=9.5)

        def make(rect):
            return ax.inset_axes(rect)

        def to_fig(xy):
            return tuple(fig.transFigure.inverted().transform(ax.transAxes.transform(xy)))

    flat = []
    y = total_h - top_pad
    for row, (slots, _, height, bottom) in zip(rows, layout):
        y -= panel_top
        for p, (x, w, labelled) in zip(row, slots):
            h = len(p.y_labels) * _ROW_H  # panels of a row are aligned at the top
            a = make([(x + shift) / total_w, (y - h) / total_h, w / total_w, h / total_h])
            _draw_panel(a, p, show_layers=labelled)
            flat.append(a)
        y -= height + bottom
    anchor = to_fig(((shift + content_w - right + 0.05) / total_w, 1 - top_pad / total_h
                     - panel_top / total_h))
    return fig, flat, anchor


def _draw_panel(ax, panel: _Panel, show_layers: bool = True):
    from matplotlib.patches import Rectangle

    n_rows, n_cols = len(panel.y_labels), len(panel.x_labels)
    for (i, j), (fills, text, tcol) in panel.cells.items():
        w = 1.0 / max(len(fills), 1)
        for k, c in enumerate(fills):
            ax.add_patch(Rectangle((j + k * w, i), w, 1, facecolor=c, edgecolor="none"))
        if text:
            ax.text(j + 0.5, i + 0.53, text, ha="center", va="center", fontsize=_FONT,
                    color=tcol)
    for j in range(n_cols + 1):
        ax.axvline(j, color="#c8c8c8", lw=0.6)
    for i in range(n_rows + 1):
        ax.axhline(i, color="#c8c8c8", lw=0.6)
    for i in panel.boundaries:
        ax.axhline(i, color="#555555", lw=1.0, ls=(0, (3, 2)))
    ax.set_xlim(0, n_cols)
    ax.set_ylim(n_rows, 0)
    ax.set_xticks([j + 0.5 for j in range(n_cols)])
    ax.set_xticklabels(panel.x_labels, rotation=45, ha="right", rotation_mode="anchor",
                       fontsize=_TICK)
    ax.set_yticks([i + 0.5 for i in range(n_rows)])
    if show_layers:
        ax.set_yticklabels(panel.y_labels, fontsize=_TICK)
        ax.set_ylabel("layer", fontsize=_TICK)
    else:
        ax.set_yticklabels([])
    ax.tick_params(length=0, pad=3)
    for side in ax.spines.values():
        side.set_color("#888888")
    ax.set_title(panel.title, fontsize=_PANEL_TITLE, loc="left")


def _boundaries(layers: Sequence[int], n_layers: int) -> tuple[int, ...]:
    """Row positions of the lines between the embedding / final rows and the blocks."""
    out = []
    if layers and layers[0] < 0:
        out.append(1)
    if layers and layers[-1] >= n_layers:
        out.append(len(layers) - 1)
    return tuple(out)


def _col_width(labels: Iterable[str], size: float = _FONT) -> float:
    return max(0.42, max((_text_width(t, size) for t in labels), default=0) + 0.14)


def _code(kind: str) -> str:
    return KIND_CODES.get(kind, kind[:3])


def _kind_legend(fig, kinds: Sequence[str], anchor, title: str = "kind"):
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_light(kind_colour(k, kinds)), edgecolor="#888888",
                     label=f"{_code(k)} = {k}") for k in kinds]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor, fontsize=7.5,
               title=title, title_fontsize=8, frameon=False, alignment="left")


def _colour_bar(fig, anchor, cmap, label: str):
    """A 0..1 colour bar in the free area right of the panels."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    fw, fh = fig.get_figwidth(), fig.get_figheight()
    x, y = anchor
    h = min(2.2, 0.75 * fh * y)
    cax = fig.add_axes([x + 0.1 / fw, y - h / fh, 0.14 / fw, h / fh])
    cb = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), cax=cax)
    cb.set_ticks([0, 0.25, 0.5, 0.75, 1])
    cb.ax.tick_params(labelsize=7)
    cb.set_label(label, fontsize=7.5)


def _result(axes: list):
    import numpy as np

    return axes[0] if len(axes) == 1 else np.array(axes, dtype=object)


def _y_labels(grid, stack: str) -> tuple[str, ...]:
    return tuple(layer_label(x, grid.n_layers[stack]) for x in grid.layers[stack])


# --------------------------------------------------------------------------- renderers


def plot_structure(grid: StructureGrid, ax=None, mode: str = "combined"):
    """Draw a structure as a layers x roles heatmap.

    mode "combined": one panel per stack (encoder and decoder side by side), each cell split
    into one stripe per kind kept there and labelled with kind codes and ranks ("L2+B").
    "per-kind": one panel per (stack, kind), cells shaded by rank and labelled with it.

    Returns the Axes, or an array of Axes for several panels.

    Raises:
        ConfigError: unknown mode.
    """
    if mode == "per-kind":
        return _plot_per_kind(grid, ax, average=False)
    if mode != "combined":
        raise ConfigError(f"structure plot mode must be 'combined' or 'per-kind', not {mode!r}")
    panels = []
    for s in grid.stacks:
        roles = grid.roles[s] or ("(none kept)",)
        cells = {}
        for i, layer in enumerate(grid.layers[s]):
            for j, r in enumerate(roles):
                kinds = grid.cell(s, layer, r)
                if kinds:
                    fills = [_light(kind_colour(k, grid.kinds)) for k in kinds]
                    cells[(i, j)] = (fills, cell_label(kinds), _text_colour(fills))
        name = (f"{s} ({grid.n_layers[s]} layers)" if len(grid.stacks) > 1
                else "kept modules: kind code + rank")
        panels.append(_Panel(name, roles, _y_labels(grid, s), cells,
                             _col_width(c[1] for c in cells.values()),
                             _boundaries(grid.layers[s], grid.n_layers[s])))
    legend_w = (max(_text_width(f"{_code(k)} = {k}", 7.5) for k in grid.kinds) + 0.55
                if grid.kinds else 0.2)
    fig, axes, anchor = _heatmap_panels(ax, [panels], legend_w, structure_title(grid))
    if grid.kinds:
        _kind_legend(fig, grid.kinds, anchor)
    return _result(axes)


def _plot_per_kind(grid: StructureGrid, ax, average: bool):
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    # Blues without its white end, so that a module kept once in many still shows
    blues = colormaps["Blues"]
    cmap = ListedColormap([blues(0.15 + 0.85 * i / 255) for i in range(256)], name="kept")
    rows = []
    for s in grid.stacks:
        row = []
        for kind in grid.kinds:
            roles = grid.roles_of(s, kind)
            if not roles:
                continue
            max_rank = max(v for k, v in grid.rank.items() if k[3] == kind)
            cells = {}
            for i, layer in enumerate(grid.layers[s]):
                for j, r in enumerate(roles):
                    key = (s, layer, r, kind)
                    if key not in grid.keep:
                        continue
                    rank, keep = grid.rank[key], grid.keep[key]
                    ranked = kind in RANKED_KINDS or abs(rank - 1) > 1e-9
                    text = f"{rank:.2g}" if ranked else ""
                    if average:
                        colour, tcol = cmap(keep), "white" if keep > 0.55 else "black"
                    else:
                        # larger ranks darker, on a log scale (ranks are mostly powers of 2):
                        # from 60% white (rank 1) to the kind's own colour (largest rank)
                        frac = math.log(rank) / math.log(max_rank) if max_rank > 1 else 0.5
                        colour = _light(kind_colour(kind, grid.kinds), 0.6 * (1 - frac))
                        tcol = _text_colour([colour])
                    cells[(i, j)] = ([colour], text, tcol)
            name = f"{kind} ({_code(kind)})"
            row.append(_Panel(f"{s}: {name}" if len(grid.stacks) > 1 else name, roles,
                              _y_labels(grid, s), cells, _col_width(c[1] for c in cells.values()),
                              _boundaries(grid.layers[s], grid.n_layers[s])))
        if row:
            rows.append(row)
    if not rows:  # nothing kept: the combined plot shows the empty grid
        return plot_structure(grid, ax, mode="combined")
    title = structure_title(grid)
    if average:
        title += ("\ncolour: fraction of the structures keeping the module (white: none)"
                  " · number: mean rank when kept")
    else:
        fixed = [k for k in grid.kinds if k not in RANKED_KINDS
                 and all(abs(v - 1) < 1e-9 for key, v in grid.rank.items() if key[3] == k)]
        title += "\nnumber and shade: rank" + (
            f" ({', '.join(fixed)}: rank 1, not written)" if fixed else "")
    fig, axes, anchor = _heatmap_panels(ax, rows, 1.1 if average else 0.1, title)
    if average:
        _colour_bar(fig, anchor, cmap, "fraction kept")
    return _result(axes)


def plot_average(grid: StructureGrid, ax=None):
    """Draw an averaged structure (``average_grid``): one panel per (stack, kind), each cell
    shaded by the fraction of structures keeping the module, labelled with its mean rank."""
    return _plot_per_kind(grid, ax, average=True)


def plot_gates(grid: GateGrid, ax=None):
    """Draw gate probabilities: one panel per (stack, kind), cells coloured by p on a fixed
    0..1 scale and labelled with it; blank cells have no candidate. Returns Axes (or array)."""
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    rows = []
    for s in grid.stacks:
        row = []
        for kind in grid.kinds:
            roles = grid.roles_of(s, kind)
            if not roles:
                continue
            cells = {}
            for i, layer in enumerate(grid.layers[s]):
                for j, r in enumerate(roles):
                    p = grid.p.get((s, layer, r, kind))
                    if p is not None:
                        cells[(i, j)] = ([cmap(p)], f"{p:.2f}", "black" if p > 0.6 else "white")
            row.append(_Panel(f"{s}: {kind}" if len(grid.stacks) > 1 else kind, roles,
                              _y_labels(grid, s), cells, _col_width(["0.00"]),
                              _boundaries(grid.layers[s], grid.n_layers[s])))
        if row:
            rows.append(row)
    if not rows:
        raise StructureError("no gate probabilities to plot")
    n_cand, n_open = sum(grid.count.values()), sum(grid.n_open.values())
    title = (f"gate probabilities: {grid.agg} p of each cell's candidates · "
             f"{n_open} of {n_cand} candidates have p > 0.5")
    fig, axes, anchor = _heatmap_panels(ax, rows, 0.9, title)
    _colour_bar(fig, anchor, cmap, f"{grid.agg} p")
    return _result(axes)


def plot_trajectory(traj: Trajectory, axes=None, title: str | None = None):
    """Draw a search (or retrain) history on a 2x2 grid: losses (eval metric on a twin axis),
    expected parameters against the budget, the shift b (or the learning rate of a retrain
    run), and gates with p > 0.5 (entropy on a twin axis). Panels without data say so.

    Args:
        axes: four Axes (a 2x2 array or a flat sequence); None draws a new figure.
        title: figure title (only when drawing a new figure).
    Returns:
        the 2x2 array of Axes.
    """
    import numpy as np
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if axes is None:
        fig = _new_figure(12.0, 7.5)
        axes = fig.subplots(2, 2, sharex=True)
        fig.set_layout_engine("constrained")
        if title:
            fig.suptitle(title, fontsize=10)
    axes = np.asarray(axes, dtype=object).reshape(2, 2)
    blue, red, green, purple, orange = "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00"

    def plot(a, s: Series, label, colour, **kw):
        if not s.step:
            return []
        kw.setdefault("lw", 1.2)
        return a.plot(s.step, s.value, label=label, color=colour, **kw)

    def twin(a, ylabel):
        t = a.twinx()
        t.set_ylabel(ylabel, fontsize=8.5)
        t.tick_params(labelsize=8)
        return t

    def finish(a, name, handles, what):
        a.set_title(name, fontsize=9.5, loc="left")
        if handles:
            # above the panel, right of its title: never on top of the curves
            a.legend(handles=handles, loc="lower right", bbox_to_anchor=(1.0, 1.0),
                     ncol=len(handles), fontsize=7.5, frameon=False, borderaxespad=0.2,
                     handlelength=1.5, columnspacing=1.0)
        else:
            a.text(0.5, 0.5, f"no {what} recorded", transform=a.transAxes, ha="center",
                   va="center", color="#777777", fontsize=9)
            a.set_yticks([])

    # 1. losses, the main eval metric on a twin axis
    a = axes[0, 0]
    h = (plot(a, traj.loss_w, "loss D_w", blue) + plot(a, traj.loss_alpha, "loss D_alpha", red)
         + plot(a, traj.loss, "train loss", green))
    if h:
        a.set_ylabel("loss", fontsize=8.5)
    if traj.eval_main.step:
        h += twin(a, "eval: main metric").plot(*traj.eval_main, "o-", color="#222222", ms=3,
                                               lw=1, label="eval main")
    finish(a, "losses", h, "losses")

    # 2. expected parameters against the budget; from 0 so that tiny solver noise looks tiny
    a = axes[0, 1]
    h = plot(a, traj.expected_params, "Σ n_i p_i", blue)
    b = traj.budget
    if b.step:
        if len(set(b.value)) == 1:
            h.append(a.axhline(b.value[0], color=red, ls="--", lw=1.2, label="budget"))
        else:
            h += plot(a, b, "budget", red, ls="--")
    if h:
        top = max(traj.expected_params.value + b.value)
        a.set_ylim(0, 1.12 * top)
        a.set_ylabel("parameters", fontsize=8.5)
        a.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _human(v)))
        if traj.expected_params.step and b.step:
            bud = dict(zip(*b))
            gaps = [abs(v - bud.get(s, b.value[-1])) for s, v in zip(*traj.expected_params)]
            ref = b.value[-1] or 1
            a.text(0.98, 0.04, f"largest |Σ n_i p_i − budget|: {max(gaps):,.0f} "
                   f"({_pct(max(gaps) / ref)})", transform=a.transAxes, ha="right",
                   va="bottom", fontsize=7.5, color="#444444")
    finish(a, "expected parameters", h, "expected parameters")

    # 3. shift b (search) or the learning rate (retrain)
    a = axes[1, 0]
    if traj.shift.step:
        h = plot(a, traj.shift, "shift b", purple)
        a.set_ylabel("shift b", fontsize=8.5)
        finish(a, "shift b of the global sigmoid", h, "shift")
    else:
        h = plot(a, traj.lr, "learning rate", purple)
        if h:
            a.set_ylabel("learning rate", fontsize=8.5)
            a.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        finish(a, "learning rate" if h else "shift b", h, "shift b")

    # 4. gates above 0.5, their entropy on a twin axis
    a = axes[1, 1]
    h = plot(a, traj.gates_open, "gates p > 0.5", green, drawstyle="steps-post")
    if h:
        a.set_ylabel("gates with p > 0.5", fontsize=8.5)
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
        a.set_ylim(bottom=0, top=max(1.0, max(traj.gates_open.value) * 1.1))  # a count: never below 0
    if traj.gate_entropy.step:
        h += plot(twin(a, "gate entropy"), traj.gate_entropy, "entropy", orange)
    finish(a, "gates", h, "gate statistics")

    for a in axes[1]:
        a.set_xlabel("step", fontsize=8.5)
    for a in axes.flat:
        a.grid(alpha=0.3)
        a.tick_params(labelsize=8, labelbottom=True)
    return axes


def plot_graph(graph, ax=None):
    """Draw ``structure_graph`` output: one row per layer (embeddings on top, output at the
    bottom), the residual stream left to right through each block's sublayers and down to the
    next layer, kept modules listed under the sublayer they modify. Deterministic layout
    (``graph_layout``); the figure grows with the model. Returns the Axes."""
    from matplotlib.lines import Line2D

    pos = graph_layout(graph)
    xs = [p[0] for p in pos.values()]
    ys = [p[1] for p in pos.values()]
    kinds = sorted({d["kind"] for _, d in graph.nodes(data=True) if d.get("type") == "module"},
                   key=_kind_key)
    multi = len(graph.graph["stacks"]) > 1
    legend = [(f"{_code(k)} = {k}", _light(kind_colour(k, kinds))) for k in kinds]
    legend.append(("block (its residual input)", "#3a3a3a"))
    if any(str(k).endswith(".block") for _, k in graph.nodes(data="role")):
        legend.append(("post = sequential adapter after the sublayer", None))
    if multi:
        legend.append(("encoder output, read by every x-attention", "cross"))
    # one inch per layout unit, so the text sizes fit the spacing at any model size
    w = max(xs) - min(xs) + 1.5
    h = max(ys) - min(ys) + 0.6
    width = max(w, 6.0)
    per_line = max(1, int(width // 2.2))
    legend_h = 0.2 * math.ceil(len(legend) / per_line) + 0.15
    title = graph.graph.get("title", "")
    title_h = 0.2 * (title.count("\n") + 1) + 0.15 if title else 0.0
    if ax is None:
        fig = _new_figure(width, h + legend_h + title_h)
        ax = fig.add_axes([0, 0, 1, h / (h + legend_h + title_h)])
        if title:
            fig.suptitle(title, fontsize=9, y=1 - 0.06 / fig.get_figheight(), va="top")
    x_min = min(xs) - 0.6 - (width - w) / 2
    ax.set_xlim(x_min, x_min + width)
    ax.set_ylim(min(ys) - 0.3, max(ys) + 0.3)
    ax.set_axis_off()
    nodes = graph.nodes
    half: dict[str, float] = {}

    def label(v):
        d = nodes[v]
        t = d["type"]
        if t == "block":
            return (d["stack"][:3] + " " if multi else "layer ") + str(d["layer"])
        if t == "module":
            role = d["role"]
            head, _, tail = role.partition(".")
            short = "post" if tail == "block" else ("" if head == "norm" else tail or role)
            code = KIND_CODES.get(d["kind"], d["kind"][:3])
            if d["kind"] in RANKED_KINDS or abs(d["rank"] - 1) > 1e-9:
                code += f"{d['rank']:g}"
            return f"{short} {code}".strip()
        return d["label"] + (f" ({d['stack'][:3]})" if multi and t in ("embed", "output") else "")

    styles = {"block": dict(fc="#3a3a3a", ec="#3a3a3a", color="white"),
              "embed": dict(fc="#3a3a3a", ec="#3a3a3a", color="white"),
              "output": dict(fc="#3a3a3a", ec="#3a3a3a", color="white"),
              "sublayer": dict(fc="#e4e4e4", ec="#9a9a9a", color="black"),
              "norm": dict(fc="#f7f7f7", ec="#b0b0b0", color="#444444")}
    for v, (x, y) in pos.items():
        d = nodes[v]
        text = label(v)
        if d["type"] == "module":
            fc = _light(kind_colour(d["kind"], kinds))
            st = dict(fc=fc, ec="none", color=_text_colour([fc]))
            ax.text(x + 0.06, y, text, ha="left", va="center", fontsize=6.5, color=st["color"],
                    bbox=dict(boxstyle="round,pad=0.18", fc=st["fc"], ec=st["ec"]), zorder=3)
        else:
            st = dict(styles[d["type"]], lw=0.6)
            if any(e == "cross" for _, _, e in graph.out_edges(v, data="type")) or any(
                    e == "cross" for _, _, e in graph.in_edges(v, data="type")):
                st.update(ec=_CROSS, lw=1.3)
            ax.text(x, y, text, ha="center", va="center", fontsize=7, color=st["color"],
                    bbox=dict(boxstyle="round,pad=0.25", fc=st["fc"], ec=st["ec"], lw=st["lw"]),
                    zorder=3)
            half[v] = _text_width(text, 7) / 2 + 0.07

    arrow = dict(arrowstyle="-|>", color="#777777", lw=0.8, mutation_scale=7,
                 shrinkA=0, shrinkB=0)
    for u, v, d in graph.edges(data=True):
        if u not in pos or v not in pos:
            continue
        (x1, y1), (x2, y2) = pos[u], pos[v]
        if d.get("type") == "delta":
            # a bracket: down from the sublayer along the left of its module list
            ax.plot([x2, x2, x2 + 0.05], [y1 - 0.1, y2, y2], color="#aaaaaa", lw=0.6, zorder=1)
        elif d.get("type") == "cross":
            continue  # drawn as blue frames: lines to every decoder layer would cross it all
        elif abs(y1 - y2) < 1e-9:  # along a row
            ax.annotate("", xy=(x2 - half[v], y2), xytext=(x1 + half[u], y1),
                        arrowprops=arrow, zorder=2)
        elif abs(x1 - x2) < 1e-9:  # straight down (embeddings -> first block)
            ax.annotate("", xy=(x2, y2 + 0.09), xytext=(x1, y1 - 0.09), arrowprops=arrow,
                        zorder=2)
        else:  # to the next layer: right, down to the gap under the row, left, down
            xr = x1 + half[u] + 0.15
            yg = y2 + 0.75 * _GY
            ax.plot([x1 + half[u], xr, xr, x2], [y1, y1, yg, yg], color="#777777", lw=0.8,
                    zorder=1)
            ax.annotate("", xy=(x2, y2 + 0.09), xytext=(x2, yg), arrowprops=arrow, zorder=2)
    handles = []
    for text, colour in legend:
        if colour == "cross":
            handles.append(Line2D([], [], marker="s", ls="", ms=7, mfc="white", mec=_CROSS,
                                  mew=1.3, label=text))
        elif colour is None:
            handles.append(Line2D([], [], ls="", label=text))
        else:
            handles.append(Line2D([], [], marker="s", ls="", ms=7, mec="none", mfc=colour,
                                  label=text))
    left = (min(xs) - 0.6 - x_min) / width
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(left, 1.0), ncol=per_line,
              fontsize=7, frameon=False, handlelength=1.0, columnspacing=1.2,
              borderaxespad=0.1)
    return ax


# --------------------------------------------------------------------------- entry point


class _Job(NamedTuple):
    stem: str                         # file name without extension
    where: Path                       # default folder (next to the input)
    rel: Path                         # sub-folder under ``out`` (stage folders)
    label: str                        # input label, for several inputs into one ``out``
    priority: int                     # lower = the main plot, drawn alone for a file ``out``
    draw: Callable[[], Any]           # returns the Axes (or array) drawn on a new figure


def _stage_jobs(folder: Path, rel: Path, label: str) -> tuple[list[_Job], dict | None]:
    """Plots of one folder's structure.json, alphas.csv and history.jsonl (those present)."""
    jobs: list[_Job] = []
    structure = None
    n_layers = None
    if (folder / "structure.json").is_file():
        structure = read_structure(folder / "structure.json")
        jobs += _structure_jobs(structure, "structure", folder, rel, label)
        n_layers = _modules_of(structure)[0]
    if (folder / "alphas.csv").is_file():
        grid = gate_grid(read_alphas(folder / "alphas.csv"), n_layers=n_layers)
        if grid.p:
            jobs.append(_Job("gates", folder, rel, label, 2, lambda g=grid: plot_gates(g)))
    if (folder / "history.jsonl").is_file():
        traj = trajectory(read_history(folder / "history.jsonl"))
        what = ("search" if traj.shift.step or traj.loss_alpha.step
                else "retrain" if traj.loss.step else "training")
        name = f"{what} trajectory · {label}" + (f" ({rel.as_posix()}/)" if rel.parts else "")
        jobs.append(_Job("trajectory", folder, rel, label, 3,
                         lambda t=traj, n=name: plot_trajectory(t, title=n)))
    return jobs, structure


def _structure_jobs(structure: dict, stem: str, where: Path, rel: Path, label: str) -> list[_Job]:
    grid = structure_grid(structure)
    return [_Job(stem, where, rel, label, 1, lambda: plot_structure(grid)),
            _Job(f"{stem}_per_kind", where, rel, label, 4,
                 lambda: plot_structure(grid, mode="per-kind")),
            _Job(f"{stem}_graph", where, rel, label, 5,
                 lambda: plot_graph(structure_graph(structure)))]


def _input_jobs(path: Path) -> tuple[list[_Job], dict | None]:
    label = path.stem if path.is_file() and path.stem != "structure" else (
        path.parent.name if path.is_file() else path.resolve().name)
    if path.is_file():
        s = read_structure(path)
        return _structure_jobs(s, path.stem, path.parent, Path(), label), s
    jobs, structure = _stage_jobs(path, Path(), label)
    for stage in STAGES:
        if (path / stage).is_dir():
            more, s = _stage_jobs(path / stage, Path(stage), label)
            jobs += more
            if structure is None:  # the top folder's, else search's, else retrain's
                structure = s
    if not jobs:
        raise StructureError(f"{path}: no structure.json, alphas.csv or history.jsonl "
                             f"(nor in {'/, '.join(STAGES)}/)")
    return jobs, structure


def _save(fig, path: Path, fmt: str) -> None:
    import matplotlib

    buf = io.BytesIO()
    # fixed ids and no date, so that re-plotting the same run gives the same SVG
    with matplotlib.rc_context({"svg.hashsalt": "s3pet"}):
        fig.savefig(buf, format=fmt, dpi=DPI, bbox_inches="tight", pad_inches=0.12,
                    facecolor="white", metadata={"Date": None} if fmt in ("svg", "pdf") else None)
    atomic_write_bytes(path, buf.getvalue())


def plot_paths(inputs: Sequence[str | os.PathLike] | str | os.PathLike,
               out: str | os.PathLike | None = None,
               formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """Draw every plot the inputs allow and save them; returns the files written.

    Args:
        inputs: run directories (their structure.json, alphas.csv, history.jsonl and those of
            their ``search/`` and ``retrain/`` folders) or structure files. With two or more
            structures their average is drawn too (``average.*``, in the inputs' common folder).
        out: None writes next to each input; a folder collects everything (one sub-folder per
            input when there are several); a file path (``.png``/``.svg``/``.pdf``) draws only
            the main plot there: the average for several inputs, else the structure heatmap
            (else the gates, else the trajectory).
        formats: file formats for folder outputs.

    Raises:
        ConfigError: a missing input, no input, an unknown format.
        StructureError: an input is not a structure / run directory, or holds a malformed file.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    paths = [Path(p) for p in inputs]
    if not paths:
        raise ConfigError("nothing to plot: no inputs given")
    formats = tuple(f.lower().lstrip(".") for f in formats)
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"unknown plot format {', '.join(bad) or '(none)'}; "
                          f"use {', '.join(FORMATS)}")
    for p in paths:
        if not p.exists():
            raise ConfigError(f"no such file or directory: {p}")

    jobs: list[_Job] = []
    structures = []
    labels: dict[str, int] = {}
    for p in paths:
        more, s = _input_jobs(p)
        label = more[0].label
        labels[label] = labels.get(label, 0) + 1
        if labels[label] > 1:  # two inputs with one name (runs/a/x, runs/b/x)
            label = f"{label}_{labels[label]}"
            more = [j._replace(label=label) for j in more]
        jobs += more
        if s is not None:
            structures.append(s)
    if len(structures) >= 2:
        common = Path(os.path.commonpath([str((p if p.is_dir() else p.parent).resolve())
                                          for p in paths]))
        avg = average_grid(structures)
        jobs.append(_Job("average", common, Path(), "", 0, lambda: plot_average(avg)))

    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix.lower().lstrip(".") in FORMATS \
            and not out_path.is_dir():
        plan = [(min(jobs, key=lambda j: j.priority), [out_path])]
    else:
        several = len(paths) > 1
        plan = []
        for j in jobs:
            folder = j.where if out_path is None else (
                out_path / (j.label if several and j.label else "") / j.rel)
            plan.append((j, [folder / f"{j.stem}.{f}" for f in formats]))

    written = []
    for job, files in plan:  # one figure alive at a time
        result = job.draw()
        fig = (result.flat[0] if hasattr(result, "flat") else result).figure
        for path in files:
            _save(fig, path, path.suffix.lower().lstrip("."))
            written.append(path)
            logger.info("wrote %s", path)
    return written
