"""Sites and spaces: discovery per model family, shipped and user space files, instantiation."""

from __future__ import annotations

import fnmatch
import json
from collections import Counter
from types import SimpleNamespace

import pytest
from torch import nn

from s3pet.deltas import KINDS
from s3pet.errors import ConfigError, ModelError
from s3pet.models import TINY_ALIASES
from s3pet.space import (
    SHIPPED_SPACES,
    discover_sites,
    instantiate,
    is_linear,
    is_norm,
    linear_dims,
    load_space,
    stack_depths,
)

pytestmark = pytest.mark.usefixtures("one_thread")

OUTER = ("norm.emb", "norm.final")

# What one block of each family holds (one site per role), per stack, and the norms outside
# the blocks. This is the contract plots and transfer rely on.
_ENC = {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out",
        "norm.attn", "norm.ffn", "attn.block", "ffn.block", "attn.core"}
_T5_DEC = _ENC | {"xattn.q", "xattn.k", "xattn.v", "xattn.o", "norm.xattn", "xattn.block", "xattn.core"}
EXPECTED = {
    "tiny-bert": {"blocks": {"encoder": _ENC}, "outer": {("norm.emb", "encoder")}},
    "tiny-roberta": {"blocks": {"encoder": _ENC}, "outer": {("norm.emb", "encoder")}},
    "tiny-t5": {"blocks": {"encoder": _ENC, "decoder": _T5_DEC},
                "outer": {("norm.final", "encoder"), ("norm.final", "decoder")}},
    "tiny-gpt2": {"blocks": {"decoder": {"attn.qkv", "attn.o", "ffn.in", "ffn.out", "norm.attn", "norm.ffn",
                                         "attn.block", "ffn.block", "attn.core"}},
                  "outer": {("norm.final", "decoder")}},
    "tiny-llama": {"blocks": {"decoder": {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.gate", "ffn.in",
                                          "ffn.out", "norm.attn", "norm.ffn", "attn.block", "ffn.block",
                                          "attn.core"}},
                   "outer": {("norm.final", "decoder")}},
}


def n_layers(config) -> int:
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise AssertionError("config without a layer count")


def hidden(config) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or config.n_embd)


def by_role(sites, role, stack=None, layer=None):
    return [s for s in sites if s.role == role and (stack is None or s.stack == stack)
            and (layer is None or s.layer == layer)]


# --------------------------------------------------------------------------- a hand-written model

