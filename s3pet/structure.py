"""The structure file: what was found, as versioned JSON (schema ``s3pet.structure/v1``).

``{"schema", "base_model": {name_or_path, model_type, layers, stacks, n_params}, "space",
"budget": {params, fraction}, "n_params", "modules": [{site, stack, layer, role, kind, rank,
n_params, score, params}], "provenance": {...}}``. ``params`` holds the kind's
hyper-parameters (e.g. LoRA alpha, adapter activation) so the module can be rebuilt exactly.

Validated on load (schema, fields, kinds, sums, budget) and again against a model when
applied (site present with the right role and size, parameter counts that match).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import s3pet
from s3pet.deltas import KINDS
from s3pet.errors import StructureError
from s3pet.inject import DeltaSet
from s3pet.io import write_json
from s3pet.models import count_params, model_name
from s3pet.space import ModuleSpec, discover_sites, stack_depths

SCHEMA = "s3pet.structure/v1"
_MODULE_FIELDS = ("site", "stack", "layer", "role", "kind", "rank", "n_params")


@dataclass
class Structure:
    """A derived PET structure: which module kind sits where, at what rank."""

    base_model: dict
    space: str
    budget: dict
    modules: list[dict]
    provenance: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return sum(int(m["n_params"]) for m in self.modules)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "base_model": self.base_model, "space": self.space, "budget": self.budget,
                "n_params": self.n_params, "modules": self.modules, "provenance": self.provenance}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    def counts_by_kind(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for m in self.modules:
            d = out.setdefault(m["kind"], {"modules": 0, "params": 0, "rank": 0})
            d["modules"] += 1
            d["params"] += int(m["n_params"])
            d["rank"] += int(m["rank"])
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
    return Structure(base_model_record(backbone), space, dict(budget), modules, prov)


def from_dict(raw: Any, source: str = "<dict>") -> Structure:
    """Validate a structure dict (everything that can be checked without the model)."""
    where = f"structure {source}"
    if not isinstance(raw, dict):
        raise StructureError(f"{where}: must be a JSON object")
    if raw.get("schema") != SCHEMA:
        raise StructureError(f"{where}: schema is {raw.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("base_model", "budget", "modules"):
        if key not in raw:
            raise StructureError(f"{where}: missing field '{key}'")
    if not isinstance(raw["modules"], list):
        raise StructureError(f"{where}: 'modules' must be a list")
    seen = set()
    for i, m in enumerate(raw["modules"]):
        at = f"{where}: modules[{i}]"
        if not isinstance(m, dict):
            raise StructureError(f"{at}: must be an object")
        missing = [f for f in _MODULE_FIELDS if f not in m]
        if missing:
            raise StructureError(f"{at}: missing field(s) {missing}")
        if m["kind"] not in KINDS:
            raise StructureError(f"{at} ({m['site']}): unknown kind {m['kind']!r}; known: {', '.join(sorted(KINDS))}")
        if not isinstance(m["rank"], int) or m["rank"] < 1:
            raise StructureError(f"{at} ({m['site']}): rank must be a positive integer, got {m['rank']!r}")
        key = (m["site"], m["role"], m["kind"])
        if key in seen:
            raise StructureError(f"{at}: {m['kind']} at {m['site']} is listed twice")
        seen.add(key)
        m.setdefault("params", {})
        m.setdefault("score", None)
    total = sum(int(m["n_params"]) for m in raw["modules"])
    if "n_params" in raw and int(raw["n_params"]) != total:
        raise StructureError(f"{where}: n_params is {raw['n_params']} but the modules add up to {total}")
    cap = raw["budget"].get("params") if isinstance(raw["budget"], dict) else None
    if cap is not None and total > int(cap):
        raise StructureError(f"{where}: modules use {total} parameters, over the budget of {cap}")
    return Structure(raw["base_model"], str(raw.get("space", "")), raw["budget"], raw["modules"],
                     raw.get("provenance", {}))


def load(path: str | Path) -> Structure:
    """Read and validate a structure file; StructureError names what is wrong."""
    p = Path(path)
    if p.is_dir() and (p / "structure.json").is_file():
        p = p / "structure.json"
    if not p.is_file():
        raise StructureError(f"structure file not found: {path}")
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise StructureError(f"structure {p} is not valid JSON: {e}") from e
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
        if site.host not in kind.hosts:
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
    return specs


def apply(structure: Structure, backbone: nn.Module) -> DeltaSet:
    """Attach freshly initialised modules of the structure (no gates) to a frozen backbone."""
    specs = to_specs(structure, backbone)
    for p in backbone.parameters():
        p.requires_grad_(False)
    return DeltaSet(specs, gated=False).attach(backbone)
