"""The prefix kind: exact counts on every family, the attention it computes (against a plain
softmax reference), its gate, attach/detach, the reparametrisation that is never saved, its
export refusals, and a tiny search and retrain with it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from s3pet import structure as S
from s3pet.cli import main
from s3pet.deltas import KINDS
from s3pet.deltas.prefix import NAME, Prefix, safe_log
from s3pet.errors import ConfigError, StructureError
from s3pet.export.adapter import export_peft
from s3pet.export.merging import export_merged
from s3pet.inject import DeltaSet
from s3pet.models import TINY_ALIASES, is_encoder_decoder, load_backbone
from s3pet.pipeline import load_run, retrain, search
from s3pet.search import SearchConfig
from s3pet.space import discover_sites, instantiate, load_space
from s3pet.train import TrainConfig
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ("tiny-bert", "tiny-t5", "tiny-gpt2", "tiny-llama")


def prefix_specs(sites, **params):
    return instantiate(load_space({"entries": [{"kind": "prefix", "roles": ["*"], **params}]}), sites)


def key_width(config) -> int:
    """kv heads x head dim, from the config (not from the sites)."""
    heads = getattr(config, "num_heads", None) or config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "d_kv", None) or config.hidden_size // heads
    return kv * head_dim


def set_impl(model, impl):
    model.config._attn_implementation = impl
    if is_encoder_decoder(model.config):
        model.encoder.config._attn_implementation = impl
        model.decoder.config._attn_implementation = impl
    return model


def randomize(ds, seed=0, std=0.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ds.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def padded_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 1000, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: the model's own mask must still apply beside the prefix
    kw = {"input_ids": ids, "attention_mask": mask}
    if is_encoder_decoder(model.config):
        kw["decoder_input_ids"] = torch.randint(1, 1000, (2, 3), generator=g)
    return kw


# --------------------------------------------------------------------------- counts

@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_counts_are_the_prefixes_only(alias, tiny_backbone, tiny_sites):
    model = tiny_backbone(alias)
    sites = tiny_sites(alias)
    specs = prefix_specs(sites, n_prefix=7)
    n_attn = {"tiny-t5": 2 + 2 + 2}.get(alias, 2)  # T5: encoder self, decoder self and cross per layer
    assert len(specs) == n_attn and all(s.units == 1 for s in specs)
    if alias == "tiny-t5":
        assert sorted({s.site.role for s in specs}) == ["attn.core", "xattn.core"]
    for spec in specs:
        assert spec.n_params == 2 * 7 * key_width(model.config)  # keys and values of 7 vectors
        plain = KINDS["prefix"].build(spec.site, {**spec.params, "mlp": False}, 1)
        assert sum(p.numel() for p in plain.parameters()) == spec.n_params
        d = KINDS["prefix"].build(spec.site, spec.params, 1)  # with the MLP: more trains than counts
        assert d.kept_params() == spec.n_params < sum(p.numel() for p in d.parameters())
        before = d.kv().detach().clone()
        d.bake()
        assert [n for n, _ in d.named_parameters()] == ["prefix"]
        assert sum(p.numel() for p in d.parameters()) == spec.n_params
        assert torch.equal(d.kv(), before)  # baking keeps P = MLP(E)
    if alias == "tiny-llama":  # grouped-query attention: the prefix is as wide as the keys, not as d
        assert key_width(model.config) < model.config.hidden_size


def test_check_params():
    k = KINDS["prefix"]
    assert k.check_params({}) == {"n_prefix": 10, "mlp": True, "hidden": None}
    for bad in ({"n_prefix": 0}, {"n_prefix": 2.5}, {"mlp": 1}, {"hidden": 0}, {"hidden": True}, {"rank": 2}):
        with pytest.raises(ConfigError):
            k.check_params(bad)
    site = prefix_specs(discover_sites(load_backbone("tiny-bert")))[0].site
    d = k.build(site, k.check_params({"hidden": 5}), 1)
    assert d.mlp[0].out_features == 5 and d.mlp[2].out_features == 2 * site.d_out


# --------------------------------------------------------------------------- the attention it computes

def reference(module, q, k, v, mask, p, log_gate, scaling, position_bias=None):
    """Prefix attention written out: scores over [P_k; K] + [log g | mask (+ position bias)], softmax, times [P_v; V]."""
    pk, pv = p[:, 0], p[:, 1]
    keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    rep = q.shape[1] // keys.shape[1]  # grouped-query attention: each kv head serves rep query heads
    keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
    scores = q @ keys.transpose(-1, -2) * scaling
    n = pk.shape[2]
    extra = torch.zeros(scores.shape[-2], scores.shape[-1] - n) if mask is None else mask
    if position_bias is not None:
        extra = extra + position_bias
    extra = torch.broadcast_to(extra, scores[..., n:].shape)
    scores = scores + torch.cat([torch.full(scores[..., :n].shape, float(log_gate)), extra], -1)
    return (torch.softmax(scores, -1) @ values).transpose(1, 2)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("alias", FAMILIES)
def test_attention_equals_a_plain_softmax_reference(alias, impl, tiny_backbone, tiny_sites):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = set_impl(tiny_backbone(alias), impl)
    spec = prefix_specs(tiny_sites(alias), n_prefix=3)[0]
    ds = DeltaSet([spec], gated=True).attach(model)
    randomize(ds, seed=1)
    module = model.get_submodule(spec.site.path)
    assert module.config._attn_implementation == NAME + impl
    fn = ALL_ATTENTION_FUNCTIONS[NAME + impl]
    g = torch.Generator().manual_seed(2)
    heads = getattr(model.config, "num_heads", None) or model.config.num_attention_heads
    hd = spec.site.d_in // heads if alias != "tiny-t5" else model.config.d_kv
    kv = spec.site.d_out // hd
    q = torch.randn(2, heads, 5, hd, generator=g)
    k, v = torch.randn(2, kv, 5, hd, generator=g), torch.randn(2, kv, 5, hd, generator=g)
    pad = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    pad[1, ..., 3:] = False
    additive = torch.zeros(2, 1, 5, 5).masked_fill(~pad, torch.finfo(torch.float32).min)
    masks = [pad, additive] + ([None] if impl == "sdpa" else [])
    pb = torch.randn(1, heads, 5, 5, generator=g) if alias == "tiny-t5" else None
    scaling = module.scaling
    with torch.no_grad():
        p = ds.delta(spec)(k)
        for mask in masks:
            for gate in (1.0, 0.3):
                ds.z = torch.tensor([gate])
                kw = {"position_bias": pb} if pb is not None else {}
                got = fn(module, q, k, v, mask, scaling=scaling, dropout=0.0, **kw)[0]
                ref_mask = additive if mask is not None else None
                if mask is None and getattr(module, "is_causal", False):  # sdpa's own causal mask, made explicit
                    ref_mask = torch.zeros(5, 5).masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(),
                                                             torch.finfo(torch.float32).min)
                want = reference(module, q, k, v, ref_mask, p, torch.log(torch.tensor(gate)), scaling, pb)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ds.detach()


@pytest.mark.parametrize("alias", FAMILIES)
def test_gate_zero_is_the_model_without_prefix(alias, tiny_backbone, tiny_sites):
    for impl in ("eager", "sdpa"):
        model = set_impl(tiny_backbone(alias), impl)
        kw = padded_inputs(model)
        with torch.no_grad():
            base = model(**kw)[0]
        ds = DeltaSet(prefix_specs(tiny_sites(alias)), gated=True).attach(model)
        randomize(ds, seed=3)
        with torch.no_grad():
            ds.z = torch.zeros(ds.n_units)
            closed = model(**kw)[0]
            ds.z = torch.ones(ds.n_units)
            opened = model(**kw)[0]
            ds.z = None
            whole = model(**kw)[0]
        torch.testing.assert_close(closed, base, rtol=1e-5, atol=1e-5)  # same math, other kernel order only
        assert (opened - base).abs().max() > 1e-2  # the prefix really acts
        assert torch.equal(whole, opened)  # no gate = gate 1
        ds.detach()


def test_gate_zero_gives_the_prefix_exactly_no_weight(tiny_backbone, tiny_sites):
    """Eager attention returns its weights: the prefix columns get exactly 0 at gate 0, and the
    gate's gradient there is 0, not NaN (hard-concrete gates are exactly 0)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = set_impl(tiny_backbone("tiny-gpt2"), "eager")
    spec = prefix_specs(tiny_sites("tiny-gpt2"), n_prefix=4)[0]
    ds = DeltaSet([spec], gated=True).attach(model)
    module = model.get_submodule(spec.site.path)
    q, k, v = (torch.randn(1, 2, 3, 16) for _ in range(3))
    z = torch.zeros(1, requires_grad=True)
    ds.z = z
    out, w = ALL_ATTENTION_FUNCTIONS[NAME + "eager"](module, q, k, v, torch.zeros(1, 1, 3, 3), scaling=0.25)
    assert w.shape[-1] == 4 + 3 and torch.equal(w[..., :4], torch.zeros_like(w[..., :4]))
    out.sum().backward()
    assert torch.isfinite(z.grad).all()
    ds.detach()
    g = torch.tensor([0.0, 0.5], requires_grad=True)
    safe_log(g).sum().backward()
    assert torch.equal(g.grad, torch.tensor([0.0, 2.0]))


