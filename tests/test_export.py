"""Export: peft adapters and merged models reproduce s3pet's own model; what cannot be
expressed is refused by name; folders are written atomically."""

import json
import logging

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

from s3pet import export as E
from s3pet.errors import ConfigError, StructureError
from s3pet.export.weights import tolerance
from s3pet.inject import DeltaSet
from s3pet.models import load_backbone
from s3pet.space import discover_sites, instantiate, load_space
from s3pet.structure import from_specs, to_specs

import peft  # installed with the test extras

LORA = {"kind": "lora", "roles": ["attn.q", "attn.v", "attn.qkv", "ffn.in"], "rank": 3, "alpha": 4.0}
LNFIT = {"kind": "lnfit", "roles": ["norm.*"]}
# BitFit on linears that have a bias (BERT, GPT-2) and on LayerNorms (which have one too).
BITFIT = {"kind": "bitfit", "roles": ["attn.o", "ffn.out", "attn.q", "attn.qkv", "norm.attn", "norm.ffn"]}
IA3 = {"kind": "ia3", "roles": ["ffn.out"]}
# LLaMA: linears and RMSNorms have no bias; BitFit on attn.q rides on the LoRA there (peft).
LLAMA_PEFT = [LORA, LNFIT, {"kind": "bitfit", "roles": ["attn.q"]}]
# Merged: BitFit on bias-free q and o projections needs LLaMA's attention_bias switch.
LLAMA_MERGED = [LORA, LNFIT, IA3, {"kind": "bitfit", "roles": ["attn.q", "attn.o"]}]

PEFT_CASES = {"tiny-bert": [LORA, BITFIT, LNFIT], "tiny-gpt2": [LORA, BITFIT, LNFIT], "tiny-llama": LLAMA_PEFT,
              "tiny-t5": [LORA, LNFIT]}
MERGED_CASES = {"tiny-bert": [LORA, BITFIT, LNFIT, IA3], "tiny-gpt2": [LORA, BITFIT, LNFIT, IA3],
                "tiny-llama": LLAMA_MERGED}


def make(name, entries, seed=1):
    """(backbone, structure, random non-zero weights keyed like DeltaSet.state_dict())."""
    bb = load_backbone(name)
    specs = instantiate(load_space({"name": "t", "entries": entries}), discover_sites(bb))
    for i, s in enumerate(specs):  # mixed ranks, so rank_pattern has to be right per module
        if s.kind == "lora" and i % 2:
            s.units = 1
    n = sum(s.n_params for s in specs)
    st = from_specs([(s, 1.0) for s in specs], bb, "t", {"params": n, "fraction": 0.01})
    g = torch.Generator().manual_seed(seed)
    ds = DeltaSet(to_specs(st, bb))
    weights = {k: 0.3 * torch.randn(v.shape, generator=g) for k, v in ds.state_dict().items()}
    return bb, st, weights


