"""BitFit: a trainable bias added to a linear or norm output.

Adding a zero-initialised delta to the output equals making the existing bias trainable, and
gives a bias to layers that have none (LLaMA, T5), so one form serves every family.

Merge: into the host's bias, creating one where there is none. peft: on a linear, the bias of
LoRA's B (``lora_bias``, b_B = delta / scaling) rather than a change of the base layer's own
bias, so that ``disable_adapter()`` undoes it; on a norm, folded into a trained copy of it.
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
    merge_refusal = None
    adds_bias = True
    peft_refusal = None
    code, colour, order = "B", "#E69F00", 3

    def unit_params(self, site, params):
        return site.d_out

    def build(self, site, params, units):
        return BitFit(site.d_out)

    def fold(self, delta, weight, bias):
        db = delta.bias.float()
        return weight, db if bias is None else bias + db

    def peft_part(self, site):
        return "lora_bias" if site.host == "linear" else "norm"

    def peft_fill(self, delta, layer, adapter, scaling):  # scaling * b_B adds the delta
        lb = layer.lora_B[adapter].bias
        lb.copy_(delta.bias.to(lb.dtype) / scaling)
