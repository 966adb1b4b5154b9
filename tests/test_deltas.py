"""Module kinds: exact parameter counts, init as a no-op, gate semantics and the math of each kind.

A table of cases over every kind and every tiny model family. Hooks are exercised by calling
the host module itself (a module call runs its forward hooks), on random inputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from s3pet.deltas import KINDS, Delta
from s3pet.errors import ConfigError
from s3pet.inject import DeltaSet
from s3pet.models import TINY_ALIASES
from s3pet.space import (ModuleSpec, instantiate, is_linear, linear_dims, load_space, shared_params, shared_tensors,
                         total_params)

pytestmark = pytest.mark.usefixtures("one_thread")

KIND_NAMES = ("lora", "adapter", "lowrank_adapter", "bitfit", "lnfit", "ia3", "parallel_adapter", "adapterbias",
              "kronecker", "sparse_lora", "sparse_adapter", "compacter", "fact", "fact_tk")
# "sparse_adapter" is the adapter kind with density < 1 (SparseAdapter's large-sparse setting);
# FacT's Tucker form is a case of its own.
KIND_OF = {"sparse_adapter": "adapter", "fact_tk": "fact"}
HOSTS = {"lora": {"linear"}, "ia3": {"linear"}, "bitfit": {"linear", "norm"}, "lnfit": {"norm"},
         "adapter": {"block"}, "lowrank_adapter": {"block"}, "parallel_adapter": {"block"}, "adapterbias": {"block"},
         "kronecker": {"linear"}, "sparse_lora": {"linear"}, "sparse_adapter": {"block"},
         "compacter": {"block"}, "fact": {"linear"}, "fact_tk": {"linear"}}
# Hyper-parameters of the full-size module, its units, and how many units a derived module keeps.
FULL = {"lora": {"rank": 8, "alpha": 16}, "adapter": {"bottleneck": 6}, "lowrank_adapter": {},
        "bitfit": {}, "lnfit": {}, "ia3": {}, "parallel_adapter": {"bottleneck": 5}, "adapterbias": {},
        "kronecker": {"factor": 4, "rank": 2, "alpha": 4.0}, "sparse_lora": {"rank": 3, "sparse_units": 2, "alpha": 8.0},
        "sparse_adapter": {"bottleneck": 12, "density": 0.1},
        "compacter": {"n": 4, "bottleneck": 8}, "fact": {"rank": 3}, "fact_tk": {"rank": 3, "form": "tk"}}
FULL_UNITS = {"lora": 8, "adapter": 6, "parallel_adapter": 5, "sparse_lora": 5, "sparse_adapter": 12}
DERIVED = {"lora": 3, "adapter": 2, "parallel_adapter": 3, "sparse_lora": 4, "sparse_adapter": 5}
MULTI_UNIT = tuple(DERIVED)
CASES = [(k, a) for k in KIND_NAMES for a in TINY_ALIASES]
IDS = [f"{k}-{a}" for k, a in CASES]


def n_built(module) -> int:
    return sum(p.numel() for p in module.parameters())


def unit_formula(kind: str, site, params: dict) -> int:
    """Per-unit parameter count as the design states it, written out independently."""
    d_in, d_out = site.d_in, site.d_out
    if kind in ("lora", "sparse_lora"):  # a row of A and a column of B; a chunk of d_in + d_out nonzeros
        return d_in + d_out
    if kind == "kronecker":  # W1 (a x c) whole, W2 = (b x r)(r x d), shapes as peft's LoKr splits them
        from peft.tuners.lokr.layer import factorization

        (a, b), (c, d) = factorization(d_out, params["factor"]), factorization(d_in, params["factor"])
        return a * c + params["rank"] * (b + d)
    if kind == "sparse_adapter":  # the kept share of a unit's 2d + 1 elements, exactly
        return max(1, round(params["density"] * (2 * d_out + 1)))
    if kind in ("adapter", "parallel_adapter"):  # a row of down, its bias, a column of up (no up bias)
        return 2 * d_out + 1
    if kind == "adapterbias":  # the shift vector v and the scalar map alpha
        return 2 * d_out
    if kind == "lowrank_adapter":  # rank-1 down (d + m) and up (m + d), biases m and d
        m = max(1, d_out // int(params.get("reduction", 32)))
        return 3 * (d_out + m)
    if kind == "compacter":  # PHM down: fast factors d + k, bias k; up: k + d, bias d
        k = params["bottleneck"]
        return (d_out + k) + k + (k + d_out) + d_out
    if kind in ("fact", "fact_tk"):  # per w x w slice of dW: an r x r core (TT) or r weights (TK)
        w = math.gcd(d_in, d_out)
        r = params["rank"]
        return (d_out // w) * (d_in // w) * (r * r if params.get("form", "tt") == "tt" else r)
    return d_out  # bitfit, lnfit, ia3: one vector of the host's output size


def kind_specs(kind, sites, params=None):
    params = FULL[kind] if params is None else params
    return instantiate(load_space({"entries": [{"kind": KIND_OF.get(kind, kind), "roles": ["*"], **params}]}), sites)


def shared_formula(kind: str, specs) -> int:
    """The shared parameters of ``specs`` as the design states them, written out independently."""
    if kind == "compacter":  # n slow n x n matrices, one set for every module
        return FULL["compacter"]["n"] ** 3
    if kind in ("fact", "fact_tk"):  # U (r x w) and V (w x r) per slice width w; TK: the r^3 core
        r = FULL[kind]["rank"]
        widths = {math.gcd(s.site.d_in, s.site.d_out) for s in specs}
        return sum(2 * r * w for w in widths) + (r ** 3 if kind == "fact_tk" else 0)
    return 0


def host_input(host, site, seed=0, batch=2, seq=5):
    d = linear_dims(host)[0] if is_linear(host) else site.d_in
    return torch.randn(batch, seq, d, generator=torch.Generator().manual_seed(seed))


class WithSource:
    """A host whose modules read the sublayer's input: calling it runs the sublayer's first
    projection on ``xs`` first (as the block's forward does), then the host."""

    def __init__(self, host, source, xs):
        self.host, self.source, self.xs = host, source, xs

    def __call__(self, x):
        self.source(self.xs)
        return self.host(x)


def randomize(module, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# --------------------------------------------------------------------------- registry

def test_registry_holds_every_kind_with_its_hosts():
    assert {KIND_OF.get(k, k) for k in KIND_NAMES} <= set(KINDS)
    for name in (k for k in KIND_NAMES if k not in KIND_OF):
        assert KINDS[name].name == name
        assert set(KINDS[name].hosts) == HOSTS[name]


@pytest.mark.parametrize("kind", [k for k in KIND_NAMES if k not in KIND_OF])
def test_check_params_fills_defaults_and_rejects_unknown(kind):
    k = KINDS[kind]
    assert k.check_params({}) == k.defaults
    with pytest.raises(ConfigError, match="no_such_field"):
        k.check_params({"no_such_field": 1})


# --------------------------------------------------------------------------- exact parameter counts

@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_n_params_equals_built_parameters(kind, alias, tiny_sites):
    specs = kind_specs(kind, tiny_sites(alias))
    assert {s.site.host for s in specs} == HOSTS[kind]  # every family has linear, norm and block sites
    impl = KINDS[KIND_OF.get(kind, kind)]
    # Shared tensors: built once for all the modules, counted once.
    assert shared_params(specs) == shared_formula(kind, specs)
    assert n_built(DeltaSet(specs)) == sum(s.n_params for s in specs) + shared_formula(kind, specs)
    for spec in specs:
        full = impl.build(spec.site, spec.params, spec.units)
        assert isinstance(full, Delta)
        assert n_built(full) == spec.n_params
        assert spec.unit_params == unit_formula(kind, spec.site, spec.params)
        assert spec.n_params == spec.units * spec.unit_params
        if kind in MULTI_UNIT:
            assert spec.units == FULL_UNITS[kind]
            r = DERIVED[kind]
            small = ModuleSpec(spec.site, spec.kind, dict(spec.params), r)
            built = impl.build(spec.site, spec.params, r)
            assert built.units == r
            assert n_built(built) == small.n_params == r * spec.unit_params
        else:
            assert spec.units == 1


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_adapter_units_follow_the_reduction(alias, tiny_sites):
    for reduction in (4, 16, 1000):
        for spec in kind_specs("adapter", tiny_sites(alias), {"reduction": reduction}):
            assert spec.units == max(1, spec.site.d_out // reduction)
            assert n_built(KINDS["adapter"].build(spec.site, spec.params, spec.units)) == spec.n_params


def test_lowrank_adapter_is_one_unit_and_scales_with_reduction(tiny_sites):
    site = kind_specs("lowrank_adapter", tiny_sites("tiny-bert"))[0].site
    for reduction in (2, 8, 32):
        params = KINDS["lowrank_adapter"].check_params({"reduction": reduction})
        spec = ModuleSpec(site, "lowrank_adapter", params, 1)
        assert spec.n_params == 3 * (site.d_out + site.d_out // reduction)
        assert n_built(KINDS["lowrank_adapter"].build(site, params, 1)) == spec.n_params


# --------------------------------------------------------------------------- gates, through the hooks

@pytest.fixture
def attached(tiny_backbone, tiny_sites):
    """``attached(alias, kind, params=None) -> (backbone, DeltaSet, [(spec, host, x, base)])``."""
    made = []

    def make(alias, kind, params=None):
        model = tiny_backbone(alias)
        specs = kind_specs(kind, tiny_sites(alias), params)
        rows = []
        for i, spec in enumerate(specs):
            host = model.get_submodule(spec.site.path)
            x = host_input(host, spec.site, seed=i)
            if KINDS[KIND_OF.get(kind, kind)].reads == "sublayer":
                source = model.get_submodule(spec.site.source)
                host = WithSource(host, source, host_input(source, spec.site, seed=100 + i))
            with torch.no_grad():
                rows.append((spec, host, x, host(x)))
        ds = DeltaSet(specs, gated=True).attach(model)
        made.append(ds)
        return model, ds, rows

    yield make
    for ds in made:
        ds.detach()


def host_out(ds, host, x, z):
    ds.z = z
    with torch.no_grad():
        return host(x)


@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_fresh_module_is_a_no_op(kind, alias, attached):
    _, ds, rows = attached(alias, kind)
    ones = torch.ones(ds.n_units)
    for spec, host, x, base in rows:
        assert torch.equal(host_out(ds, host, x, None), base), spec.site.path
        assert torch.allclose(host_out(ds, host, x, ones), base, atol=1e-6), spec.site.path


@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_gates_close_scale_and_add_up(kind, alias, attached):
    _, ds, rows = attached(alias, kind)
    randomize(ds, seed=1)
    n = ds.n_units
    for spec, host, x, base in rows:
        closed = host_out(ds, host, x, torch.zeros(n))
        assert torch.allclose(closed, base, atol=1e-6), spec.site.path
        full = host_out(ds, host, x, torch.ones(n)) - base
        assert full.abs().max() > 1e-3, spec.site.path  # the module really acts
        assert close(host_out(ds, host, x, None) - base, full)  # no gate = gate 1
        for g in (0.3, 2.0):
            part = host_out(ds, host, x, torch.full((n,), g)) - base
            assert torch.allclose(part, g * full, atol=1e-4, rtol=1e-4), (spec.site.path, g)
        if spec.units > 1:  # every unit is a separable part of the module
            total = torch.zeros_like(full)
            for u in range(spec.units):
                z = torch.zeros(n)
                z[spec.offset + u] = 1.0
                total += host_out(ds, host, x, z) - base
            assert torch.allclose(total, full, atol=1e-4, rtol=1e-4), spec.site.path


@pytest.mark.parametrize("kind,alias", CASES, ids=IDS)
def test_detach_restores_and_attach_is_idempotent(kind, alias, attached):
    model, ds, rows = attached(alias, kind)
    randomize(ds, seed=2)
    ones = torch.ones(ds.n_units)
    once = [host_out(ds, host, x, ones) for _, host, x, _ in rows]
    ds.attach(model)  # again: must not stack a second hook
    for (spec, host, x, _), o in zip(rows, once):
        assert torch.equal(host_out(ds, host, x, ones), o), spec.site.path
    ds.detach()
    for spec, host, x, base in rows:
        assert torch.equal(host_out(ds, host, x, ones), base), spec.site.path


# --------------------------------------------------------------------------- the math of each kind

def one(alias, kind, role, attached, params=None, seed=3):
    model, ds, rows = attached(alias, kind, params)
    randomize(ds, seed=seed)
    spec, host, x, base = next(r for r in rows if r[0].site.role == role)
    return ds, spec, host, x, base


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.q"), ("tiny-gpt2", "attn.qkv"),
                                        ("tiny-t5", "xattn.v"), ("tiny-llama", "ffn.gate")])
def test_lora_is_scaled_low_rank_product(alias, role, attached):
    ds, spec, host, x, base = one(alias, "lora", role, attached)
    d = ds.delta(spec)
    z = torch.rand(ds.n_units, generator=torch.Generator().manual_seed(0))
    g = z[spec.offset:spec.offset + spec.units]
    scaling = FULL["lora"]["alpha"] / FULL["lora"]["rank"]
    expected = base + ((x @ d.lora_A.T) * g * scaling) @ d.lora_B.T
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias,role", [("tiny-bert", "ffn.block"), ("tiny-llama", "attn.block")])
def test_adapter_is_a_gated_bottleneck_after_the_output(alias, role, attached):
    ds, spec, host, x, base = one(alias, "adapter", role, attached)
    d = ds.delta(spec)
    z = torch.rand(ds.n_units, generator=torch.Generator().manual_seed(0))
    g = z[spec.offset:spec.offset + spec.units]
    expected = base + (torch.relu(base @ d.down.weight.T + d.down.bias) * g) @ d.up_weight.T
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias,role", [("tiny-t5", "xattn.block"), ("tiny-gpt2", "ffn.block")])
def test_lowrank_adapter_is_rank_one_factorised(alias, role, attached):
    ds, spec, host, x, base = one(alias, "lowrank_adapter", role, attached)
    d = ds.delta(spec)
    z = torch.full((ds.n_units,), 0.7)
    h = F.gelu((base @ d.down_a) @ d.down_b + d.down_bias)
    expected = base + 0.7 * ((h @ d.up_a) @ d.up_b + d.up_bias)
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.o"), ("tiny-llama", "attn.k"),
                                        ("tiny-t5", "ffn.in"), ("tiny-gpt2", "norm.final")])
