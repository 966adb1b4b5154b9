"""Sequential adapters after a sublayer: y <- y + up(act(down(y))).

``adapter`` (Houlsby) has a bottleneck of m units, each gated: unit j owns row j of the down
projection, its bias, and column j of the up projection (2d + 1 parameters; the up
projection has no bias so that every parameter belongs to exactly one unit).
``lowrank_adapter`` is S3PET-M's: down and up projections each a rank-1 product (reduction
32), gated as one unit of 3(d + m) parameters.

Neither merges (the bottleneck's activation is not linear) nor has a peft counterpart.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from s3pet.deltas.base import MAX_UNITS, Delta, DeltaKind, expand, project, register
from s3pet.errors import ConfigError

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


def bottleneck(d: int, params: dict) -> int:
    """Bottleneck width of an adapter on width ``d``: ``bottleneck`` if given, else d // reduction."""
    if params.get("bottleneck"):
        return int(params["bottleneck"])
    return max(1, d // int(params["reduction"]))


def check_activation(params: dict) -> dict:
    """``params`` if its ``activation`` is known; ConfigError otherwise."""
    if not isinstance(params["activation"], str) or params["activation"] not in ACTIVATIONS:
        raise ConfigError(f"field 'activation' must be one of {sorted(ACTIVATIONS)}, got {params['activation']!r}")
    return params


def check_bottleneck(params: dict, kind: str) -> dict:
    """``params`` if its ``bottleneck`` is None or a whole number in range; ConfigError otherwise."""
    b = params["bottleneck"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_UNITS):
        raise ConfigError(f"field 'bottleneck' of kind '{kind}' must be an integer in [1, {MAX_UNITS}], got {b!r}")
    return params


class Adapter(Delta):
    kind = "adapter"

    def __init__(self, d: int, units: int, activation: str):
        super().__init__()
        self.units = units
        self.act = activation
        self.down = nn.Linear(d, units)
        self.up_weight = nn.Parameter(torch.zeros(d, units))  # zero: starts as a no-op
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))

    def forward(self, x, y, gate):
        h = ACTIVATIONS[self.act](self.down(y.to(self.down.weight.dtype) if not torch.is_autocast_enabled() else y))
        if gate is not None:
            h = h * gate
        return y + F.linear(h, self.up_weight).to(y.dtype)


@register
class AdapterKind(DeltaKind):
    name = "adapter"
    hosts = ("block",)
    stage = 2
    defaults = {"bottleneck": None, "reduction": 16, "activation": "relu"}  # bottleneck overrides reduction
    merge_refusal = "sequential bottleneck, cannot be folded into weights"
    peft_refusal = "sequential bottleneck, no peft counterpart"
    code, colour, order, ranked = "A", "#F0E442", 1, True

    def check_params(self, params):
        return check_bottleneck(check_activation(super().check_params(params)), self.name)

    def max_units(self, site, params):
        return bottleneck(site.d_out, params)

    def unit_params(self, site, params):
        return 2 * site.d_out + 1

    def build(self, site, params, units):
        return Adapter(site.d_out, units, params["activation"])


class LowRankAdapter(Delta):
    kind = "lowrank_adapter"

    def __init__(self, d: int, m: int, activation: str):
        super().__init__()
        self.act = activation
        self.down_a = nn.Parameter(torch.empty(d, 1))
        self.down_b = nn.Parameter(torch.empty(1, m))
        self.down_bias = nn.Parameter(torch.zeros(m))
        self.up_a = nn.Parameter(torch.empty(m, 1))
        self.up_b = nn.Parameter(torch.zeros(1, d))  # zero: starts as a no-op
        self.up_bias = nn.Parameter(torch.zeros(d))
        for p, fan in ((self.down_a, d), (self.down_b, 1), (self.up_a, m)):
            nn.init.normal_(p, std=1.0 / math.sqrt(fan))

    def forward(self, x, y, gate):
        yy = y if torch.is_autocast_enabled() else y.to(self.down_a.dtype)
        # Two rank-1 factorised projections: (yy A_down) B_down and (h A_up) B_up.
        h = ACTIVATIONS[self.act](expand(project(yy, self.down_a.t()), self.down_b.t()) + self.down_bias)
        out = expand(project(h, self.up_a.t()), self.up_b.t()) + self.up_bias
        if gate is not None:
            out = out * gate
        return y + out.to(y.dtype)


@register
class LowRankAdapterKind(DeltaKind):
    name = "lowrank_adapter"
    hosts = ("block",)
    stage = 2
    defaults = {"reduction": 32, "activation": "gelu"}
    merge_refusal = AdapterKind.merge_refusal
    peft_refusal = AdapterKind.peft_refusal
    code, colour, order = "LRA", "#CC79A7", 2

    def check_params(self, params):
        return check_activation(super().check_params(params))

    def unit_params(self, site, params):
        m = bottleneck(site.d_out, params)
        return 3 * (site.d_out + m)

    def build(self, site, params, units):
        return LowRankAdapter(site.d_out, bottleneck(site.d_out, params), params["activation"])
