"""Task export: the adapter loads with the two standard transformers + peft lines and predicts
what s3pet's own TaskModel predicts, on every family; what cannot be expressed is refused."""

import json
import warnings

import peft
import pytest
import torch
import transformers as tf

from s3pet.errors import ConfigError, StructureError
from s3pet.export import read_export_info
from s3pet.export.task import export_task
from s3pet.export.weights import tolerance
from s3pet.heads import TaskModel
from s3pet.inject import DeltaSet
from s3pet.models import load_backbone, load_tokenizer
from s3pet.structure import to_specs
from s3pet.tasks import get_card

from test_export import BITFIT, LNFIT, LORA, make

# BitFit on linears with a bias (BERT, GPT-2) and without one (LLaMA: attn.o has no LoRA).
LLAMA = [LORA, LNFIT, {"kind": "bitfit", "roles": ["attn.q", "attn.o"]}]
CASES = [("tiny-bert", "sst2", [LORA, BITFIT, LNFIT]), ("tiny-bert", "stsb", [LORA, BITFIT]),
         ("tiny-roberta", "mnli", [LORA, BITFIT, LNFIT]), ("tiny-gpt2", "sst2", [LORA, BITFIT, LNFIT]),
         ("tiny-gpt2", "stsb", [LORA]), ("tiny-llama", "sst2", LLAMA), ("tiny-t5", "sst2", [LORA, LNFIT]),
         ("minilm", "rotten-tomatoes", [LORA, BITFIT])]
TEXTS = ["a gripping, funny film", "dull", "the plot goes nowhere and the actors know it", "fine."]


def task_model(name, task, entries, head_bias=True):
    """(TaskModel with a random non-zero head, structure, random non-zero weights)."""
    bb, st, w = make(name, entries)
    tm = TaskModel(bb, get_card(task), load_tokenizer(name))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in tm.head.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if head_bias or n != "bias" else 0.0))
    return tm, st, w


def batch(name):
    enc = load_tokenizer(name)(TEXTS, padding=True, return_tensors="pt")  # right padding
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.no_grad()
def s3pet_logits(name, task, st, w, head):
    """s3pet's own model from scratch: a fresh backbone, the DeltaSet, the head."""
    bb = load_backbone(name)
    tm = TaskModel(bb, get_card(task), load_tokenizer(name))
    tm.head.load_state_dict(head)
    ds = DeltaSet(to_specs(st, bb))
    ds.load_state_dict(w)
    ds.attach(bb)
    tm.eval()
    return tm(batch(name)).float(), tm


def standard_load(base, folder, num_labels, seq2seq):
    """The two lines a transformers + peft user writes; returns (model, load warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if seq2seq:
            model = tf.AutoModelForSeq2SeqLM.from_pretrained(base)
        else:
            model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
        model = peft.PeftModel.from_pretrained(model, folder)
    return model.eval(), [str(c.message) for c in caught]


@pytest.mark.parametrize("name,task,entries", CASES, ids=[f"{n}-{t}" for n, t, _ in CASES])
def test_standard_two_lines_predict_as_s3pet(name, task, entries, tmp_path):
    tm, st, w = task_model(name, task, entries, head_bias=name != "tiny-llama")
    head = {k: v.clone() for k, v in tm.head.state_dict().items()}
    out = export_task(tm, st, tmp_path / "adapter", w, metrics={"accuracy": 0.5})
    base = tmp_path / "base"
    load_backbone(name).save_pretrained(base)  # the base as the hub would serve it
    cfg = json.loads((out / "adapter_config.json").read_text())
    seq2seq = name == "tiny-t5"
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if seq2seq else "SEQ_CLS")
    assert cfg["bias"] == "none"  # no base-model bias is overwritten: disable_adapter() undoes everything
    head_name = {"tiny-gpt2": "score", "tiny-llama": "score", "tiny-t5": None}.get(name, "classifier")
    if head_name:
        assert head_name in cfg["modules_to_save"]
    card = (out / "README.md").read_text()
    assert "base_model: " + ("sentence-transformers/all-MiniLM-L6-v2" if name == "minilm" else name) in card
    assert "site-packages" not in card and "site-packages" not in cfg["base_model_name_or_path"]
    model, caught = standard_load(str(base), str(out), 1 if task == "stsb" else get_card(task).num_labels, seq2seq)
    assert not [m for m in caught if "missing adapter keys" in m.lower()], caught

    ref, ref_tm = s3pet_logits(name, task, st, w, head)
    b = batch(name)
    with torch.no_grad():
        if seq2seq:
            dec = torch.zeros_like(b["input_ids"][:, :1])
            got = model(**b, decoder_input_ids=dec).logits[:, 0, ref_tm.label_token_ids]
        else:
            got = model(**b).logits.squeeze(-1) if task == "stsb" else model(**b).logits
        with model.disable_adapter():  # the adapter carries every change, so disabling it shows
            plain = model(**b, **({"decoder_input_ids": dec} if seq2seq else {})).logits
    plain = plain[:, 0, ref_tm.label_token_ids] if seq2seq else (plain.squeeze(-1) if task == "stsb" else plain)
    tol = tolerance(torch.float32, ref.abs().max().item())
    assert (ref - plain.float()).abs().max() > 100 * tol  # a dropped delta or head would show
    assert (ref - got.float()).abs().max() <= tol
    if task != "stsb":
        assert torch.equal(ref.argmax(-1), got.argmax(-1))
    info = read_export_info(out)
    assert info["trained"] is True and info["task"] == task


def test_disable_adapter_restores_the_base_biases(tmp_path):
    tm, st, w = task_model("tiny-bert", "sst2", [BITFIT])  # BitFit alone: zero rank-1 LoRAs carry it
    out = export_task(tm, st, tmp_path / "a", w)
    base = tmp_path / "base"
    load_backbone("tiny-bert").save_pretrained(base)
    model, _ = standard_load(str(base), str(out), 2, False)
    plain = tf.AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2).eval()
    site = "bert.encoder.layer.0.attention.output.dense"
    wrapped = model.base_model.model.get_submodule(site)
    torch.testing.assert_close(wrapped.get_base_layer().bias, plain.get_submodule(site).bias, rtol=0, atol=0)
    assert wrapped.lora_B["default"].bias.abs().max() > 0


def test_llama_head_bias_is_refused_by_name(tmp_path):
    tm, st, w = task_model("tiny-llama", "sst2", LLAMA, head_bias=True)
    with pytest.raises(StructureError, match="no bias") as e:
        export_task(tm, st, tmp_path / "a", w)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "a").exists()


def test_mean_pooling_and_t5_regression_are_refused(tmp_path):
    bb, st, w = make("tiny-bert", [LORA])
    tm = TaskModel(bb, get_card("sst2"), pooling="mean")
    with pytest.raises(StructureError, match="--pooling auto"):
        export_task(tm, st, tmp_path / "a", w)
    bb, st, w = make("tiny-t5", [LORA])
    with pytest.raises(StructureError, match="no transformers class"):
        export_task(TaskModel(bb, get_card("stsb")), st, tmp_path / "b", w)


def test_untrained_needs_to_be_asked_for(tmp_path):
    tm, st, _ = task_model("tiny-bert", "sst2", [LORA])
    with pytest.raises(ConfigError, match="--untrained"):
        export_task(tm, st, tmp_path / "a", None)
    out = export_task(tm, st, tmp_path / "a", None, untrained=True)
    assert read_export_info(out)["trained"] is False
    assert "Untrained" in (out / "README.md").read_text()
