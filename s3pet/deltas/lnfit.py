"""LNFit: a trainable delta on a LayerNorm / RMSNorm scale.

The norm is recomputed with weight + gate * delta (``forward`` is given the host norm), so it
works for any norm class with a 1-D ``weight``, including RMSNorm variants that scale by
(1 + weight).

Merge: into the norm's weight. peft: folded into a trained copy of the norm
(``modules_to_save``, or LN tuning when a structure has only norm modules).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from s3pet.deltas.base import Delta, DeltaKind, register


class LNFit(Delta):
    kind = "lnfit"

    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d))

    def weight_delta(self, gate):
        return self.weight if gate is None else self.weight * gate

    def forward(self, x, y, gate=None, host=None):
        """The host norm ``host`` recomputed on its input ``x`` with weight + delta (``y`` is its output)."""
        return norm_with_weight_delta(host, x, self.weight_delta(gate))


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


def norm_with_weight_delta(norm: nn.Module, x: Tensor, dw: Tensor) -> Tensor:
    """Recompute a norm layer with weight + dw (fast path for nn.LayerNorm, generic otherwise)."""
    if isinstance(norm, nn.LayerNorm):
        w = norm.weight + dw.to(norm.weight.dtype)
        return F.layer_norm(x, norm.normalized_shape, w, norm.bias, norm.eps)
    w = norm.weight + dw.to(norm.weight.dtype)
    if isinstance(norm, getattr(nn, "RMSNorm", ())):
        return F.rms_norm(x, norm.normalized_shape, w, norm.eps)
    # Any other norm class: run its own forward with the shifted weight. The flag stops this
    # host's hook from firing on the inner call.
    norm._s3pet_recomputing = True
    try:
        return torch.func.functional_call(norm, {"weight": w}, (x,))
    finally:
        norm._s3pet_recomputing = False