def test_bitfit_adds_a_bias(alias, role, attached):
    ds, spec, host, x, base = one(alias, "bitfit", role, attached)
    b = ds.delta(spec).bias
    z = torch.full((ds.n_units,), 0.5)
    assert close(host_out(ds, host, x, z), base + 0.5 * b)
    if getattr(host, "bias", None) is not None:  # same as training the existing bias
        moved = copy.deepcopy(host)
        moved._forward_hooks.clear()
        with torch.no_grad():
            moved.bias += b
            assert close(moved(x), host_out(ds, host, x, None))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.v"), ("tiny-llama", "ffn.in"),
                                        ("tiny-gpt2", "attn.qkv")])
def test_ia3_rescales_the_output(alias, role, attached):
    ds, spec, host, x, base = one(alias, "ia3", role, attached)
    s = ds.delta(spec).scale
    z = torch.full((ds.n_units,), 0.25)
    assert close(host_out(ds, host, x, z), base * (1 + 0.25 * s))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "norm.emb"), ("tiny-gpt2", "norm.attn"),
                                        ("tiny-t5", "norm.xattn"), ("tiny-llama", "norm.final")])
def test_lnfit_equals_the_norm_with_a_shifted_scale(alias, role, attached):
    ds, spec, host, x, base = one(alias, "lnfit", role, attached)
    dw = ds.delta(spec).weight
    moved = copy.deepcopy(host)
    moved._forward_hooks.clear()
    with torch.no_grad():
        moved.weight += 0.6 * dw
        expected = moved(x)
    assert not close(expected, base)
    assert close(host_out(ds, host, x, torch.full((ds.n_units,), 0.6)), expected)


