"""Parallel adapter (He et al. 2022, "Towards a unified view of parameter-efficient transfer
learning"): a bottleneck beside a sublayer, reading the sublayer's input and adding to its
output, h <- h + s * up(act(down(x))), with a fixed scaling s (4 by default).

It sits at a block site (``attn.block``, ``xattn.block``, ``ffn.block``: the sublayer's output
projection hosts it) and reads ``x``, the input of the sublayer's first projection
(``Site.source``: q or the fused qkv, the FFN's in or gate projection), i.e. the hidden states
the sublayer itself reads. Gated per bottleneck unit like the sequential adapter: unit j owns
row j of the down projection, its bias and column j of the up projection (2d + 1 parameters;
the up projection has no bias, so every parameter belongs to one unit). The up projection
starts at zero, so a fresh module is the identity.

Not mergeable (the activation between the projections is not linear) and no peft
counterpart (peft has no parallel adapter).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from s3pet.deltas.adapter import ACTIVATIONS, bottleneck, check_activation, check_bottleneck
from s3pet.deltas.base import Delta, DeltaKind, register


class ParallelAdapter(Delta):
    kind = "parallel_adapter"

    def __init__(self, d: int, units: int, activation: str, scaling: float):
        super().__init__()
        self.units = units
        self.act = activation
        self.scaling = scaling
        self.down = nn.Linear(d, units)
        self.up_weight = nn.Parameter(torch.zeros(d, units))  # zero: starts as a no-op
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))

    def forward(self, x, y, gate):  # x: the sublayer's input, y: its output so far
        h = ACTIVATIONS[self.act](self.down(x.to(self.down.weight.dtype) if not torch.is_autocast_enabled() else x))
        if gate is not None:
            h = h * gate
        return y + (self.scaling * F.linear(h, self.up_weight)).to(y.dtype)


@register
class ParallelAdapterKind(DeltaKind):
    name = "parallel_adapter"
    hosts = ("block",)
    stage = 1  # parallel: adds beside the sublayer, before sequential modules transform the output
    reads = "sublayer"
    defaults = {"bottleneck": None, "reduction": 16, "activation": "relu", "scaling": 4.0}
    merge_refusal = "parallel bottleneck, cannot be folded into weights"
    peft_refusal = "parallel bottleneck, no peft counterpart"
    code, colour, order, ranked = "PA", "#999933", 6, True

    def fits(self, site):
        return super().fits(site) and bool(site.source)  # it needs the sublayer's input

    def check_params(self, params):
        return check_bottleneck(check_activation(super().check_params(params)), self.name)

    def max_units(self, site, params):
        return bottleneck(site.d_out, params)

    def unit_params(self, site, params):
        return 2 * site.d_out + 1

    def build(self, site, params, units):
        return ParallelAdapter(site.d_out, units, params["activation"], float(params["scaling"]))