class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q, self.k, self.v, self.proj = (nn.Linear(d, d) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = nn.LayerNorm(d), _Attn(d), nn.LayerNorm(d), _MLP(d)
        self.mixer = nn.Linear(d, d)  # a name no rule knows


class ToyModel(nn.Module):
    """A tiny pre-norm transformer with generic names, ``n`` blocks and a final norm."""

    def __init__(self, d: int = 8, n: int = 6, config: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        if config:
            self.config = SimpleNamespace(model_type="toy")


@pytest.fixture(scope="module")
def toy_sites():
    return discover_sites(ToyModel())


# --------------------------------------------------------------------------- discovery per family

@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_roles_per_block_and_outside(alias, tiny_backbone, tiny_sites):
    model, sites = tiny_backbone(alias), tiny_sites(alias)
    exp = EXPECTED[alias]
    n = n_layers(model.config)
    for stack, roles in exp["blocks"].items():
        for i in range(n):
            got = Counter(s.role for s in sites if s.stack == stack and s.layer == i)
            assert set(got) == roles, (stack, i)
            assert all(c == 1 for c in got.values()), (stack, i, got)
    outer = {(s.role, s.stack) for s in sites if s.role in OUTER}
    assert outer == exp["outer"]
    assert {s.stack for s in sites} == set(exp["blocks"])
    assert len(sites) == n * sum(len(r) for r in exp["blocks"].values()) + len(exp["outer"])


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_layer_indices_and_stack_depths(alias, tiny_backbone, tiny_sites):
    model, sites = tiny_backbone(alias), tiny_sites(alias)
    n = n_layers(model.config)
    depths = stack_depths(sites)
    assert depths == {stack: n for stack in EXPECTED[alias]["blocks"]}
    for s in sites:
        if s.role == "norm.emb":
            assert s.layer == -1
        elif s.role == "norm.final":
            assert s.layer == n
        else:
            assert 0 <= s.layer < n
            assert f".{s.layer}." in f".{s.path}."  # the index is the block's position in its list


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_every_site_resolves_to_a_module_of_its_host_type(alias, tiny_backbone, tiny_sites):
    model, sites = tiny_backbone(alias), tiny_sites(alias)
    linear_at = {}
    for s in sites:
        mod = model.get_submodule(s.path)
        if s.host == "norm":
            assert is_norm(mod) and mod.weight.dim() == 1 and mod.weight.shape[0] == s.d_out
        elif s.host == "attention":  # the attention module itself, which calls the attention function
            assert "Attention" in type(mod).__name__
            cfg = model.config
            heads = getattr(cfg, "num_key_value_heads", None) or getattr(cfg, "num_heads", None) or cfg.num_attention_heads
            head_dim = getattr(cfg, "d_kv", None) or hidden(cfg) // cfg.num_attention_heads
            assert (s.d_in, s.d_out) == (hidden(cfg), heads * head_dim)  # the keys' width (GQA: kv heads only)
        else:
            assert is_linear(mod)
        if s.host == "linear":
            assert linear_dims(mod) == (s.d_in, s.d_out)
            linear_at[(s.path, s.stack, s.layer)] = s
    # A sublayer-output site is hosted by that sublayer's output projection, same layer.
    for s in sites:
        if s.host == "block":
            out_role = {"attn.block": "attn.o", "xattn.block": "xattn.o", "ffn.block": "ffn.out"}[s.role]
            host = linear_at[(s.path, s.stack, s.layer)]
            assert host.role == out_role
            assert s.d_in == s.d_out == host.d_out


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_dimensions_follow_the_config(alias, tiny_backbone, tiny_sites):
    cfg, sites = tiny_backbone(alias).config, tiny_sites(alias)
    d = hidden(cfg)
    for s in sites:
        if s.host == "norm" or s.role.endswith((".block", ".o")) or s.role == "ffn.out":
            assert s.d_out == d, s
        if s.role in ("attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o", "ffn.in", "ffn.gate"):
            assert s.d_in == d, s


def test_t5_cross_attention_only_in_the_decoder(tiny_sites):
    sites = tiny_sites("tiny-t5")
    x = [s for s in sites if s.role.startswith("xattn.") or s.role == "norm.xattn"]
    assert x and {s.stack for s in x} == {"decoder"}
    assert all("EncDecAttention" in s.path or s.role == "norm.xattn" for s in x)
    enc_final = by_role(sites, "norm.final", stack="encoder")
    dec_final = by_role(sites, "norm.final", stack="decoder")
    assert [s.path for s in enc_final] == ["encoder.final_layer_norm"]
    assert [s.path for s in dec_final] == ["decoder.final_layer_norm"]


def test_gpt2_fused_qkv_on_conv1d(tiny_backbone, tiny_sites):
    model, sites = tiny_backbone("tiny-gpt2"), tiny_sites("tiny-gpt2")
    d = model.config.n_embd
    qkv = by_role(sites, "attn.qkv")
    assert len(qkv) == model.config.n_layer
    for s in qkv:
        mod = model.get_submodule(s.path)
        assert type(mod).__name__ == "Conv1D" and not isinstance(mod, nn.Linear)
        assert (s.d_in, s.d_out) == (d, 3 * d)
    assert not by_role(sites, "attn.q") and not by_role(sites, "norm.emb")
    assert [s.path for s in by_role(sites, "norm.final")] == ["ln_f"]
    # Both projections are called c_proj: the parent decides attention output vs FFN output.
    for i in range(model.config.n_layer):
        assert by_role(sites, "attn.o", layer=i)[0].path.endswith("attn.c_proj")
        assert by_role(sites, "ffn.out", layer=i)[0].path.endswith("mlp.c_proj")
        ffn_in = by_role(sites, "ffn.in", layer=i)[0]
        assert ffn_in.d_out == 4 * d


def test_llama_gate_gqa_rmsnorm_no_bias(tiny_backbone, tiny_sites):
    model, sites = tiny_backbone("tiny-llama"), tiny_sites("tiny-llama")
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # the tiny alias really is GQA
    for i in range(cfg.num_hidden_layers):
        q, k, v = (by_role(sites, r, layer=i)[0] for r in ("attn.q", "attn.k", "attn.v"))
        assert q.d_out == cfg.num_attention_heads * head_dim
        assert k.d_out == v.d_out == cfg.num_key_value_heads * head_dim < q.d_out
        gate, up = by_role(sites, "ffn.gate", layer=i)[0], by_role(sites, "ffn.in", layer=i)[0]
        assert gate.path.endswith("gate_proj") and up.path.endswith("up_proj")
        assert gate.d_out == up.d_out == cfg.intermediate_size
    for s in sites:
        mod = model.get_submodule(s.path)
        assert getattr(mod, "bias", None) is None, s.path
        if s.host == "norm":
            assert "RMSNorm" in type(mod).__name__


def test_bert_embedding_norm_and_no_final_norm(tiny_sites):
    sites = tiny_sites("tiny-bert")
    assert [s.path for s in by_role(sites, "norm.emb")] == ["embeddings.LayerNorm"]
    assert not by_role(sites, "norm.final")
    # BERT keeps its FFN projections under 'intermediate' and 'output'.
    assert all("intermediate" in s.path for s in by_role(sites, "ffn.in"))
    assert all(s.path.endswith("output.dense") and "attention" not in s.path for s in by_role(sites, "ffn.out"))


def test_generic_roles_on_a_hand_written_model(toy_sites):
    roles = Counter(s.role for s in toy_sites if s.layer == 0)
    assert set(roles) == {"attn.q", "attn.k", "attn.v", "attn.o", "ffn.in", "ffn.out", "ffn.other",
                          "norm.attn", "norm.ffn", "attn.block", "ffn.block", "attn.core"}
    mixer = [s for s in toy_sites if s.path.endswith("mixer")]
    assert len(mixer) == 6 and {s.role for s in mixer} == {"ffn.other"}
    assert [(s.path, s.layer) for s in by_role(toy_sites, "norm.final")] == [("norm", 6)]


def test_discovery_does_not_need_a_config():
    sites = discover_sites(ToyModel(n=2, config=False))
    assert stack_depths(sites) == {"encoder": 2}


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
    nn.ModuleDict({"layers": nn.ModuleList([nn.LayerNorm(4), nn.LayerNorm(4)])}),  # no linear inside
    nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4)])}),  # not identical blocks
], ids=["sequential", "blocks-without-linears", "mixed-list"])
def test_model_without_blocks_raises(model):
    with pytest.raises(ModelError, match="no stack of transformer blocks"):
        discover_sites(model)


