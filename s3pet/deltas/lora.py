"""LoRA: y += (alpha / r) * B A x, parallel to a linear layer.

A module of max rank R is R gated rank-1 components computed as one low-rank product per
site: h = x A^T (R columns), each column scaled by its gate, then h B^T. A derived module of
rank r is the same with r components and no gates.

Merge: W += (alpha / r) B A. peft: a LoRA layer with this rank and lora_alpha (peft's
lora_alpha / r is s3pet's scaling), A and B copied as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from s3pet.deltas.base import Delta, DeltaKind, expand, project, register
from s3pet.errors import StructureError


class LoRA(Delta):
    kind = "lora"

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.units = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))  # zero: the module starts as a no-op
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x, y, gate):
        h = project(x.to(self.lora_A.dtype) if not torch.is_autocast_enabled() else x, self.lora_A)
        h = h * (gate * self.scaling) if gate is not None else h * self.scaling
        return y + expand(h, self.lora_B).to(y.dtype)


def fill_peft_lora(delta, layer, adapter: str, scaling: float) -> None:
    """Copy a module's ``lora_A``/``lora_B`` (and check its scaling) into peft's LoRA ``layer``:
    LoRA's and every kind whose low-rank part a peft LoRA layer carries."""
    if abs(scaling - delta.scaling) > 1e-12 * max(1.0, abs(delta.scaling)):
        raise StructureError(f"peft scales a LoRA by {scaling}, s3pet by {delta.scaling}: "
                             "rank_pattern/alpha_pattern did not match it")
    layer.lora_A[adapter].weight.copy_(delta.lora_A)
    layer.lora_B[adapter].weight.copy_(delta.lora_B)


@register
class LoRAKind(DeltaKind):
    name = "lora"
    hosts = ("linear",)
    stage = 1
    defaults = {"rank": 1, "alpha": 8.0}
    lr = 5e-4  # peft's usual LoRA rate with alpha = 2r (scaling 2); BitFit/LNFit/adapters take 1e-3
    merge_refusal = None
    peft_refusal = None
    code, colour, order, ranked = "L", "#56B4E9", 0, True

    def max_units(self, site, params):
        return int(params["rank"])

    def unit_params(self, site, params):
        return site.d_in + site.d_out

    def build(self, site, params, units):
        return LoRA(site.d_in, site.d_out, units, float(params["alpha"]))

    def fold(self, delta, weight, bias):
        return weight + delta.scaling * (delta.lora_B.float() @ delta.lora_A.float()), bias

    def peft_part(self, site):
        return "lora"

    def peft_rank(self, spec):
        return int(spec.units), float(spec.params["alpha"])

    def peft_fill(self, delta, layer, adapter, scaling):
        fill_peft_lora(delta, layer, adapter, scaling)
