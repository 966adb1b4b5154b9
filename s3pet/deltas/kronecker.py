"""Kronecker adapter (KAdaptation, He et al. 2022; peft's LoKr): a weight update that is a
Kronecker product, dW = (alpha / r) W1 (x) W2, parallel to a linear layer.

W1 is a small full factor (a x c) and W2 = A B a rank-r product ((b x r)(r x d)), where
d_out = a * b and d_in = c * d are split by ``factorization`` with the space's ``factor``
(peft's ``decompose_factor``: a and c equal the factor when it divides the width). The
forward never forms dW: with x read as a (c x d) matrix X, dW x is W1 X B^T A^T, read back
as a vector of a * b. W1 starts at zero (peft's default), so a fresh module is the identity.

Gated as one unit per module (the whole dW: a c + r (b + d) parameters); the rank r is a
hyper-parameter of the space entry, not searched, so every parameter is in the one unit.

Merge: W += (alpha / r) kron(W1, A B). peft: a LoKr layer (``LoKrConfig`` with
``decompose_factor`` = factor, ``decompose_both=False``, rank and alpha per module through
``rank_pattern`` / ``alpha_pattern``, so that peft's alpha / r is s3pet's scaling), W1 as
``lokr_w1``, A and B as ``lokr_w2_a`` / ``lokr_w2_b`` (or their product as ``lokr_w2`` where
peft keeps W2 whole, for r >= max(b, d) / 2). peft's LoKr wraps ``nn.Linear`` only, so GPT-2's
``Conv1D`` layers merge but do not export to peft.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from s3pet.deltas.base import Delta, DeltaKind, register
from s3pet.errors import StructureError


def factorization(dimension: int, factor: int) -> tuple[int, int]:
    """(m, n) with m * n = ``dimension``: (factor, dimension / factor) when the factor divides
    it, else the pair with m <= factor nearest to the square root. The very rule of peft's
    LoKr (``peft.tuners.lokr.layer.factorization``, from LyCORIS), so that shapes agree."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def kron_shapes(d_in: int, d_out: int, factor: int) -> tuple[int, int, int, int]:
    """(a, b, c, d): W1 is (a x c), W2 is (b x d), d_out = a b, d_in = c d."""
    a, b = factorization(d_out, factor)
    c, d = factorization(d_in, factor)
    return a, b, c, d


class Kronecker(Delta):
    kind = "kronecker"

    def __init__(self, d_in: int, d_out: int, factor: int, rank: int, alpha: float):
        super().__init__()
        a, b, c, d = kron_shapes(d_in, d_out, factor)
        self.shape = (a, b, c, d)
        self.rank = rank
        self.scaling = alpha / rank
        self.lokr_w1 = nn.Parameter(torch.zeros(a, c))  # zero: the module starts as a no-op
        self.lokr_w2_a = nn.Parameter(torch.empty(b, rank))
        self.lokr_w2_b = nn.Parameter(torch.empty(rank, d))
        nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))  # as peft initialises them
        nn.init.kaiming_uniform_(self.lokr_w2_b, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """dW (d_out x d_in) in float32, scaling included."""
        w2 = self.lokr_w2_a.float() @ self.lokr_w2_b.float()
        return self.scaling * torch.kron(self.lokr_w1.float(), w2)

    def forward(self, x, y, gate):
        a, b, c, d = self.shape
        xx = x if torch.is_autocast_enabled() else x.to(self.lokr_w1.dtype)
        X = xx.reshape(*xx.shape[:-1], c, d)
        # kron(W1, A B) x = vec(W1 X B^T A^T): three thin products, dW never formed.
        h = torch.matmul(self.lokr_w1, X @ self.lokr_w2_b.t()) @ self.lokr_w2_a.t()
        h = h.reshape(*xx.shape[:-1], a * b)
        s = self.scaling if gate is None else gate * self.scaling
        return y + (h * s).to(y.dtype)


@register
class KroneckerKind(DeltaKind):
    name = "kronecker"
    hosts = ("linear",)
    stage = 1  # parallel: adds beside the layer's output, as LoRA
    defaults = {"factor": 8, "rank": 1, "alpha": 2.0}
    size_field = "rank"  # what a hand-designed baseline grows to fill a budget
    lr = 5e-4  # LoRA's rate at the same scaling alpha / r = 2 (a weight update of LoRA's form)
    merge_refusal = None
    peft_refusal = None
    code, colour, order = "K", "#332288", 8

    def unit_params(self, site, params):
        a, b, c, d = kron_shapes(site.d_in, site.d_out, int(params["factor"]))
        return a * c + int(params["rank"]) * (b + d)

    def build(self, site, params, units):
        return Kronecker(site.d_in, site.d_out, int(params["factor"]), int(params["rank"]), float(params["alpha"]))

    def fold(self, delta, weight, bias):
        return weight + delta.delta_weight(), bias

    def peft_part(self, site):
        return "lokr"

    def peft_rank(self, spec):
        return int(spec.params["rank"]), float(spec.params["alpha"])

    def peft_fields(self, spec):
        return {"decompose_factor": int(spec.params["factor"])}

    def peft_fill(self, delta, layer, adapter, scaling):
        if abs(scaling - delta.scaling) > 1e-12 * max(1.0, abs(delta.scaling)):
            raise StructureError(f"peft scales a LoKr layer by {scaling}, s3pet by {delta.scaling}: "
                                 "rank_pattern/alpha_pattern did not match it")
        w1 = layer.lokr_w1[adapter]
        if tuple(w1.shape) != tuple(delta.lokr_w1.shape):
            raise StructureError(f"peft's LoKr factor W1 is {tuple(w1.shape)}, s3pet's {tuple(delta.lokr_w1.shape)}")
        w1.copy_(delta.lokr_w1)
        if adapter in layer.lokr_w2:  # peft keeps W2 whole at this rank: the product, exactly
            layer.lokr_w2[adapter].copy_(delta.lokr_w2_a @ delta.lokr_w2_b)
        else:
            layer.lokr_w2_a[adapter].copy_(delta.lokr_w2_a)
            layer.lokr_w2_b[adapter].copy_(delta.lokr_w2_b)
