"""The structure file: what was found, as versioned JSON (schema ``s3pet.structure/v1``).

``{"schema", "base_model": {name_or_path, model_type, layers, stacks, n_params}, "space",
"budget": {params, fraction}, "n_params", "modules": [{site, stack, layer, role, kind, rank,
n_params, score, params}], "shared": [{name, kind, shape, n_params}], "provenance": {...}}``.
``params`` holds the kind's hyper-parameters (e.g. LoRA alpha, adapter activation) so the
module can be rebuilt exactly. ``shared`` (present only when the modules share tensors, e.g.
Compacter's slow weights) lists each shared tensor once; ``n_params`` counts them once.

Validated on load (schema, fields, kinds, sums, budget) and again against a model when
applied (site present with the right role and size, parameter counts that match).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import s3pet
from s3pet.deltas import KINDS
from s3pet.deltas.base import MAX_UNITS
from s3pet.errors import S3petError, StructureError
from s3pet.inject import DeltaSet
from s3pet.io import write_json
from s3pet.models import count_params, model_name
from s3pet.space import ROLES, ModuleSpec, discover_sites, shared_tensors, stack_depths

SCHEMA = "s3pet.structure/v1"
MAX_LAYERS = 10_000  # far deeper than any model; a plot draws a row per layer
MAX_SHARED_DIM = 1 << 20  # wider than any layer; bounds what a shared tensor can allocate
_MODULE_FIELDS = ("site", "stack", "layer", "role", "kind", "rank", "n_params")


@dataclass
class Structure:
    """A derived PET structure: which module kind sits where, at what rank."""

    base_model: dict
    space: str
    budget: dict
    modules: list[dict]
    provenance: dict = field(default_factory=dict)
    shared: list[dict] = field(default_factory=list)  # tensors shared by several modules, each once

    @property
    def n_params(self) -> int:
        return sum(m["n_params"] for m in self.modules) + sum(t["n_params"] for t in self.shared)

    def to_dict(self) -> dict:
        d = {"schema": SCHEMA, "base_model": self.base_model, "space": self.space, "budget": self.budget,
             "n_params": self.n_params, "modules": self.modules}
        if self.shared:
            d["shared"] = self.shared
        return {**d, "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def counts_by_kind(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for m in self.modules:
            d = out.setdefault(m["kind"], {"modules": 0, "params": 0, "rank": 0})
            d["modules"] += 1
            d["params"] += int(m["n_params"])
            d["rank"] += int(m["rank"])
        for t in self.shared:  # paid once, by the kind that shares it
            out[t["kind"]]["params"] += int(t["n_params"])
        return out

    def summary(self) -> str:
        """One line: modules per kind, parameters, share of backbone, budget use."""
        kinds = ", ".join(f"{k} x{v['modules']}" for k, v in sorted(self.counts_by_kind().items()))
        bb = self.base_model.get("n_params") or 0
        share = f"{100 * self.n_params / bb:.4f}% of backbone" if bb else ""
        use = f", {100 * self.n_params / self.budget['params']:.1f}% of budget" if self.budget.get("params") else ""
        return f"{len(self.modules)} modules ({kinds}); {self.n_params:,} params, {share}{use}"


def base_model_record(backbone: nn.Module, sites=None) -> dict:
    sites = sites if sites is not None else discover_sites(backbone)
    depths = stack_depths(sites)
    return {"name_or_path": model_name(backbone), "model_type": getattr(backbone.config, "model_type", ""),
            "layers": max(depths.values()), "stacks": depths, "n_params": count_params(backbone)}


def from_specs(kept: list[tuple[ModuleSpec, float]], backbone: nn.Module, space: str, budget: dict,
               provenance: dict | None = None) -> Structure:
    """Build a Structure from derived module specs and their scores."""
    modules = []
    for spec, score in kept:
        s = spec.site
        modules.append({"site": s.path, "stack": s.stack, "layer": s.layer, "role": s.role, "kind": spec.kind,
                        "rank": spec.units, "n_params": spec.n_params, "score": None if score is None else round(float(score), 6),
                        "params": spec.params})
    prov = {"s3pet_version": s3pet.__version__, **(provenance or {})}
    return Structure(base_model_record(backbone), space, dict(budget), modules, prov,
                     shared_records([spec for spec, _ in kept]))


def shared_records(specs: list[ModuleSpec]) -> list[dict]:
    """The ``shared`` entries of a structure of ``specs``: each shared tensor once."""
    return [{"name": name, "kind": kind, "shape": list(shape), "n_params": math.prod(shape)}
            for name, (kind, shape) in shared_tensors(specs).items()]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _need(cond: bool, where: str, what: str, value: Any) -> None:
    if not cond:
        shown = repr(value)
        raise StructureError(f"{where}: {what}, got {shown[:60] + '...' if len(shown) > 60 else shown}")


def _check_base_model(bm: Any, where: str) -> None:
    at = f"{where}: base_model"
    _need(isinstance(bm, dict), at, "must be an object", bm)
    for key, ok, what in (("name_or_path", lambda v: isinstance(v, str), "a string"),
                          ("model_type", lambda v: isinstance(v, str), "a string"),
                          ("layers", lambda v: _is_int(v) and 1 <= v <= MAX_LAYERS, f"an integer in [1, {MAX_LAYERS}]"),
                          ("n_params", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
                          ("stacks", lambda v: isinstance(v, dict) and v and all(
                              isinstance(k, str) and k and _is_int(n) and 1 <= n <= MAX_LAYERS for k, n in v.items()),
                           f"an object of stack name -> layer count in [1, {MAX_LAYERS}]")):
        if key not in bm:
            raise StructureError(f"{at}: missing field '{key}'")
        _need(ok(bm[key]), f"{at}.{key}", f"must be {what}", bm[key])


def _check_module(m: Any, at: str, stacks: dict[str, int]) -> None:
    _need(isinstance(m, dict), at, "must be an object", m)
    missing = [f for f in _MODULE_FIELDS if f not in m]
    if missing:
        raise StructureError(f"{at}: missing field(s) {missing}")
    unknown = set(m) - set(_MODULE_FIELDS) - {"score", "params"}
    if unknown:
        raise StructureError(f"{at}: unknown field(s) {sorted(unknown)}")
    _need(isinstance(m["site"], str) and m["site"], f"{at}.site", "must be a non-empty string", m["site"])
    at = f"{at} ({m['site']})"
    _need(m["kind"] in KINDS if isinstance(m["kind"], str) else False, f"{at}.kind",
          f"must be a known kind ({', '.join(sorted(KINDS))})", m["kind"])
    _need(isinstance(m["role"], str) and m["role"] in ROLES, f"{at}.role", "must be a known role", m["role"])
    _need(isinstance(m["stack"], str) and m["stack"] in stacks, f"{at}.stack",
          f"must be one of base_model.stacks ({', '.join(stacks)})", m["stack"])
    depth = stacks[m["stack"]]
    # -1: a norm before the blocks (embeddings); depth: the final norm after them.
    _need(_is_int(m["layer"]) and -1 <= m["layer"] <= depth, f"{at}.layer", f"must be an integer in [-1, {depth}]",
          m["layer"])
    _need(_is_int(m["rank"]) and 1 <= m["rank"] <= MAX_UNITS, f"{at}.rank",
          f"must be a positive integer (at most {MAX_UNITS})", m["rank"])
    _need(_is_int(m["n_params"]) and m["n_params"] >= 1, f"{at}.n_params", "must be a positive integer",
          m["n_params"])
    score = m.get("score")
    _need(score is None or (_is_num(score) and 0 <= score <= 1), f"{at}.score", "must be null or a number in [0, 1]",
          score)
    params = m.get("params", {})
    _need(isinstance(params, dict), f"{at}.params", "must be an object", params)
    try:
        KINDS[m["kind"]].check_params(dict(params))
    except S3petError as e:
        raise StructureError(f"{at}.params: {e}") from e


def from_dict(raw: Any, source: str = "<dict>") -> Structure:
    """Validate a structure dict (everything that can be checked without the model).

    Every field has its JSON type (no coercion: ``"64"`` or ``32.0`` is not a count), counts are
    in range and add up, layers lie in their stack. The input is not modified. Raises
    StructureError naming the file and the field.
    """
    where = f"structure {source}"
    if not isinstance(raw, dict):
        raise StructureError(f"{where}: must be a JSON object")
    if raw.get("schema") != SCHEMA:
        raise StructureError(f"{where}: schema is {raw.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("base_model", "budget", "modules"):
        if key not in raw:
            raise StructureError(f"{where}: missing field '{key}'")
    raw = copy.deepcopy(raw)
    _check_base_model(raw["base_model"], where)
    _need(isinstance(raw.get("space", ""), str), f"{where}: space", "must be a string", raw.get("space"))
    budget = raw["budget"]
    _need(isinstance(budget, dict), f"{where}: budget", "must be an object", budget)
    cap = budget.get("params")
    _need(cap is None or (_is_int(cap) and cap >= 0), f"{where}: budget.params", "must be null or an integer >= 0", cap)
    frac = budget.get("fraction")
    _need(frac is None or (_is_num(frac) and frac >= 0), f"{where}: budget.fraction", "must be null or a number >= 0",
          frac)
    _need(isinstance(raw.get("provenance", {}), dict), f"{where}: provenance", "must be an object",
          raw.get("provenance"))
    if not isinstance(raw["modules"], list):
        raise StructureError(f"{where}: 'modules' must be a list")
    stacks = raw["base_model"]["stacks"]
    seen = set()
    for i, m in enumerate(raw["modules"]):
        at = f"{where}: modules[{i}]"
        _check_module(m, at, stacks)
        key = (m["site"], m["role"], m["kind"])
        if key in seen:
            raise StructureError(f"{at}: {m['kind']} at {m['site']} is listed twice")
        seen.add(key)
        m.setdefault("params", {})
        m.setdefault("score", None)
    shared = raw.get("shared", [])
    _need(isinstance(shared, list), f"{where}: shared", "must be a list", shared)
    names = set()
    for i, t in enumerate(shared):
        _check_shared(t, f"{where}: shared[{i}]")
        _need(t["name"] not in names, f"{where}: shared[{i}].name", "is listed twice", t["name"])
        names.add(t["name"])
    total = sum(m["n_params"] for m in raw["modules"]) + sum(t["n_params"] for t in shared)
    if "n_params" in raw:
        _need(_is_int(raw["n_params"]), f"{where}: n_params", "must be an integer", raw["n_params"])
        if raw["n_params"] != total:
            raise StructureError(f"{where}: n_params is {raw['n_params']} but the modules add up to {total}")
    if cap is not None and total > cap:
        raise StructureError(f"{where}: modules use {total} parameters, over the budget of {cap}")
    return Structure(raw["base_model"], raw.get("space", ""), budget, raw["modules"], raw.get("provenance", {}),
                     shared)


def _check_shared(t: Any, at: str) -> None:
    _need(isinstance(t, dict) and set(t) == {"name", "kind", "shape", "n_params"}, at,
          "must be an object with exactly name, kind, shape and n_params", t)
    _need(isinstance(t["name"], str) and t["name"], f"{at}.name", "must be a non-empty string", t["name"])
    _need(isinstance(t["kind"], str) and t["kind"] in KINDS, f"{at}.kind", "must be a known kind", t["kind"])
    shape = t["shape"]
    _need(isinstance(shape, list) and 1 <= len(shape) <= 4 and all(_is_int(x) and 1 <= x <= MAX_SHARED_DIM
                                                                   for x in shape),
          f"{at}.shape", f"must be a list of 1 to 4 integers in [1, {MAX_SHARED_DIM}]", shape)
    _need(_is_int(t["n_params"]) and t["n_params"] == math.prod(shape), f"{at}.n_params",
          f"must be the product of the shape ({math.prod(shape)})", t["n_params"])


def load(path: str | Path) -> Structure:
    """Read and validate a structure file (any bytes); StructureError names what is wrong."""
    p = Path(path)
    if p.is_dir() and (p / "structure.json").is_file():
        p = p / "structure.json"
    if not p.is_file():
        raise StructureError(f"structure file not found: {path}")
    try:
        raw = json.loads(p.read_bytes().decode("utf-8"))
    except OSError as e:
        raise StructureError(f"structure {p} cannot be read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise StructureError(f"structure {p} is not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise StructureError(f"structure {p} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise StructureError(f"structure {p} is nested too deeply to be a structure") from e
    return from_dict(raw, str(p))


def to_specs(structure: Structure, backbone: nn.Module) -> list[ModuleSpec]:
    """Match the structure's modules to this backbone's sites; StructureError on any mismatch."""
    sites = {(s.path, s.role): s for s in discover_sites(backbone)}
    specs = []
    for i, m in enumerate(structure.modules):
        at = f"modules[{i}] ({m['kind']} at {m['site']})"
        site = sites.get((m["site"], m["role"]))
        if site is None:
            raise StructureError(f"{at}: no such site with role {m['role']} in this model "
                                 f"({getattr(backbone.config, 'model_type', '?')}); was the structure made for another model?")
        kind = KINDS[m["kind"]]
        if not kind.fits(site):
            raise StructureError(f"{at}: kind {m['kind']} cannot attach to a {site.host} site")
        try:
            params = kind.check_params(dict(m.get("params") or {}))
        except Exception as e:
            raise StructureError(f"{at}: bad params: {e}") from e
        spec = ModuleSpec(site, m["kind"], params, int(m["rank"]))
        if spec.n_params != int(m["n_params"]):
            raise StructureError(f"{at}: n_params is {m['n_params']} but a rank-{m['rank']} {m['kind']} "
                                 f"there has {spec.n_params} in this model")
        specs.append(spec)
    want = shared_records(specs)
    if sorted(want, key=lambda t: t["name"]) != sorted(structure.shared, key=lambda t: t["name"]):
        listed = ", ".join(f"{t['name']}{tuple(t['shape'])}" for t in structure.shared) or "none"
        needed = ", ".join(f"{t['name']}{tuple(t['shape'])}" for t in want) or "none"
        raise StructureError(f"shared tensors listed ({listed}) are not those its modules share in this model "
                             f"({needed})")
    return specs


def apply(structure: Structure, backbone: nn.Module) -> DeltaSet:
    """Attach freshly initialised modules of the structure (no gates) to a frozen backbone."""
    specs = to_specs(structure, backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return DeltaSet(specs, gated=False).attach(backbone)
