"""Sequential adapters after a sublayer: y <- y + up(act(down(y))).

``adapter`` (Houlsby) has a bottleneck of m units, each gated: unit j owns row j of the down
projection, its bias, and column j of the up projection (2d + 1 parameters; the up
projection has no bias so that every parameter belongs to exactly one unit).
``lowrank_adapter`` is S3PET-M's: down and up projections each a rank-1 product (reduction
32), gated as one unit of 3(d + m) parameters.

``adapter`` with ``density`` < 1 is SparseAdapter's "large-sparse" setting (He et al. 2022): a
wide bottleneck whose weights are pruned once, before training, to the kept share. Each unit
keeps exactly k = max(1, round(density (2d + 1))) of its own 2d + 1 elements (its row of down,
its bias, its column of up), so every unit still costs the same (k) and only the kept elements
are parameters (``values``, with their positions in ``index``). Which elements: SNIP (Lee et
al. 2019), the largest |w dL/dw| of a dense initialisation on one batch, where a batch is
given (``prune_on_batch``: retraining does it on its first training batch); otherwise, as
when the module is built (and so in the search), the largest |w| of that initialisation. The
dense initialisation draws the up projection like the down one (at zero, every score of both
would be 0); once pruned, the kept up elements are set to zero, so the module starts as the
identity.

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


def kept_per_unit(d: int, density: float) -> int:
    """Elements a unit of a sparse adapter on width ``d`` keeps of its 2d + 1."""
    return max(1, min(2 * d + 1, round(density * (2 * d + 1))))


def check_density(params: dict) -> dict:
    """``params`` if its ``density`` is in (0, 1]; ConfigError otherwise."""
    v = params["density"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 < v <= 1:
        raise ConfigError(f"field 'density' of kind 'adapter' must be a number in (0, 1], got {v!r}")
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


class SparseAdapter(Delta):
    """An adapter whose units each keep ``k`` of their 2d + 1 elements (see the module's docstring)."""

    kind = "adapter"

    def __init__(self, d: int, units: int, activation: str, k: int):
        super().__init__()
        self.units, self.act, self.d, self.k = units, activation, d, k
        self.values = nn.Parameter(torch.zeros(units, k))
        self.register_buffer("index", torch.zeros(units, k, dtype=torch.long))
        self._probe: torch.Tensor | None = None
        dense = self.dense_init()
        self.keep(dense, dense.abs())  # by magnitude, until a batch asks for SNIP

    def dense_init(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A dense (units, 2d + 1) initialisation: down rows and up columns drawn as
        ``nn.Linear(d, units)`` draws its weight, biases as it draws its bias (both ~ U(+-1/sqrt(d)))."""
        bound = 1.0 / math.sqrt(self.d)
        u = torch.rand(self.units, 2 * self.d + 1, generator=generator)
        return ((2 * u - 1) * bound).to(self.values.device)

    @torch.no_grad()
    def keep(self, dense: torch.Tensor, score: torch.Tensor) -> None:
        """Keep each unit's ``k`` elements of largest ``score`` (ties by position): their
        positions in ``index``, their ``dense`` values (up elements at zero) in ``values``."""
        order = torch.sort(score.float(), dim=1, descending=True, stable=True).indices[:, :self.k]
        idx = torch.sort(order, dim=1).values
        self.index.copy_(idx)
        v = torch.gather(dense.to(self.values.dtype), 1, idx)
        self.values.copy_(torch.where(idx > self.d, torch.zeros_like(v), v))  # up elements: zero, a no-op start

    def start_probe(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Run dense from a fresh initialisation (a leaf tensor that requires grad, returned)
        until ``finish_probe``: SNIP's scores are |w dL/dw| of that dense module."""
        self._probe = self.dense_init(generator).to(self.values.dtype).requires_grad_(True)
        return self._probe

    def finish_probe(self, grad: torch.Tensor | None) -> None:
        """Prune by SNIP: keep the elements of largest |w dL/dw| (by |w| where the loss did not
        reach the module: ``grad`` None); back to the sparse module."""
        w, self._probe = self._probe.detach(), None
        self.keep(w, w.abs() if grad is None else (w * grad).abs())

    def dense(self) -> torch.Tensor:
        if self._probe is not None:
            return self._probe
        z = self.values.new_zeros(self.units, 2 * self.d + 1)
        return z.scatter(1, self.index, self.values)

    def forward(self, x, y, gate):
        w = self.dense()
        d = self.d
        yy = y if torch.is_autocast_enabled() else y.to(w.dtype)
        h = ACTIVATIONS[self.act](F.linear(yy, w[:, :d].to(yy.dtype), w[:, d].to(yy.dtype)))
        if gate is not None:
            h = h * gate
        return y + (h @ w[:, d + 1:].to(h.dtype)).to(y.dtype)


@register
class AdapterKind(DeltaKind):
    name = "adapter"
    hosts = ("block",)
    stage = 2
    # bottleneck overrides reduction; density < 1: the large-sparse adapter (each unit keeps that share)
    defaults = {"bottleneck": None, "reduction": 16, "activation": "relu", "density": 1.0}
    merge_refusal = "sequential bottleneck, cannot be folded into weights"
    peft_refusal = "sequential bottleneck, no peft counterpart"
    code, colour, order, ranked = "A", "#F0E442", 1, True

    def check_params(self, params):
        return check_density(check_bottleneck(check_activation(super().check_params(params)), self.name))

    def max_units(self, site, params):
        return bottleneck(site.d_out, params)

    def unit_params(self, site, params):
        if float(params["density"]) < 1:
            return kept_per_unit(site.d_out, float(params["density"]))
        return 2 * site.d_out + 1

    def build(self, site, params, units):
        if float(params["density"]) < 1:
            return SparseAdapter(site.d_out, units, params["activation"], kept_per_unit(site.d_out, float(params["density"])))
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


def prune_on_batch(modules: list[nn.Module], loss_fn, seed: int) -> int:
    """SNIP for every sparse adapter among ``modules``: each runs dense from a fresh
    initialisation (drawn from a generator seeded by ``seed``), ``loss_fn()`` computes the loss
    of one batch, and each keeps the elements of largest |w dL/dw|. Returns how many were pruned."""
    sparse = [m for m in modules if isinstance(m, SparseAdapter)]
    if not sparse:
        return 0
    g = torch.Generator().manual_seed(seed)
    probes = [m.start_probe(g) for m in sparse]
    try:
        grads = torch.autograd.grad(loss_fn(), probes, allow_unused=True)
    except BaseException:
        for m in sparse:
            m.finish_probe(None)
        raise
    for m, grad in zip(sparse, grads):
        m.finish_probe(grad)
    return len(sparse)
