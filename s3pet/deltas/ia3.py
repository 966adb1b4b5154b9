"""IA3: a learned rescaling of a linear layer's output, y <- y * (1 + l), l initialised at 0."""

from __future__ import annotations

import torch
from torch import nn

from s3pet.deltas.base import Delta, DeltaKind, register


class IA3(Delta):
    kind = "ia3"

    def __init__(self, d_out: int):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(d_out))

    def forward(self, x, y, gate):
        s = self.scale if gate is None else self.scale * gate
        return y + y * s.to(y.dtype)


@register
class IA3Kind(DeltaKind):
    name = "ia3"
    hosts = ("linear",)
    stage = 0  # scales the base output, before parallel modules add theirs
    defaults = {}

    def unit_params(self, site, params):
        return site.d_out

    def build(self, site, params, units):
        return IA3(site.d_out)