def test_space_matching_nothing_lists_roles_found(tiny_sites):
    sites = tiny_sites("tiny-bert")
    space = load_space({"name": "cross-only", "entries": [{"kind": "lora", "roles": ["xattn.*"]}]})
    with pytest.raises(ModelError) as e:
        instantiate(space, sites)
    msg = str(e.value)
    assert "cross-only" in msg and "roles found" in msg
    for role in {s.role for s in sites}:
        assert role in msg
    assert "xattn" not in msg.split("roles found")[1]


# --------------------------------------------------------------------------- shipped spaces

@pytest.mark.parametrize("name", SHIPPED_SPACES)
def test_shipped_space_loads(name):
    space = load_space(name)
    assert space.name == name and space.entries and space.description
    assert all(e.kind in KINDS for e in space.entries)


@pytest.mark.parametrize("name", SHIPPED_SPACES)
@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_shipped_space_instantiates(alias, name, tiny_sites):
    sites = tiny_sites(alias)
    space = load_space(name)
    specs = instantiate(space, sites)
    assert specs
    keys = [(s.site.path, s.site.role, s.kind) for s in specs]
    assert len(keys) == len(set(keys))
    for spec in specs:
        assert spec.site in sites
        assert spec.site.host in KINDS[spec.kind].hosts
        assert any(e.kind == spec.kind and any(fnmatch.fnmatchcase(spec.site.role, p) for p in e.roles)
                   for e in space.entries)
        assert spec.units >= 1 and spec.n_params == spec.units * spec.unit_params > 0
    # Site order: specs follow the sites' order.
    pos = {(s.path, s.role): i for i, s in enumerate(sites)}
    order = [pos[(s.site.path, s.site.role)] for s in specs]
    assert order == sorted(order)


