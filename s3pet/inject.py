"""Attach PET modules to a frozen backbone with forward hooks.

The backbone's module tree and state dict stay untouched: every PET module lives in one
``DeltaSet`` (an ``nn.Module`` the caller owns), which registers one forward hook per host
module. A hook receives the host's input and output and applies, in stage order, the
modules attached there (scale, then parallel, then sequential). A kind that reweights a norm
(LNFit) recomputes the norm with the shifted weight in its own call
(``deltas.lnfit.norm_with_weight_delta``). A kind that reads the sublayer's
input (a parallel adapter) gets it from a pre-hook on the sublayer's first projection
(``Site.source``), which runs before the host, in the same forward. A kind that acts inside
its host rather than on its output (prefix, in the attention call) attaches itself there
(``DeltaKind.attach``) and gets no forward hook.

Shared tensors (Compacter's slow weights, FacT's factors) live once in ``DeltaSet.shared``, a
``ParameterDict`` created from the kinds' ``shared`` and ``init_shared`` (so ``state_dict`` and
``delta.safetensors`` hold each of them once, as ``shared.<name>``); each module using them gets
them in its call as ``shared={name: tensor}``, read at call time (a functional call that swaps
the parameters reaches them).

Gates: a ``DeltaSet`` built with ``gated=True`` reads one gate vector ``self.z`` (one value
per unit, over all modules, set by the supernet once per step) and hands each module its
units, split from z once per z (one op, whose backward is one concatenation, instead of a
slice per module whose backward zero-fills a full-size gradient); with ``gated=False``
modules run whole.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from s3pet.deltas import KINDS, Delta
from s3pet.space import ModuleSpec


def _safe(key: str) -> str:
    return key.replace(".", "__").replace(":", "--")


class DeltaSet(nn.Module):
    """All PET modules for one backbone; attaches them as forward hooks."""

    def __init__(self, specs: list[ModuleSpec], gated: bool = False):
        super().__init__()
        self.specs = list(specs)
        self.gated = gated
        self.deltas = nn.ModuleDict()
        self._z: Tensor | None = None
        self._parts: tuple[Tensor, ...] | None = None  # z split per module, once per z
        self.shared = nn.ParameterDict()
        self._shared_names: dict[str, tuple[str, ...]] = {}  # per module key, computed once (hooks read it)
        off = 0
        self._index: dict[str, int] = {}  # module key -> its part of z
        self._sizes = [spec.units for spec in self.specs]  # the parts' lengths, in z's order
        for i, spec in enumerate(self.specs):
            spec.offset = off
            off += spec.units
            self._index[spec.key] = i
            self.deltas[_safe(spec.key)] = KINDS[spec.kind].build(spec.site, spec.params, spec.units)
            self._shared_names[spec.key] = tuple(spec.shared)
            for name, shape in spec.shared.items():
                if name not in self.shared:
                    self.shared[name] = nn.Parameter(KINDS[spec.kind].init_shared(name, tuple(shape)))
                elif tuple(self.shared[name].shape) != tuple(shape):
                    raise ValueError(f"shared tensor {name} has shape {tuple(self.shared[name].shape)}, "
                                     f"but {spec.kind} at {spec.site.path} needs {tuple(shape)}")
        self.n_units = off
        self._handles: list = []
        self._by_host: dict[str, list[tuple[ModuleSpec, Delta]]] = {}
        for spec in sorted(self.specs, key=lambda s: KINDS[s.kind].stage):
            self._by_host.setdefault(spec.site.path, []).append((spec, self.deltas[_safe(spec.key)]))
        # Sublayer inputs, seen by a pre-hook on the source and used (then dropped) by the host's hook.
        self._sources = sorted({s.site.source for s in self.specs if KINDS[s.kind].reads == "sublayer"})
        self._seen: dict[str, Tensor] = {}

    def delta(self, spec_or_key) -> Delta:
        key = spec_or_key.key if isinstance(spec_or_key, ModuleSpec) else spec_or_key
        return self.deltas[_safe(key)]

    def shared_kwargs(self, spec: ModuleSpec) -> dict:
        """``{"shared": {name: tensor}}`` for a module whose kind shares tensors, else ``{}``: the
        extra keyword its forward and its kind's ``fold`` take."""
        names = self._shared_names[spec.key]
        return {"shared": {n: self.shared[n] for n in names}} if names else {}

    def kind_parameters(self) -> dict[str, list[nn.Parameter]]:
        """{kind: its trainable tensors}: every module's, and each shared tensor once, under the
        kind of its first user (one optimiser group per kind)."""
        out: dict[str, list[nn.Parameter]] = {}
        seen: set[str] = set()
        for spec in self.specs:
            ps = out.setdefault(spec.kind, [])
            ps.extend(self.delta(spec).parameters())
            for n in spec.shared:
                if n not in seen:
                    seen.add(n)
                    ps.append(self.shared[n])
        return out

    def attach(self, backbone: nn.Module) -> "DeltaSet":
        """Register the hooks on ``backbone`` (idempotent: re-attaching detaches first)."""
        self.detach()
        for path in self._sources:
            self._handles.append(backbone.get_submodule(path).register_forward_pre_hook(self._make_source_hook(path)))
        for path, items in self._by_host.items():
            host = backbone.get_submodule(path)
            hooked = []
            for spec, d in items:
                KINDS[spec.kind].bind(d, host)  # a module that depends on its frozen host reads it now
                handle = KINDS[spec.kind].attach(host, d, partial(self._gate, spec))
                if handle is None:
                    hooked.append((spec, d))
                else:
                    self._handles.append(handle)
            if hooked:
                self._handles.append(host.register_forward_hook(self._make_hook(host, hooked)))
        return self

    def kept_params(self) -> int:
        """Parameters kept after training (what the budget counts; ``Delta.kept_params``), each
        shared tensor once."""
        return sum(d.kept_params() for d in self.deltas.values()) + sum(p.numel() for p in self.shared.values())

    def bake(self) -> "DeltaSet":
        """Reduce every module to the tensors it keeps (``Delta.bake``): after training, before
        saving, and before loading saved weights."""
        for d in self.deltas.values():
            d.bake()
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._seen.clear()

    @property
    def z(self) -> Tensor | None:
        """The gate vector (one value per unit of every module, in spec order), or None."""
        return self._z

    @z.setter
    def z(self, z: Tensor | None) -> None:
        self._z, self._parts = z, None

    def _gate(self, spec: ModuleSpec) -> Tensor | None:
        if not self.gated or self._z is None:
            return None
        if self._parts is None:  # one split per z: its backward is one concatenation, not a
            # zero-filled full-size gradient per module summed into z's (3 launches per module)
            self._parts = self._z.split(self._sizes)
        return self._parts[self._index[spec.key]]

    def _make_source_hook(self, path: str):
        def hook(module, args):
            self._seen[path] = args[0]

        return hook

    def _make_hook(self, host: nn.Module, items: list[tuple[ModuleSpec, Delta]]):
        norm = [(s, d) for s, d in items if KINDS[s.kind].reweights_norm]
        rest = [(s, d, KINDS[s.kind].reads == "sublayer") for s, d in items if not KINDS[s.kind].reweights_norm]
        sources = {s.site.source for s, _, sub in rest if sub}

        def hook(module, args, output):
            if getattr(module, "_s3pet_recomputing", False):
                return output  # the norm is being recomputed below: leave that inner call alone
            x = args[0]
            y = output
            # Every module runs through its own call, with the gate (and the host norm) as keyword
            # arguments: per-example gradients (``s3pet.dp``) hook each module's call and its tensors.
            if norm:
                spec, d = norm[0]
                y = d(x, y, gate=self._gate(spec), host=module)
            for spec, d, sub in rest:
                if sub and spec.site.source not in self._seen:
                    raise RuntimeError(f"{spec.kind} at {spec.site.path} reads the input of {spec.site.source}, "
                                       "which did not run before it in this forward")
                y = d(self._seen[spec.site.source] if sub else x, y, gate=self._gate(spec), **self.shared_kwargs(spec))
            for path in sources:  # used: do not keep the activation alive past this forward
                self._seen.pop(path, None)
            return y

        return hook