# --------------------------------------------------------------------------- attach / detach

@pytest.mark.parametrize("alias", FAMILIES)
def test_detach_restores_the_backbone(alias, tiny_backbone, tiny_sites):
    model = tiny_backbone(alias)
    kw = padded_inputs(model)
    impls = {id(m.config): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")}
    with torch.no_grad():
        base = model(**kw)[0]
    ds = DeltaSet(prefix_specs(tiny_sites(alias)), gated=False).attach(model)
    randomize(ds, seed=4)
    with torch.no_grad():
        once = model(**kw)[0]
        ds.attach(model)  # again: must not stack or lose the original implementation
        assert torch.equal(model(**kw)[0], once)
    ds.detach()
    assert {id(m.config): m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == impls
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], base)
    assert not any(k.startswith(NAME) for k in model.state_dict())


def test_prefix_refuses_attention_without_an_additive_mask(tiny_backbone, tiny_sites):
    model = tiny_backbone("tiny-llama")
    model.config._attn_implementation = "flash_attention_2"
    ds = DeltaSet(prefix_specs(tiny_sites("tiny-llama")))
    with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
        ds.attach(model)


# --------------------------------------------------------------------------- export refusals

def prefix_structure(alias, **params):
    bb = load_backbone(alias)
    specs = prefix_specs(discover_sites(bb), **params)
    return S.from_specs([(s, 1.0) for s in specs], bb, "user", {"params": sum(s.n_params for s in specs)}), bb