def _kinds_at(specs):
    out: dict = {}
    for s in specs:
        out.setdefault((s.site.path, s.site.role), {})[s.kind] = s.units
    return out


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_s3pet_m_is_the_papers_mixed_space(alias, tiny_sites):
    sites = tiny_sites(alias)
    at = _kinds_at(instantiate(load_space("s3pet-m"), sites))
    for s in sites:
        got = at.get((s.path, s.role), {})
        if s.host == "linear":
            assert got == {"lora": 1, "bitfit": 1}, s
        elif s.host == "norm":
            assert got == {"lnfit": 1, "bitfit": 1}, s
        elif s.host == "block":
            assert got == {"lowrank_adapter": 1}, s
        else:
            assert not got, s  # no prefix in the paper's space


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_s3pet_l_is_rank_one_lora_on_every_linear(alias, tiny_sites):
    sites = tiny_sites(alias)
    at = _kinds_at(instantiate(load_space("s3pet-l"), sites))
    assert set(at) == {(s.path, s.role) for s in sites if s.host == "linear"}
    assert all(v == {"lora": 1} for v in at.values())


@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_unified_ranks_and_ia3_roles(alias, tiny_sites):
    sites = tiny_sites(alias)
    specs = instantiate(load_space("unified"), sites)
    at = _kinds_at(specs)
    for s in sites:
        got = at[(s.path, s.role)]
        if s.host == "linear":
            assert got["lora"] == 8 and got["bitfit"] == 1 and got["fact"] == 1
            assert got["kronecker"] == 1 and got["sparse_lora"] == 4 + 4  # 4 rank-1 components, 4 chunks
            assert ("ia3" in got) == (s.role in ("attn.k", "attn.v", "xattn.k", "xattn.v", "ffn.in", "ffn.gate"))
        elif s.host == "block":
            assert got == {"adapter": s.d_out // 16, "lowrank_adapter": 1, "parallel_adapter": s.d_out // 16,
                           "adapterbias": 1, "compacter": 1}
            assert s.source  # every tiny family's sublayers start with a projection of width d
        elif s.host == "attention":
            assert got == {"prefix": 1}
        else:
            assert got == {"bitfit": 1, "lnfit": 1}


# --------------------------------------------------------------------------- user space files

def write_space(tmp_path, entries, name="user"):
    p = tmp_path / f"{name}.json"
    p.write_text(json.dumps({"name": name, "entries": entries}))
    return str(p)


def selected(space_path, sites):
    return {(s.site.role, s.site.stack, s.site.layer) for s in instantiate(load_space(space_path), sites)}


def test_user_space_restricts_roles(tmp_path, tiny_sites):
    sites = tiny_sites("tiny-llama")
    path = write_space(tmp_path, [{"kind": "lora", "roles": ["attn.q", "ffn.*"], "rank": 2}])
    specs = instantiate(load_space(path), sites)
    expected = {(s.path, s.role) for s in sites if s.role in ("attn.q", "ffn.gate", "ffn.in", "ffn.out")}
    assert {(s.site.path, s.site.role) for s in specs} == expected
    assert {s.units for s in specs} == {2}
    assert load_space(path).name == "user"


