"""Compacter (Karimi Mahabadi et al. 2021): a sequential adapter whose down and up projections
are PHM layers, W = sum_i A_i (x) B_i (Kronecker products), with n "slow" matrices A_i (n x n)
shared by every Compacter module and per-module rank-1 "fast" factors B_i = u_i v_i^T.

y <- y + up(act(down(y))), as the bottleneck adapter, after a sublayer (a block site). A PHM
layer from width ``a`` to width ``b`` (both multiples of n) has W (b x a) = sum_i A_i (x) u_i v_i^T
with u_i of b / n and v_i of a / n entries: a + b parameters, plus its bias. A module of width d
and bottleneck k (d // reduction, rounded down to a multiple of n, at least n) has
(d + k) + k + (k + d) + d = 3(d + k) parameters; the slow weights, one (n, n, n) tensor named
``compacter_n<n>``, are shared by every Compacter module of that n, down and up projections alike
(the paper's shared "phm rule"), and paid once: n^3.

Gated as one unit (the whole module's output): a Kronecker term is not a separable part of the
module, since the activation sits between the down and the up projection and term i of both
would have to go together. The up projection's u factors start at zero, so a fresh module is
the identity; the slow weights start N(0, 1/n) and the other factors so that W has the variance
of a 1/sqrt(fan_in) initialisation (the paper starts A at N(0, 1e-4) and keeps no exact zero).

Not mergeable (the activation) and no peft counterpart (peft has no PHM layers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from s3pet.deltas.adapter import ACTIVATIONS, check_activation, check_bottleneck
from s3pet.deltas.base import Delta, DeltaKind, register
from s3pet.errors import ConfigError


def phm_weight(rule: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """W = sum_i rule_i (x) (u_i v_i^T): rule (n, n, n), u (n, b / n), v (n, a / n) -> W (b, a)."""
    n = rule.shape[0]
    w = torch.einsum("ixy,ip,iq->xpyq", rule, u, v)  # Kronecker block (x, y) holds rule_i[x, y] * B_i
    return w.reshape(n * u.shape[1], n * v.shape[1])


def compacter_bottleneck(d: int, params: dict) -> int:
    """The bottleneck k: ``bottleneck`` or d // reduction, a multiple of n (at least n)."""
    n = int(params["n"])
    k = int(params["bottleneck"]) if params.get("bottleneck") else d // int(params["reduction"])
    return max(n, k // n * n)


def _width(site, params: dict) -> int:
    """The site's width, if n divides it (a PHM layer needs that); ConfigError otherwise."""
    n = int(params["n"])
    if site.d_out % n:
        raise ConfigError(f"compacter n={n} must divide the width of {site.path} ({site.d_out}); choose another n")
    return site.d_out


def rule_name(n: int) -> str:
    return f"compacter_n{n}"


class Compacter(Delta):
    kind = "compacter"

    def __init__(self, d: int, k: int, n: int, activation: str):
        super().__init__()
        self.act, self.rule = activation, rule_name(n)
        self.down_u = nn.Parameter(torch.randn(n, k // n))
        self.down_v = nn.Parameter(torch.randn(n, d // n) / math.sqrt(d))
        self.down_bias = nn.Parameter(torch.zeros(k))
        self.up_u = nn.Parameter(torch.zeros(n, d // n))  # zero: starts as a no-op
        self.up_v = nn.Parameter(torch.randn(n, k // n) / math.sqrt(k))
        self.up_bias = nn.Parameter(torch.zeros(d))

    def forward(self, x, y, gate, shared):
        rule = shared[self.rule]
        yy = y if torch.is_autocast_enabled() else y.to(rule.dtype)
        h = ACTIVATIONS[self.act](F.linear(yy, phm_weight(rule, self.down_u, self.down_v), self.down_bias))
        out = F.linear(h, phm_weight(rule, self.up_u, self.up_v), self.up_bias)
        if gate is not None:
            out = out * gate
        return y + out.to(y.dtype)


@register
class CompacterKind(DeltaKind):
    name = "compacter"
    hosts = ("block",)
    stage = 2  # sequential, as the bottleneck adapter
    defaults = {"n": 4, "reduction": 32, "bottleneck": None, "activation": "gelu"}
    lr = 3e-3  # the paper's rate for Compacter (T5-base, GLUE)
    merge_refusal = "sequential bottleneck with an activation, cannot be folded into weights"
    peft_refusal = "no peft counterpart (peft has no Compacter/PHM layers)"
    code, colour, order = "C", "#882255", 10

    def check_params(self, params):
        return check_bottleneck(check_activation(super().check_params(params)), self.name)

    def unit_params(self, site, params):
        k = compacter_bottleneck(_width(site, params), params)
        return 3 * (site.d_out + k)

    def build(self, site, params, units):
        d = _width(site, params)
        return Compacter(d, compacter_bottleneck(d, params), int(params["n"]), params["activation"])

    def shared(self, site, params):
        n = int(params["n"])
        return {rule_name(n): (n, n, n)}

    def init_shared(self, name, shape):
        return torch.randn(shape) / math.sqrt(shape[0])