def test_kinds_at_one_host_apply_in_stage_order(tiny_backbone, tiny_sites):
    """Scale (ia3), then parallel (lora, bitfit), then sequential (adapter), whatever the list order."""
    model = tiny_backbone("tiny-llama")
    sites = tiny_sites("tiny-llama")
    out = next(s for s in sites if s.role == "ffn.out" and s.layer == 0)
    blk = next(s for s in sites if s.role == "ffn.block" and s.layer == 0)
    specs = [ModuleSpec(blk, "adapter", KINDS["adapter"].check_params({"bottleneck": 3}), 3)]
    specs += [ModuleSpec(out, k, KINDS[k].check_params({"rank": 2} if k == "lora" else {}), 2 if k == "lora" else 1)
              for k in ("bitfit", "lora", "ia3")]
    host = model.get_submodule(out.path)
    x = host_input(host, out)
    with torch.no_grad():
        y = host(x)
    ds = DeltaSet(specs, gated=False).attach(model)
    randomize(ds, seed=4)
    ad, bf, lo, ia = (ds.delta(s) for s in specs)
    with torch.no_grad():
        y1 = y * (1 + ia.scale)
        y2 = y1 + lo.scaling * (x @ lo.lora_A.T) @ lo.lora_B.T + bf.bias
        y3 = y2 + torch.relu(y2 @ ad.down.weight.T + ad.down.bias) @ ad.up_weight.T
        got = host(x)
    ds.detach()
    assert close(got, y3, 1e-4)