def batch_for(model):
    ids = torch.randint(1, 30000, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    b = {"input_ids": ids, "attention_mask": mask}
    if model.config.is_encoder_decoder:
        b["decoder_input_ids"] = ids[:, :4]
    return b


@torch.no_grad()
def run(model, batch):
    model.eval()
    return model(**batch)[0]


def s3pet_out(name, st, weights):
    """Output of s3pet's own model: a fresh backbone with the DeltaSet attached."""
    bb = load_backbone(name)
    ds = DeltaSet(to_specs(st, bb))
    ds.load_state_dict(weights)
    ds.attach(bb)
    return run(bb, batch_for(bb))


def assert_reproduces(name, st, weights, model):
    ref = s3pet_out(name, st, weights)
    base = run(load_backbone(name), batch_for(model))
    assert (ref - base).abs().max() > 1e-2  # the deltas matter, so a dropped one would show
    tol = tolerance(torch.float32, ref.abs().max().item())
    assert (ref - base).abs().max() > 100 * tol
    assert (run(model, batch_for(model)) - ref).abs().max() <= tol


# ----------------------------------------------------------------------------- peft

@pytest.mark.parametrize("name", sorted(PEFT_CASES))
def test_peft_adapter_reproduces_s3pet(name, tmp_path):
    bb, st, w = make(name, PEFT_CASES[name])
    out = E.export_peft(st, bb, tmp_path / "adapter", w)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    lora = [m for m in st.modules if m["kind"] == "lora"]
    linear_bitfit = [m for m in st.modules if m["kind"] == "bitfit" and not m["role"].startswith("norm")]
    assert sorted(cfg["target_modules"]) == sorted({m["site"] for m in lora + linear_bitfit})
    assert cfg["bias"] == "none"  # BitFit rides on LoRA's B bias, never on the base layers' own
    assert {m["rank"] for m in lora} == {1, 3}
    pm = peft.PeftModel.from_pretrained(load_backbone(name), str(out))
    for m in lora:  # peft's per-module scaling equals s3pet's alpha / rank
        layer = pm.base_model.model.get_submodule(m["site"])
        assert layer.r["default"] == m["rank"]
        assert layer.scaling["default"] == pytest.approx(m["params"]["alpha"] / m["rank"])
    assert_reproduces(name, st, w, pm)
    info = E.read_export_info(out)
    assert info["format"] == "peft" and info["trained"] is True


def test_peft_ia3_only(tmp_path):
    bb, st, w = make("tiny-bert", [{"kind": "ia3", "roles": ["attn.*", "ffn.*"]}, LNFIT])
    out = E.export_peft(st, bb, tmp_path / "a", w)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "IA3"
    assert_reproduces("tiny-bert", st, w, peft.PeftModel.from_pretrained(load_backbone("tiny-bert"), str(out)))


def test_peft_norms_only_uses_ln_tuning(tmp_path):
    # LLaMA's final norm is called 'norm': a suffix match would also catch every '*norm'.
    bb, st, w = make("tiny-llama", [{"kind": "lnfit", "roles": ["norm.final", "norm.ffn"]}])
    out = E.export_peft(st, bb, tmp_path / "a", w)
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    pm = peft.PeftModel.from_pretrained(load_backbone("tiny-llama"), str(out))
    wrapped = {n for n, m in pm.base_model.model.named_modules() if hasattr(m, "ln_tuning_layers")}
    assert wrapped == {m["site"] for m in st.modules}
    assert_reproduces("tiny-llama", st, w, pm)


def test_peft_bitfit_only(tmp_path):
    bb, st, w = make("tiny-gpt2", [{"kind": "bitfit", "roles": ["attn.*", "ffn.*"]}])
    out = E.export_peft(st, bb, tmp_path / "a", w)
    assert_reproduces("tiny-gpt2", st, w, peft.PeftModel.from_pretrained(load_backbone("tiny-gpt2"), str(out)))


@pytest.mark.parametrize("kind,extra", [("adapter", {"bottleneck": 4}), ("lowrank_adapter", {})])
def test_sequential_adapters_are_refused_by_name(kind, extra, tmp_path):
    bb, st, w = make("tiny-bert", [LORA, {"kind": kind, "roles": ["ffn.block"], **extra}])
    site = next(m["site"] for m in st.modules if m["kind"] == kind)
    with pytest.raises(StructureError, match=kind) as e:
        E.export_peft(st, bb, tmp_path / "a", w)
    assert site in str(e.value) and "--merge" not in str(e.value)
    with pytest.raises(StructureError, match=kind):
        E.export_merged(st, bb, tmp_path / "m", w)
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folders left behind


def test_ia3_with_lora_suggests_merge(tmp_path):
    bb, st, w = make("tiny-bert", [LORA, IA3])
    with pytest.raises(StructureError, match=r"ia3.*--merge"):
        E.export_peft(st, bb, tmp_path / "a", w)


def test_llama_bitfit_without_lora_is_a_zero_lora_with_bias(tmp_path):
    bb, st, w = make("tiny-llama", [{"kind": "bitfit", "roles": ["attn.o"]}])
    out = E.export_peft(st, bb, tmp_path / "a", w)
    pm = peft.PeftModel.from_pretrained(load_backbone("tiny-llama"), str(out))
    layer = pm.base_model.model.get_submodule("layers.0.self_attn.o_proj")
    assert layer.r["default"] == 1 and layer.lora_A["default"].weight.abs().max() == 0
    assert_reproduces("tiny-llama", st, w, pm)


# ----------------------------------------------------------------------------- merged

@pytest.mark.parametrize("name", sorted(MERGED_CASES))
def test_merged_model_reproduces_s3pet(name, tmp_path):
    bb, st, w = make(name, MERGED_CASES[name])
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    out = E.export_merged(st, bb, tmp_path / "merged", w)
    assert all(torch.equal(v, bb.state_dict()[k]) for k, v in before.items())  # caller's backbone untouched
    model = tf.AutoModel.from_pretrained(str(out))
    assert_reproduces(name, st, w, model)
    if name == "tiny-llama":  # the new q/o biases survive reloading through the config switch
        assert model.config.attention_bias is True
        assert model.layers[0].self_attn.o_proj.bias is not None
        assert torch.count_nonzero(model.layers[0].self_attn.k_proj.bias) == 0


def test_merge_folds_conv1d_lora_transposed():
    bb, st, w = make("tiny-gpt2", [{"kind": "lora", "roles": ["attn.qkv"], "rank": 2, "alpha": 2.0}])
    merged = E.merge(st, bb, w)
    key = "deltas." + "h__0__attn__c_attn--lora"
    delta = (w[f"{key}.lora_B"] @ w[f"{key}.lora_A"]).T  # Conv1D keeps W as (in, out)
    torch.testing.assert_close(merged.h[0].attn.c_attn.weight - bb.h[0].attn.c_attn.weight, delta)


def test_t5_bias_that_from_pretrained_would_drop_is_refused(tmp_path):
    bb, st, w = make("tiny-t5", [{"kind": "bitfit", "roles": ["attn.q"], "stacks": ["encoder"]}])
    merged = E.merge(st, bb, w)  # computed in memory
    assert merged.encoder.block[0].layer[0].SelfAttention.q.bias is not None
    with pytest.raises(StructureError, match=r"from_pretrained would drop .*SelfAttention\.q\.bias"):
        E.export_merged(st, bb, tmp_path / "m", w)
    assert list(tmp_path.iterdir()) == []


def test_bitfit_on_rmsnorm_cannot_merge(tmp_path):
    bb, st, w = make("tiny-llama", [{"kind": "bitfit", "roles": ["norm.final"]}])
    with pytest.raises(StructureError, match="LlamaRMSNorm without a bias"):
        E.merge(st, bb, w)


# ----------------------------------------------------------------------------- weights

def test_weights_with_wrong_keys_or_shapes(tmp_path):
    bb, st, w = make("tiny-bert", [LORA])
    first = sorted(w)[0]
    renamed = {("x" + k if k == first else k): v for k, v in w.items()}
    with pytest.raises(StructureError, match=r"missing .*unexpected"):
        E.export_peft(st, bb, tmp_path / "a", renamed)
    with pytest.raises(StructureError, match="wrong shape"):
        E.export_merged(st, bb, tmp_path / "a", {**w, first: torch.zeros(2, 2)})
    file_style = {f"deltas.{k}": v for k, v in w.items()}
    with pytest.raises(StructureError, match="strip"):
        E.merge(st, bb, file_style)
    assert not (tmp_path / "a").exists()


# ----------------------------------------------------------------------------- runs and folders

def fake_run(tmp_path, name, entries):
    """A run directory as train_structure writes it: structure.json, config.json, delta.safetensors."""
    bb, st, w = make(name, entries)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    st.save(run_dir / "structure.json")
    (run_dir / "config.json").write_text(json.dumps({"train": {"seed": 0}}))
    head = {"head.weight": torch.randn(2, 32), "head.bias": torch.randn(2)}
    save_file({**{f"deltas.{k}": v for k, v in w.items()}, **head}, str(run_dir / "delta.safetensors"))
    return run_dir, st, w


@pytest.mark.parametrize("to", ["peft", "merged"])
def test_export_run_without_a_task_exports_the_backbone(to, tmp_path):
    run_dir, st, w = fake_run(tmp_path, "tiny-bert", [LORA, BITFIT])
    out = E.export_run(run_dir / "structure.json", tmp_path / "out", to=to)
    head = load_file(str(out / "head.safetensors"))
    assert set(head) == {"weight", "bias"}
    if to == "peft":
        model = peft.PeftModel.from_pretrained(load_backbone("tiny-bert"), str(out))
    else:
        model = tf.AutoModel.from_pretrained(str(out))
    assert_reproduces("tiny-bert", st, w, model)
    assert E.read_export_info(out)["trained"] is True


def test_export_run_with_a_task_loads_as_a_sequence_classifier(tmp_path):
    run_dir, st, w = fake_run(tmp_path, "tiny-bert", [LORA, BITFIT])
    (run_dir / "config.json").write_text(json.dumps({"task": "sst2", "train": {"seed": 0, "pooling": "auto"}}))
    (run_dir / "metrics.json").write_text(json.dumps({"test": {"accuracy": 0.75, "main": 0.75}}))
    out = E.export_run(run_dir, tmp_path / "out")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and "classifier" in cfg["modules_to_save"]
    assert not (out / "head.safetensors").exists()  # the head is in the adapter
    card = (out / "README.md").read_text()
    assert "num_labels=2" in card and "test accuracy 0.75" in card
    saved = load_file(str(out / "adapter_model.safetensors"))
    head = load_file(str(run_dir / "delta.safetensors"))
    clf = [k for k in saved if "classifier" in k and k.endswith("weight")]
    assert len(clf) == 1 and torch.equal(saved[clf[0]], head["head.weight"])


def test_export_run_without_weights_refuses_unless_untrained(tmp_path, caplog):
    _, st, _ = make("tiny-bert", [LORA])
    st.save(tmp_path / "structure.json")
    for to in E.FORMATS:
        with pytest.raises(ConfigError, match="--untrained") as e:
            E.export_run(tmp_path / "structure.json", tmp_path / "out", to=to)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    with caplog.at_level(logging.WARNING, logger="s3pet.export"):
        out = E.export_run(tmp_path / "structure.json", tmp_path / "out", to="peft", untrained=True)
    assert "untrained" in caplog.text
    assert E.read_export_info(out)["trained"] is False


def test_export_run_rejects_full_finetuning_weights(tmp_path):
    run_dir, _, _ = fake_run(tmp_path, "tiny-bert", [LORA])
    save_file({"backbone.x": torch.zeros(1)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(StructureError, match="full fine-tuning"):
        E.export_run(run_dir, tmp_path / "out", weights_path=tmp_path / "full.safetensors")
    with pytest.raises(ConfigError, match="format"):
        E.export_run(run_dir, tmp_path / "out", to="onnx")


def test_output_folder_is_replaced_atomically(tmp_path, monkeypatch):
    bb, st, w = make("tiny-bert", [LORA])
    out = tmp_path / "out"
    E.export_peft(st, bb, out, w)
    first = (out / "adapter_model.safetensors").read_bytes()
    w2 = {k: v + 1 for k, v in w.items()}
    E.export_peft(st, bb, out, w2)  # an earlier export is replaced
    assert (out / "adapter_model.safetensors").read_bytes() != first
    second = (out / "adapter_model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(E.adapter, "write_extras", boom)
    with pytest.raises(RuntimeError):
        E.export_peft(st, bb, out, w)
    assert (out / "adapter_model.safetensors").read_bytes() == second  # untouched on error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an s3pet export"):
        E.export_merged(st, bb, other, w)
    assert (other / "keep.txt").read_text() == "mine"
