"""The module-kind interface and registry.

A *kind* (LoRA, adapter, BitFit, ...) owns everything the rest of s3pet needs to know about
it, so that no other module tests kind names and a new kind is one file in ``deltas/``:

- where it goes: the site hosts it attaches to (``hosts``, ``fits``), its order at a host
  (``stage``), what input it reads (``reads``: the host's, or the sublayer's for parallel
  modules), whether the host recomputes a norm with it (``reweights_norm``), or whether it
  attaches to the host itself instead of its output (``attach``: prefix, in the attention call);
- its size: gateable units per module (LoRA: rank-1 components; adapters: bottleneck units;
  BitFit/LNFit: one), the exact parameter count of one unit, its hyper-parameters
  (``defaults``, ``check_params``) and its learning rate (``lr``); the tensors it shares
  with the other modules of its kind (``shared``, ``init_shared``: created once per
  ``DeltaSet`` and paid once, however many modules use them);
- its construction (``build``) and forward: a built module (``Delta``) maps
  ``(x, y, gate) -> y'``: ``x`` its input, ``y`` the host's output so far, ``gate`` a vector
  with one value per unit (``None`` when the module is kept whole, as after derivation);
  ``bind`` lets a module read its host once when attached (a sparse support chosen by the
  pretrained weight's magnitude); ``derived_params`` the hyper-parameters of a module made of
  some of its units (which units were kept matters when units differ in role);
  a kind with shared tensors gets them as a fourth argument, ``shared`` ({name: tensor});
- its export: how it folds into the backbone's weights (``fold``; ``merge_refusal`` says why
  not), which part of a peft adapter carries it (``peft_part``, ``peft_rank``, ``peft_fill``;
  ``peft_refusal`` says why not);
- how plots show it: ``code`` (the short name in cells), ``colour``, ``order``, ``ranked``.
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
    from s3pet.space import ModuleSpec, Site

KINDS: dict[str, "DeltaKind"] = {}
# Units (a rank, a bottleneck) beyond this exceed the width of any transformer s3pet targets; a
# larger number in a space or structure file is a typo, and would allocate without bound.
MAX_UNITS = 65_536


def register(cls):
    """Class decorator: instantiate a kind and file it under its ``name``."""
    KINDS[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    """Remove a kind from the registry (a kind defined for a test or a session)."""
    KINDS.pop(name, None)


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

    def kept_params(self) -> int:
        """The parameters this module keeps after training: what the budget counts and a retrain
        saves. Its trainable parameters can be more while it trains (prefix's MLP)."""
        return sum(p.numel() for p in self.parameters())

    def bake(self) -> None:
        """Reduce the module to the tensors it keeps (after training, before saving or loading
        saved weights). A no-op for every kind that trains what it keeps."""

    def forward(self, x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class DeltaKind(ABC):
    """One PET module kind."""

    name: str = ""
    hosts: tuple[str, ...] = ()  # which site hosts it attaches to: "linear", "norm", "block", "attention"
    stage: int = 1  # order at a host: 0 scales the base output, 1 adds in parallel, 2 sequential after
    defaults: dict = {}
    # Known-good AdamW learning rate for this kind on a frozen backbone (batch 32, linear
    # schedule, 6% warm-up): what retraining uses unless told otherwise (docs/benchmarks.md).
    lr: float = 1e-3
    reads: str = "host"  # the x a module gets: "host" (the host's input) or "sublayer" (the input of the sublayer a block site closes)
    reweights_norm: bool = False  # the norm host is recomputed with weight + module.weight_delta(gate)
    # False: a compiled search step does not carry this kind's gate gradient (measured against the
    # eager step), so a search holding it runs eagerly (``search.BiLevel``).
    compiles_gated: bool = True

    # Export. A kind that folds into its host's weights sets merge_refusal = None and defines
    # fold; one that a peft adapter carries sets peft_refusal = None and defines peft_part.
    merge_refusal: str | None = "no rule folds it into the backbone's weights"
    adds_bias: bool = False  # fold may create a bias where the host has none
    peft_refusal: str | None = "no peft counterpart"

    # Plots: the short code written in cells ("L2+B"), a fixed colour, the order of kinds in
    # legends and cells, and whether the rank (units) is searched and so always written.
    code: str = ""  # "" = the first three letters of the name
    colour: str = ""  # "" = a spare colour
    order: int = 100
    ranked: bool = False
    # Hand-designed baselines (``s3pet.baselines.kind_specs``): the integer hyper-parameter that
    # sizes a one-unit module (a prefix's length, a Kronecker or FacT rank), grown on every site
    # to fill a budget; None: a module's size is its units, or fixed.
    size_field: str | None = None

    def attach(self, host: nn.Module, delta: Delta, gate) -> object | None:
        """Attach ``delta`` to the ``host`` module itself; returns a handle with ``remove()``.

        ``gate()`` returns the module's gate (or None) at the time of a forward. The default,
        None, means the host's forward hook applies the module to the host's output (every
        kind but prefix, which acts inside the attention call)."""
        return None

    def fits(self, site: "Site") -> bool:
        """Whether a module of this kind can attach at ``site``."""
        return site.host in self.hosts

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

    def derived_params(self, params: dict, kept: list[bool]) -> dict:
        """Hyper-parameters of the module made of the ``kept`` units of a full one with
        ``params`` (one flag per unit, in unit order). Units of one role (rank-1 components,
        bottleneck units) are interchangeable, so by default only their number matters."""
        return dict(params)

    def first_units(self, site: "Site", params: dict, units: int) -> list[bool]:
        """Which units of the full module at ``site`` a hand-designed module of ``units`` units
        keeps (one flag per unit, for ``derived_params``): by default the first ones."""
        full = self.max_units(site, params)
        return [True] * units + [False] * (full - units)

    def bind(self, delta: Delta, host: nn.Module) -> None:
        """Called when ``delta`` is attached to ``host`` (the backbone's module): a module that
        depends on the frozen host (a support chosen by its weight) reads it here. No-op by default."""

    @abstractmethod
    def build(self, site: "Site", params: dict, units: int) -> Delta:
        """A freshly initialised module with ``units`` units (without its shared tensors)."""

    def shared(self, site: "Site", params: dict) -> dict[str, tuple[int, ...]]:
        """The tensors a module at ``site`` shares with other modules: {name: shape}.

        A name stands for one tensor: a ``DeltaSet`` creates it once (``init_shared``) for all
        the modules that name it, and a structure pays its parameters once
        (``space.shared_tensors``), whichever and however many of those modules it keeps. So a
        name must determine the shape, and must be a valid attribute name (no dots). Modules
        receive them in their forward and ``fold`` as ``shared={name: tensor}``."""
        return {}

    def init_shared(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A freshly initialised shared tensor ``name`` of ``shape`` (see ``shared``)."""
        raise NotImplementedError(f"kind '{self.name}' shares no tensors")

    # ------------------------------------------------------------------ export

    def fold(self, delta: Delta, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """The host's (weight, bias) with ``delta`` folded in, so that the plain host computes
        what host + delta computed. float32 tensors; a linear's weight is (d_out, d_in) (GPT-2
        Conv1D weights are transposed by the caller), a norm's its 1-D scale; ``bias`` None
        where the host has none (a kind with ``adds_bias`` may return one). Called in stage
        order, each kind on the result of the earlier ones. A kind with shared tensors also gets
        ``shared={name: tensor}``."""
        raise NotImplementedError(f"kind '{self.name}' cannot be merged: {self.merge_refusal}")

    def peft_part(self, site: "Site") -> str:
        """Which part of a peft adapter carries this kind at ``site``: ``"lora"`` (a LoRA layer),
        ``"lora_bias"`` (the bias of LoRA's B, peft's ``lora_bias``), ``"ia3"`` (an IA3 vector),
        ``"lokr"`` (a LoKr layer) or ``"norm"`` (a trained copy of the norm, with ``fold``
        applied to it)."""
        raise NotImplementedError(f"kind '{self.name}' has no peft counterpart: {self.peft_refusal}")

    def peft_problem(self, spec: "ModuleSpec") -> str | None:
        """Why peft cannot carry this module (None: it can). The kind's ``peft_refusal`` unless a
        kind can carry some of its modules and not others."""
        return self.peft_refusal

    def peft_fields(self, spec: "ModuleSpec") -> dict:
        """Fields of the peft config that this module needs (e.g. LoKr's ``decompose_factor``);
        the modules of one adapter must agree on them."""
        return {}

    def peft_rank(self, spec: "ModuleSpec") -> tuple[int, float] | None:
        """(r, lora_alpha) of the LoRA layer this module needs at its site; None: it needs none."""
        return None

    def peft_fill(self, delta: Delta, layer: nn.Module, adapter: str, scaling: float) -> None:
        """Copy ``delta``'s trained tensors into peft's wrapped ``layer`` (adapter name
        ``adapter``, LoRA/LoKr scaling ``scaling``) for the ``lora``, ``lora_bias``, ``ia3`` and
        ``lokr`` parts."""