def test_deltaset_assigns_contiguous_gate_slices(tiny_sites):
    specs = instantiate(load_space("unified"), tiny_sites("tiny-t5"))
    ds = DeltaSet(specs, gated=True)
    offsets = [s.offset for s in ds.specs]
    assert offsets[0] == 0
    assert all(b.offset == a.offset + a.units for a, b in zip(ds.specs, ds.specs[1:]))
    assert ds.n_units == sum(s.units for s in specs)
    # Every module's kept parameters, plus each shared tensor (Compacter, FacT) once; the prefix's
    # MLP trains beside them until baked.
    assert shared_params(specs) > 0
    assert ds.kept_params() == total_params(specs) == sum(s.n_params for s in specs) + shared_params(specs)
    assert total_params(specs) < n_built(ds)
    assert n_built(ds.bake()) == total_params(specs)
    assert all(ds.delta(s) is ds.delta(s.key) for s in specs)


# --------------------------------------------------------------------------- parallel adapter, AdapterBias

@pytest.mark.parametrize("alias,role", [("tiny-bert", "ffn.block"), ("tiny-t5", "xattn.block"),
                                        ("tiny-gpt2", "attn.block"), ("tiny-llama", "ffn.block")])
def test_parallel_adapter_reads_the_sublayer_input(alias, role, attached):
    ds, spec, host, x, base = one(alias, "parallel_adapter", role, attached)
    d = ds.delta(spec)
    z = torch.rand(ds.n_units, generator=torch.Generator().manual_seed(0))
    g = z[spec.offset:spec.offset + spec.units]
    xs = host.xs  # the input of the sublayer's first projection, not the host's
    assert xs.shape[-1] == spec.site.d_out
    expected = base + 4.0 * (torch.relu(xs @ d.down.weight.T + d.down.bias) * g) @ d.up_weight.T
    assert close(host_out(ds, host, x, z), expected, 1e-4)


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_parallel_adapter_source_is_the_sublayer_first_projection(alias, tiny_sites):
    sites = tiny_sites(alias)
    specs = kind_specs("parallel_adapter", sites)
    assert {s.site.role.split(".")[0] for s in specs} >= {"attn", "ffn"}
    by_path = {(s.path, s.role): s for s in sites}
    for spec in specs:
        sub = spec.site.role.split(".")[0]
        src = next(s for (p, r), s in by_path.items() if p == spec.site.source and s.host == "linear")
        assert src.role in (f"{sub}.q", f"{sub}.qkv", "ffn.in", "ffn.gate") and src.role.startswith(sub)
        assert src.layer == spec.site.layer and src.stack == spec.site.stack and src.d_in == spec.site.d_out


