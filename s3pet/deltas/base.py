"""The module-kind interface and registry.

A *kind* (LoRA, adapter, BitFit, ...) knows which sites it can attach to, how many gateable
units one module of it has at a site (LoRA: rank-1 components; adapters: bottleneck units;
BitFit/LNFit: one), the exact parameter count of one unit, and how to build the module. A
built module (``Delta``) maps ``(x, y, gate) -> y'``: ``x`` the host's input, ``y`` its output
so far, ``gate`` a vector with one value per unit (``None`` when the module is kept whole, as
after derivation).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from s3pet import accel
from s3pet.errors import ConfigError

if TYPE_CHECKING:
    from s3pet.space import Site

KINDS: dict[str, "DeltaKind"] = {}
# Units (a rank, a bottleneck) beyond this exceed the width of any transformer s3pet targets; a
# larger number in a space or structure file is a typo, and would allocate without bound.
MAX_UNITS = 65_536


def register(cls):
    """Class decorator: instantiate a kind and file it under its ``name``."""
    KINDS[cls.name] = cls()
    return cls


def _elementwise(rank: int) -> bool:
    return rank <= accel.ELEMENTWISE_MAX_RANK and torch.compiler.is_compiling()


def project(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` for a thin ``w`` of shape (r, d): a matmul in eager mode; in a compiled
    graph, for small r, a multiply and a row sum, which the compiler fuses with the ops
    around it (a rank-1 matmul is one tiny kernel launch per site otherwise)."""
    if _elementwise(w.shape[0]):
        return (x.unsqueeze(-2) * w).sum(-1)
    return F.linear(x, w)


def expand(h: Tensor, w: Tensor) -> Tensor:
    """``h @ w.T`` for a thin ``w`` of shape (d, r): the counterpart of ``project``."""
    if _elementwise(w.shape[1]):
        return (h.unsqueeze(-1) * w.t()).sum(-2)
    return F.linear(h, w)


class Delta(nn.Module):
    """A built PET module at one site. Subclasses implement ``forward(x, y, gate)``."""

    kind: str = ""
    units: int = 1

    def forward(self, x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class DeltaKind(ABC):
    """One PET module kind."""

    name: str = ""
    hosts: tuple[str, ...] = ()  # which site hosts it attaches to: "linear", "norm", "block"
    stage: int = 1  # order at a host: 0 scales the base output, 1 adds in parallel, 2 sequential after
    defaults: dict = {}
    # Known-good AdamW learning rate for this kind on a frozen backbone (batch 32, linear
    # schedule, 6% warm-up): what retraining uses unless told otherwise (docs/benchmarks.md).
    lr: float = 1e-3

    def check_params(self, params: dict) -> dict:
        """Validate a space entry's hyper-parameters and fill defaults; ConfigError on a bad one."""
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ConfigError(f"unknown field(s) {sorted(unknown)} for kind '{self.name}'; "
                              f"allowed: {sorted(self.defaults) or 'none'}")
        out = {**self.defaults, **params}
        for k, v in params.items():
            d = self.defaults[k]
            if isinstance(d, bool) or not isinstance(d, (int, float)):
                continue
            if isinstance(d, int):  # unit counts and reductions are whole numbers
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_UNITS:
                    raise ConfigError(f"field '{k}' of kind '{self.name}' must be an integer in [1, {MAX_UNITS}], "
                                      f"got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"field '{k}' of kind '{self.name}' must be a positive finite number, got {v!r}")
        return out

    def max_units(self, site: "Site", params: dict) -> int:
        """How many gateable units a full module of this kind has at ``site``."""
        return 1

    @abstractmethod
    def unit_params(self, site: "Site", params: dict) -> int:
        """Exact number of trainable parameters of one unit at ``site``."""

    def param_count(self, site: "Site", params: dict, units: int) -> int:
        """Exact parameters of a module with ``units`` units (the derived rank)."""
        return units * self.unit_params(site, params)

    @abstractmethod
    def build(self, site: "Site", params: dict, units: int) -> Delta:
        """A freshly initialised module with ``units`` units."""