def test_user_space_restricts_stacks(tmp_path, tiny_sites):
    sites = tiny_sites("tiny-t5")
    path = write_space(tmp_path, [{"kind": "bitfit", "roles": ["norm.*"], "stacks": "decoder"}])
    got = selected(path, sites)
    assert got == {(s.role, s.stack, s.layer) for s in sites if s.host == "norm" and s.stack == "decoder"}
    assert ("norm.final", "decoder", 2) in got and ("norm.xattn", "decoder", 1) in got


LAYER_CASES = [
    ([0, 2], {0, 2}),
    (["1-3"], {1, 2, 3}),
    ([0, "2-3", -1], {0, 2, 3, 5}),
    ([-2], {4}),
    ({"from": 0.5, "to": 1.0}, {3, 4, 5}),  # relative depth i / 5
    ({"from": 0.0, "to": 0.2}, {0, 1}),
    ({"to": 0.4}, {0, 1, 2}),
    ({"from": 1.0}, {5}),
]


@pytest.mark.parametrize("layers,expected", LAYER_CASES, ids=[json.dumps(c[0]) for c in LAYER_CASES])
def test_user_space_restricts_layers(tmp_path, toy_sites, layers, expected):
    path = write_space(tmp_path, [{"kind": "bitfit", "roles": ["*"], "layers": layers}])
    specs = instantiate(load_space(path), toy_sites)
    assert {s.site.layer for s in specs} == expected
    # Every site of the selected blocks, nothing outside the blocks.
    assert len(specs) == sum(1 for s in toy_sites if s.layer in expected and s.host in ("linear", "norm"))


def test_relative_depth_applies_per_stack(tmp_path, tiny_sites):
    sites = tiny_sites("tiny-t5")
    path = write_space(tmp_path, [{"kind": "lora", "roles": ["attn.q"], "layers": {"from": 0.9}}])
    assert selected(path, sites) == {("attn.q", "encoder", 1), ("attn.q", "decoder", 1)}


@pytest.mark.parametrize("alias,layers", [("tiny-bert", [-3]), ("tiny-gpt2", [2])], ids=["neg-to-emb", "n-to-final"])
def test_layer_index_outside_the_blocks_selects_nothing(alias, layers, tiny_sites):
    sites = tiny_sites(alias)
    entry = load_space({"entries": [{"kind": "bitfit", "roles": ["norm.*"], "layers": layers}]}).entries[0]
    depths = stack_depths(sites)
    assert [s.path for s in sites if entry.matches(s, depths)] == []


def test_later_entry_overrides_earlier(tiny_sites):
    sites = tiny_sites("tiny-bert")
    space = load_space({"entries": [{"kind": "lora", "roles": ["attn.*"], "rank": 1},
                                    {"kind": "lora", "roles": ["attn.q"], "rank": 4, "alpha": 4}]})
    specs = instantiate(space, sites)
    assert len(specs) == sum(1 for s in sites if s.role in ("attn.q", "attn.k", "attn.v", "attn.o"))
    for s in specs:
        if s.site.role == "attn.q":
            assert (s.units, s.params["alpha"]) == (4, 4)
        else:
            assert (s.units, s.params["alpha"]) == (1, 8.0)


def test_roles_on_incompatible_hosts_are_skipped(tiny_sites):
    sites = tiny_sites("tiny-bert")
    # lnfit only attaches to norms: 'attn.*' roles give nothing, norm roles give one each.
    specs = instantiate(load_space({"entries": [{"kind": "lnfit", "roles": ["*"]}]}), sites)
    assert {s.site.host for s in specs} == {"norm"}
    assert len(specs) == sum(1 for s in sites if s.host == "norm")


# --------------------------------------------------------------------------- malformed space files

