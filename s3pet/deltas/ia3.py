"""IA3: a learned rescaling of a linear layer's output, y <- y * (1 + l), l initialised at 0.

Merge: rows of W and the bias scaled by 1 + l (before parallel modules add theirs). peft:
``IA3Config`` with ``feedforward_modules=[]`` (peft then scales the output, as here),
``ia3_l = 1 + l``; a peft adapter is one method, so not beside LoRA-carried kinds.
"""

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
    merge_refusal = None
    peft_refusal = None
    code, colour, order = "IA3", "#D55E00", 5

    def unit_params(self, site, params):
        return site.d_out

    def build(self, site, params, units):
        return IA3(site.d_out)

    def fold(self, delta, weight, bias):
        s = 1 + delta.scale.float()
        return weight * s[:, None], None if bias is None else bias * s

    def peft_part(self, site):
        return "ia3"

    def peft_fill(self, delta, layer, adapter, scaling):
        lv = layer.ia3_l[adapter]
        lv.copy_((1 + delta.scale.to(lv.dtype)).reshape(lv.shape))