def test_parallel_adapter_follows_the_forward_of_the_whole_model(tiny_backbone, tiny_sites):
    """Through the model's own forward (no hand-run source): a fresh module changes nothing, a
    trained one changes the output, and no sublayer input outlives the forward."""
    model = tiny_backbone("tiny-llama")
    specs = kind_specs("parallel_adapter", tiny_sites("tiny-llama"))
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).last_hidden_state
        ds = DeltaSet(specs, gated=False).attach(model)
        assert torch.equal(model(input_ids=ids).last_hidden_state, base)
        randomize(ds, seed=5)
        moved = model(input_ids=ids).last_hidden_state
    assert not ds._seen
    ds.detach()
    assert (moved - base).abs().max() > 1e-3


def test_parallel_adapter_needs_a_source(tiny_sites):
    from dataclasses import replace

    site = kind_specs("parallel_adapter", tiny_sites("tiny-bert"))[0].site
    assert KINDS["parallel_adapter"].fits(site)
    assert not KINDS["parallel_adapter"].fits(replace(site, source=""))
    assert KINDS["adapter"].fits(replace(site, source=""))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "attn.block"), ("tiny-t5", "ffn.block"),
                                        ("tiny-gpt2", "ffn.block"), ("tiny-llama", "attn.block")])
def test_adapterbias_is_a_token_dependent_shift(alias, role, attached):
    ds, spec, host, x, base = one(alias, "adapterbias", role, attached)
    d = ds.delta(spec)
    z = torch.full((ds.n_units,), 0.4)
    alpha = base @ d.alpha  # one scalar per token
    assert alpha.shape == base.shape[:-1]
    assert close(host_out(ds, host, x, z), base + 0.4 * alpha[..., None] * d.v, 1e-4)


