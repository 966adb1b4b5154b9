"""LNFit: a trainable delta on a LayerNorm / RMSNorm scale.

The norm is recomputed with weight + gate * delta (the host asks ``weight_delta``), so it
works for any norm class with a 1-D ``weight``, including RMSNorm variants that scale by
(1 + weight).

Merge: into the norm's weight. peft: folded into a trained copy of the norm
(``modules_to_save``, or LN tuning when a structure has only norm modules).
"""

from __future__ import annotations

import torch
from torch import nn

from s3pet.deltas.base import Delta, DeltaKind, register


class LNFit(Delta):
    kind = "lnfit"

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def weight_delta(self, gate):
        return self.weight if gate is None else self.weight * gate

    def forward(self, x, y, gate):  # applied by the norm host through weight_delta
        return y


@register
class LNFitKind(DeltaKind):
    name = "lnfit"
    hosts = ("norm",)
    stage = 0
    defaults = {}
    reweights_norm = True
    merge_refusal = None
    peft_refusal = None
    code, colour, order = "N", "#009E73", 4

    def unit_params(self, site, params):
        return site.d_out

    def build(self, site, params, units):
        return LNFit(site.d_out)

    def fold(self, delta, weight, bias):
        return weight + delta.weight.float(), bias

    def peft_part(self, site):
        return "norm"