def test_merge_and_peft_export_refuse_with_the_reason(tmp_path):
    st, bb = prefix_structure("tiny-gpt2")
    with pytest.raises(StructureError, match="attention columns"):
        export_merged(st, bb, tmp_path / "merged", None, untrained=True)
    with pytest.raises(StructureError, match="PREFIX_TUNING puts one prefix"):
        export_peft(st, bb, tmp_path / "peft", None, untrained=True)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "peft").exists()


# --------------------------------------------------------------------------- retrain, search, CLI

@pytest.fixture
def toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=64, n_eval=16))


def test_retrain_saves_only_the_prefixes(tmp_path, toy):
    st, _ = prefix_structure("tiny-bert", n_prefix=4)
    m = retrain(st, toy, tmp_path / "run", TrainConfig(max_steps=4, batch_size=16, eval_every=2, progress=False,
                                                        pooling="mean"))
    assert m["params"]["pet"] == st.n_params < m["params"]["pet_trained"]  # the MLP trained, then went
    assert m["learning_rates"]["kind:prefix"] == KINDS["prefix"].lr
    w = load_file(str(tmp_path / "run" / "delta.safetensors"))
    deltas = {k: v for k, v in w.items() if k.startswith("deltas.")}
    assert deltas and all(k.endswith(".prefix") for k in deltas)
    assert sum(v.numel() for v in deltas.values()) == st.n_params
    run = load_run(tmp_path / "run")  # loads the baked prefixes into the structure's modules
    for spec in run.deltas.specs:
        assert torch.equal(run.deltas.delta(spec).prefix, w[f"deltas.deltas.{spec.site.path.replace('.', '__')}--prefix.prefix"])
    run.deltas.detach()


def test_dp_refuses_a_prefix_trained_through_its_mlp(tmp_path, toy):
    st, _ = prefix_structure("tiny-bert", n_prefix=4)
    with pytest.raises(ConfigError, match="--dp does not support modules trained through a reparametrisation"):
        retrain(st, toy, tmp_path / "dp", TrainConfig(max_steps=2, batch_size=8, progress=False, dp=True))
    assert not (tmp_path / "dp").exists()  # refused before the folder is made


def test_tiny_search_with_prefix(tmp_path, toy):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"name": "pfx", "entries": [{"kind": "prefix", "roles": ["attn.core"], "n_prefix": 2},
                                                            {"kind": "bitfit", "roles": ["attn.o", "norm.*"]}]}))
    out = tmp_path / "search"
    cfg = SearchConfig(max_steps=4, batch_size=8, eval_every=2, checkpoint_every=2, log_every=1, progress=False)
    search("tiny-gpt2", toy, str(space), "300", out, cfg)
    rows = (out / "alphas.csv").read_text().splitlines()
    assert sum(",prefix," in r for r in rows) == 2  # one gate per attention module
    st = json.loads((out / "structure.json").read_text())
    assert 0 < st["n_params"] <= 300
    assert all(m["n_params"] == 2 * 2 * 32 for m in st["modules"] if m["kind"] == "prefix")


def test_cli_space_lists_prefix_rows(capsys):
    assert main(["space", "tiny-t5", "--space", "unified"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if " prefix " in f" {line} " and "modules" not in line]
    assert {r[3] for r in rows} == {"attn.core", "xattn.core"}
    assert all(r[-1] == str(2 * 10 * 32) for r in rows)
    assert any(line.split()[:3] == ["prefix", "6", "modules"] for line in out.splitlines())