def test_new_kinds_check_their_params():
    assert KINDS["parallel_adapter"].check_params({})["scaling"] == 4.0
    for bad in ({"scaling": 0}, {"scaling": float("nan")}, {"bottleneck": 0}, {"activation": "swish"}):
        with pytest.raises(ConfigError):
            KINDS["parallel_adapter"].check_params(bad)
    with pytest.raises(ConfigError, match="rank"):
        KINDS["adapterbias"].check_params({"rank": 2})


# --------------------------------------------------------------------------- Compacter, FacT: shared tensors

def kron_sum(rule, u, v):
    """sum_i rule_i (x) (u_i v_i^T), with torch.kron (independent of the kind's einsum)."""
    return sum(torch.kron(rule[i], torch.outer(u[i], v[i])) for i in range(rule.shape[0]))


@pytest.mark.parametrize("alias,role", [("tiny-bert", "ffn.block"), ("tiny-t5", "xattn.block"),
                                        ("tiny-gpt2", "attn.block"), ("tiny-llama", "ffn.block")])
def test_compacter_is_a_phm_bottleneck_with_shared_slow_weights(alias, role, attached):
    ds, spec, host, x, base = one(alias, "compacter", role, attached)
    d, rule = ds.delta(spec), ds.shared["compacter_n4"]
    assert list(ds.shared) == ["compacter_n4"]  # one rule, for every module, down and up alike
    assert all(ds.delta(s).rule == "compacter_n4" for s in ds.specs)
    down, up = kron_sum(rule, d.down_u, d.down_v), kron_sum(rule, d.up_u, d.up_v)
    assert down.shape == (8, spec.site.d_out) and up.shape == (spec.site.d_out, 8)
    z = torch.full((ds.n_units,), 0.6)
    expected = base + 0.6 * (F.gelu(base @ down.T + d.down_bias) @ up.T + d.up_bias)
    assert close(host_out(ds, host, x, z), expected, 1e-4)