MALFORMED = [
    ("bad-json", '{"entries": [', ["not valid JSON"]),
    ("not-an-object", "[1, 2]", ["entries"]),
    ("missing-entries", {"name": "x"}, ["entries"]),
    ("empty-entries", {"entries": []}, ["entries"]),
    ("entry-not-object", {"entries": ["lora"]}, ["entries[0]"]),
    ("unknown-kind", {"entries": [{"kind": "prefix_tuning_xl", "roles": ["attn.q"]}]},
     ["entries[0].kind", "prefix_tuning_xl"]),
    ("missing-kind", {"entries": [{"roles": ["attn.q"]}]}, ["entries[0].kind"]),
    ("missing-roles", {"entries": [{"kind": "lora"}]}, ["entries[0].roles"]),
    ("empty-roles", {"entries": [{"kind": "lora", "roles": []}]}, ["entries[0].roles"]),
    ("non-string-roles", {"entries": [{"kind": "lora", "roles": [3]}]}, ["entries[0].roles"]),
    ("bad-stack", {"entries": [{"kind": "lora", "roles": ["*"], "stacks": ["middle"]}]}, ["entries[0].stacks"]),
    ("bad-layer-range", {"entries": [{"kind": "lora", "roles": ["*"], "layers": ["a-b"]}]}, ["entries[0].layers"]),
    ("layers-not-list", {"entries": [{"kind": "lora", "roles": ["*"], "layers": "0-2"}]}, ["entries[0].layers"]),
    ("depth-above-one", {"entries": [{"kind": "lora", "roles": ["*"], "layers": {"from": 2}}]},
     ["entries[0].layers"]),
    ("depth-unknown-key", {"entries": [{"kind": "lora", "roles": ["*"], "layers": {"start": 0.5}}]},
     ["entries[0].layers"]),
    ("unknown-hyper-parameter", {"entries": [{"kind": "lora", "roles": ["*"], "rnk": 4}]}, ["entries[0]", "rnk"]),
    ("hyper-parameter-of-other-kind", {"entries": [{"kind": "bitfit", "roles": ["*"], "rank": 2}]},
     ["entries[0]", "rank"]),
    ("rank-zero", {"entries": [{"kind": "lora", "roles": ["*"], "rank": 0}]}, ["entries[0]", "rank"]),
    ("rank-negative", {"entries": [{"kind": "lora", "roles": ["*"], "rank": -2}]}, ["entries[0]", "rank"]),
    ("rank-string", {"entries": [{"kind": "lora", "roles": ["*"], "rank": "4"}]}, ["entries[0]", "rank"]),
    ("reduction-zero", {"entries": [{"kind": "adapter", "roles": ["*"], "reduction": 0}]},
     ["entries[0]", "reduction"]),
    ("bottleneck-fraction", {"entries": [{"kind": "adapter", "roles": ["*"], "bottleneck": 0.5}]},
     ["entries[0]", "bottleneck"]),
    ("bottleneck-bool", {"entries": [{"kind": "adapter", "roles": ["*"], "bottleneck": True}]},
     ["entries[0]", "bottleneck"]),
    ("bad-activation", {"entries": [{"kind": "adapter", "roles": ["*"], "activation": "swishy"}]},
     ["entries[0]", "activation"]),
    ("second-entry", {"entries": [{"kind": "lora", "roles": ["*"]}, {"kind": "lora", "roles": ["*"], "rank": 0}]},
     ["entries[1]", "rank"]),
]


@pytest.mark.parametrize("content,fields", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_space_file_raises_config_error_naming_the_field(tmp_path, content, fields):
    p = tmp_path / "bad.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ConfigError) as e:
        load_space(str(p))
    msg = str(e.value)
    assert str(p) in msg
    for f in fields:
        assert f in msg


def test_unknown_space_name_lists_shipped_spaces():
    with pytest.raises(ConfigError) as e:
        load_space("no-such-space")
    assert "no-such-space" in str(e.value) and all(n in str(e.value) for n in SHIPPED_SPACES)


@pytest.mark.parametrize("entry", [
    {"kind": "lora", "rank": 0.5},
    {"kind": "lora", "rank": False},
    {"kind": "adapter", "reduction": 0.5},
    {"kind": "lowrank_adapter", "reduction": 0.5},
], ids=["lora-rank-0.5", "lora-rank-false", "adapter-reduction-0.5", "lowrank-reduction-0.5"])
def test_unit_counts_must_be_positive_integers(entry):
    field = next(k for k in entry if k != "kind")
    with pytest.raises(ConfigError, match=field):
        load_space({"entries": [{"roles": ["*"], **entry}]})
