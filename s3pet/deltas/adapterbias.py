"""AdapterBias (Fu et al. 2022): a token-dependent shift after a sublayer,
y <- y + v * (alpha^T y): one vector v (d) and one linear scalar map alpha (d, no bias), one
unit of 2d parameters.

It sits at a block site (the sublayer's output projection hosts it) and, like the sequential
adapter, reads the sublayer's output y: each token moves along v by an amount linear in its
own representation. v starts at zero, so a fresh module is the identity; alpha starts as a
``Linear(d, 1)`` weight does.

Being linear in y, it folds exactly into the output projection (merge):
W <- W + v (alpha^T W), b <- b + v (alpha^T b), applied after the kinds of earlier stages
at that host. peft has no AdapterBias, so there is no peft export (merge it instead).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from s3pet.deltas.base import Delta, DeltaKind, register


class AdapterBias(Delta):
    kind = "adapterbias"

    def __init__(self, d: int):
        super().__init__()
        self.v = nn.Parameter(torch.zeros(d))  # zero: starts as a no-op
        self.alpha = nn.Parameter(torch.empty(d))
        bound = 1.0 / math.sqrt(d)  # nn.Linear(d, 1)'s default initialisation
        nn.init.uniform_(self.alpha, -bound, bound)

    def forward(self, x, y, gate):
        yy = y if torch.is_autocast_enabled() else y.to(self.v.dtype)
        v = self.v if gate is None else self.v * gate
        shift = (yy @ self.alpha).unsqueeze(-1) * v  # one scalar per token, times v
        return y + shift.to(y.dtype)


@register
class AdapterBiasKind(DeltaKind):
    name = "adapterbias"
    hosts = ("block",)
    stage = 2  # sequential: reads the sublayer's output, after parallel modules added theirs
    defaults = {}
    merge_refusal = None
    peft_refusal = "no peft counterpart (peft has no AdapterBias); merge it"
    code, colour, order = "AB", "#AA4499", 7

    def unit_params(self, site, params):
        return 2 * site.d_out

    def build(self, site, params, units):
        return AdapterBias(site.d_out)

    def fold(self, delta, weight, bias):
        v, a = delta.v.float(), delta.alpha.float()
        weight = weight + torch.outer(v, a @ weight)
        return weight, None if bias is None else bias + v * (a @ bias)