def fact_delta_w(ds, spec):
    """dW of a FacT module, slice by slice from the definition: dW_AB = s V Sigma_AB U."""
    d = ds.delta(spec)
    w, a, b, r = d.w, d.a, d.b, d.r
    u, v = ds.shared[d.u_name], ds.shared[d.v_name]
    dw = torch.zeros(a * w, b * w)
    for i in range(a):
        for j in range(b):
            if d.form == "tt":
                sig = d.sigma[i * r:(i + 1) * r, j * r:(j + 1) * r]
            else:  # C x_3 p_AB: the core's slices weighted by this slice's r weights
                sig = sum(ds.shared[f"fact_tk_r{r}_core"][:, :, m] * d.p[i * b + j, m] for m in range(r))
            dw[i * w:(i + 1) * w, j * w:(j + 1) * w] = d.scale * v @ sig @ u
    return dw


@pytest.mark.parametrize("kind", ["fact", "fact_tk"])
@pytest.mark.parametrize("alias,role", [("tiny-bert", "ffn.in"), ("tiny-t5", "xattn.q"),
                                        ("tiny-gpt2", "attn.qkv"), ("tiny-llama", "attn.k")])
def test_fact_adds_a_factored_weight_delta(kind, alias, role, attached):
    ds, spec, host, x, base = one(alias, kind, role, attached)
    d = ds.delta(spec)
    assert (d.a * d.w, d.b * d.w) == (spec.site.d_out, spec.site.d_in)
    dw = fact_delta_w(ds, spec)
    z = torch.full((ds.n_units,), 0.5)
    assert close(host_out(ds, host, x, z), base + 0.5 * x @ dw.T, 1e-4)
    with torch.no_grad():  # what the merge folds in
        w0 = torch.zeros(spec.site.d_out, spec.site.d_in)
        folded, bias = KINDS["fact"].fold(d, w0, None, **ds.shared_kwargs(spec))
    assert bias is None and close(folded, dw, 1e-5)


def test_fact_factors_are_shared_by_slice_width_form_and_rank(tiny_sites):
    sites = tiny_sites("tiny-llama")  # k/v project 32 -> 16 (grouped heads): slices of width 16
    specs = kind_specs("fact", sites) + kind_specs("fact", sites, {"rank": 2, "form": "tk"})
    names = shared_tensors(specs)
    assert set(names) == {"fact_tt_r3_u32", "fact_tt_r3_v32", "fact_tt_r3_u16", "fact_tt_r3_v16",
                          "fact_tk_r2_u32", "fact_tk_r2_v32", "fact_tk_r2_u16", "fact_tk_r2_v16", "fact_tk_r2_core"}
    assert names["fact_tt_r3_u16"] == ("fact", (3, 16)) and names["fact_tk_r2_core"] == ("fact", (2, 2, 2))
    ds = DeltaSet(specs)
    assert torch.count_nonzero(ds.shared["fact_tt_r3_v32"]) == 0  # V starts at zero: the identity
    assert set(ds.state_dict()) >= {f"shared.{n}" for n in names}  # saved once, beside the modules


def test_shared_kinds_check_their_params(tiny_sites):
    for bad in ({"form": "cp"}, {"rank": 0}, {"scale": -1.0}):
        with pytest.raises(ConfigError):
            KINDS["fact"].check_params(bad)
    for bad in ({"n": 0}, {"activation": "swish"}, {"bottleneck": 0}):
        with pytest.raises(ConfigError):
            KINDS["compacter"].check_params(bad)
    spec = kind_specs("compacter", tiny_sites("tiny-bert"), {"n": 3})[0]  # 3 does not divide 32
    with pytest.raises(ConfigError, match="n=3 must divide"):
        spec.n_params
    assert (KINDS["compacter"].lr, KINDS["fact"].lr) == (3e-3, 1e-3)  # the papers' rates
