"""BitFit: a trainable bias added to a linear or norm output.

Adding a zero-initialised delta to the output equals making the existing bias trainable, and
gives a bias to layers that have none (LLaMA, T5), so one form serves every family.
"""

from __future__ import annotations

import torch
from torch import nn

from s3pet.deltas.base import Delta, DeltaKind, register


class BitFit(Delta):
    kind = "bitfit"

    def __init__(self, d_out: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x, y, gate):
        b = self.bias if gate is None else self.bias * gate
        return y + b.to(y.dtype)


@register
class BitFitKind(DeltaKind):
    name = "bitfit"
    hosts = ("linear", "norm")
    stage = 1
    defaults = {}

    def unit_params(self, site, params):
        return site.d_out

    def build(self, site, params, units):
        return BitFit(site.d_out)
