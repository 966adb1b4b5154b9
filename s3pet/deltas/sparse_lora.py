"""Sparse + low-rank delta (DSEE, Chen et al. 2021): y += (alpha / r) B A x + S x, parallel to
a linear layer, S a sparse residual whose support is fixed before training.

Units, all of one cost d_in + d_out (so the budget needs no fixed overhead):
- ``rank`` gated rank-1 components of the low-rank part, as LoRA's (a row of A, a column of B);
- ``sparse_units`` chunks of S of exactly d_in + d_out nonzeros each. The support is chosen by
  the magnitude of the pretrained weight, as DSEE does: the positions of W sorted by |W|
  (descending, ties by position), chunk 1 = the largest d_in + d_out of them, chunk 2 the next,
  and so on. Each chunk is its own gate unit; only its nonzeros are parameters.

The module's units are ordered low-rank components first, then chunks; a module of u units
(fewer than its entry's rank + sparse_units) keeps min(u, rank) components and the rest as
chunks. The search's derivation records what was kept (``derived_params``: ``rank`` = kept
components, ``sparse_units`` = kept chunks; a derived module of k chunks holds chunks 1..k, the
k largest, whatever chunks the search kept: retraining starts afresh, and the largest
positions are DSEE's choice for a support of that size).

The support is a buffer (``support``, the flattened positions, saved with the weights) filled
from the host's weight when the module is first attached (``bind``); S and B start at zero,
so a fresh module is the identity. A space entry gets at most d_in d_out / (d_in + d_out) chunks
at a site (the positions the weight holds); building more is refused.

Merge: W += (alpha / r) B A + S. peft has no sparse residual: a module without chunks exports as
a LoRA layer (rank, alpha as LoRA's); one with chunks is refused by the peft export (merge it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from s3pet.deltas.base import MAX_UNITS, Delta, DeltaKind, expand, project, register
from s3pet.deltas.lora import fill_peft_lora
from s3pet.errors import ConfigError, StructureError

UNSET = -1  # a support not chosen yet (the module was never attached)


def split_units(params: dict, units: int) -> tuple[int, int]:
    """(low-rank components, sparse chunks) of a module of ``units`` units: components first."""
    r, s = int(params["rank"]), int(params["sparse_units"])
    if units > r + s:
        raise ConfigError(f"a sparse_lora module has at most rank + sparse_units = {r + s} units, got {units}")
    low = min(units, r)
    return low, units - low


def host_weight(host: nn.Module) -> Tensor:
    """The host linear's weight as (d_out, d_in) (GPT-2's Conv1D stores it as (d_in, d_out))."""
    w = host.weight
    return w if isinstance(host, nn.Linear) else w.t()


def magnitude_support(weight: Tensor, n: int) -> Tensor:
    """The ``n`` flattened positions of ``weight`` with the largest |w|, largest first (ties
    by position, so the choice is the same on every device)."""
    order = torch.sort(weight.detach().abs().flatten().float(), descending=True, stable=True).indices
    return order[:n]


class SparseLoRA(Delta):
    kind = "sparse_lora"

    def __init__(self, d_in: int, d_out: int, rank: int, chunks: int, alpha: float):
        super().__init__()
        self.units = rank + chunks
        self.rank, self.chunks = rank, chunks
        self.d_in, self.d_out = d_in, d_out
        self.scaling = alpha / rank if rank else 0.0
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))  # zero: the module starts as a no-op
        if rank:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.sparse = nn.Parameter(torch.zeros(chunks, d_in + d_out))  # DSEE starts S at zero
        self.register_buffer("support", torch.full((chunks, d_in + d_out), UNSET, dtype=torch.long))

    @property
    def bound(self) -> bool:
        return not self.chunks or bool((self.support != UNSET).all())

    def sparse_matrix(self, gate: Tensor | None) -> Tensor:
        """S (d_out x d_in), each chunk scaled by its gate; duplicate positions add up."""
        v = self.sparse if gate is None else self.sparse * gate[:, None].to(self.sparse.dtype)
        flat = v.new_zeros(self.d_out * self.d_in).index_add(0, self.support.flatten(), v.flatten())
        return flat.view(self.d_out, self.d_in)

    def forward(self, x, y, gate):
        xx = x if torch.is_autocast_enabled() else x.to(self.lora_A.dtype)
        out = y
        if self.rank:
            g = None if gate is None else gate[:self.rank]
            h = project(xx, self.lora_A)
            h = h * (g * self.scaling) if g is not None else h * self.scaling
            out = out + expand(h, self.lora_B).to(y.dtype)
        if self.chunks:
            if not self.bound:
                raise RuntimeError("sparse_lora: the sparse support is not chosen: attach the module to its host")
            s = self.sparse_matrix(None if gate is None else gate[self.rank:])
            out = out + F.linear(xx, s.to(xx.dtype)).to(y.dtype)
        return out


@register
class SparseLoRAKind(DeltaKind):
    name = "sparse_lora"
    hosts = ("linear",)
    stage = 1  # parallel: adds beside the layer's output, as LoRA
    defaults = {"rank": 1, "sparse_units": 1, "alpha": 8.0}
    lr = 5e-4  # LoRA's rate (the low-rank part is LoRA's, alpha = 8 at rank 1 as peft's default)
    merge_refusal = None
    peft_refusal = None  # per module: see peft_problem
    code, colour, order, ranked = "SL", "#117733", 9, True

    def check_params(self, params):
        counts = {k: params[k] for k in ("rank", "sparse_units") if k in params}
        out = super().check_params({k: v for k, v in params.items() if k not in counts})
        for k, v in counts.items():  # 0 is allowed: a derived module may keep one part only
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_UNITS:
                raise ConfigError(f"field '{k}' of kind '{self.name}' must be an integer in [0, {MAX_UNITS}], "
                                  f"got {v!r}")
        out.update(counts)
        if out["rank"] + out["sparse_units"] < 1:
            raise ConfigError(f"kind '{self.name}' needs rank + sparse_units >= 1, got 0")
        return out

    def max_units(self, site, params):
        # No more chunks than the layer has weights for (a small layer gets fewer).
        room = site.d_in * site.d_out // (site.d_in + site.d_out)
        return int(params["rank"]) + min(int(params["sparse_units"]), room)

    def unit_params(self, site, params):
        return site.d_in + site.d_out

    def first_units(self, site, params, units):
        # Both parts, as DSEE has them: rank-1 components and sparse chunks in turn (a low-rank
        # component first), not the whole low-rank part before any chunk.
        r, s = int(params["rank"]), self.max_units(site, params) - int(params["rank"])
        low = min(r, max(units - min(s, units // 2), 0))
        return [i < low for i in range(r)] + [i < units - low for i in range(s)]

    def derived_params(self, params, kept):
        r = int(params["rank"])
        return {**params, "rank": sum(kept[:r]), "sparse_units": sum(kept[r:])}

    def build(self, site, params, units):
        low, chunks = split_units(params, units)
        if chunks * (site.d_in + site.d_out) > site.d_in * site.d_out:
            raise ConfigError(f"sparse_lora at {site.path}: {chunks} chunks of {site.d_in + site.d_out} nonzeros "
                              f"exceed the {site.d_in * site.d_out} weights of the layer")
        return SparseLoRA(site.d_in, site.d_out, low, chunks, float(params["alpha"]))

    def bind(self, delta, host):
        if delta.chunks and not delta.bound:  # first attach: loaded weights keep their own support
            n = delta.support.numel()
            with torch.no_grad():
                pos = magnitude_support(host_weight(host), n).to(delta.support.device)
                delta.support.copy_(pos.view_as(delta.support))

    def fold(self, delta, weight, bias):
        w = weight
        if delta.rank:
            w = w + delta.scaling * (delta.lora_B.float() @ delta.lora_A.float())
        if delta.chunks:
            if not delta.bound:
                raise StructureError("sparse_lora without a chosen support cannot be merged "
                                     "(its weights were never attached to the model)")
            w = w + delta.sparse_matrix(None).float()
        return w, bias

    def peft_problem(self, spec):
        if split_units(spec.params, spec.units)[1]:
            return "peft has no sparse residual; merge it, or keep only its low-rank part"
        return None

    def peft_part(self, site):
        return "lora"

    def peft_rank(self, spec):
        low, _ = split_units(spec.params, spec.units)
        return (low, float(spec.params["alpha"])) if low else None

    def peft_fill(self, delta, layer, adapter, scaling):
        fill_peft_lora(delta, layer, adapter, scaling)
