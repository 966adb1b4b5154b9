"""The fair-baseline machinery: the model's own head, per-kind learning rates, the peft
references, and the hand-designed LoRA shapes."""

from __future__ import annotations

import json

import pytest
import torch

from s3pet import structure as S
from s3pet.baselines import baseline_structure
from s3pet.cli import BASELINE_METHODS
from s3pet.errors import ConfigError, TaskError
from s3pet.heads import TaskModel
from s3pet.models import load_backbone, load_config
from s3pet.pipeline import baseline
from s3pet.space import discover_sites
from s3pet.train import TrainConfig, learning_rates, planned_steps
from synthetic import write_sentiment_task

@pytest.fixture
def toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=96, n_eval=32))


def _card(toy):
    from s3pet.tasks import load_task

    return load_task(toy).card


def _batch(n=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 2000, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 0, 1])}


def test_pooler_head_is_exactly_auto_model_for_sequence_classification(toy):
    import transformers as tf

    card = _card(toy)
    bb = load_backbone("tiny-bert", seed=3)
    tm = TaskModel(bb, card).eval()
    assert tm.pooling == "pooler"
    cfg = load_config("tiny-bert")
    cfg.num_labels = 2
    hf = tf.AutoModelForSequenceClassification.from_config(cfg).eval()
    hf.bert.load_state_dict(bb.state_dict())
    hf.classifier.load_state_dict(tm.head.state_dict())
    batch = _batch()
    with torch.no_grad():
        ours = tm(batch)
        theirs = hf(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(ours, theirs)
    # The classifier starts as transformers initialises it: zero bias, small normal weights.
    assert torch.count_nonzero(TaskModel(bb, card).head.bias) == 0


def test_mean_pooling_and_models_without_a_pooler(toy):
    card = _card(toy)
    bb = load_backbone("tiny-bert")
    tm = TaskModel(bb, card, pooling="mean").eval()
    batch = _batch()
    with torch.no_grad():
        h = bb(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               token_type_ids=batch["token_type_ids"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        expect = tm.head((h * m).sum(1) / m.sum(1))
        torch.testing.assert_close(tm(batch), expect)
    gpt = load_backbone("tiny-gpt2")
    assert TaskModel(gpt, card).pooling == "mean"  # decoders read the last token, whatever is asked
    with pytest.raises(TaskError, match="no pooler"):
        TaskModel(gpt, card, pooling="pooler")
    with pytest.raises(ConfigError, match="pooling"):
        TrainConfig(pooling="cls")


def test_learning_rates_per_kind_head_and_scale():
    r = learning_rates(TrainConfig(), ["lora", "bitfit", "lora"])
    assert r == {"kind:bitfit": 1e-3, "kind:lora": 5e-4, "head": 1e-3}  # head: the largest module rate
    assert learning_rates(TrainConfig(), ["lora"])["head"] == 5e-4
    r = learning_rates(TrainConfig(lr_scale=2.0, head_lr=1e-2), ["lnfit"])
    assert r == pytest.approx({"kind:lnfit": 2e-3, "head": 2e-2})
    assert learning_rates(TrainConfig(lr=3e-3), ["lora", "adapter"]) == {"kind:adapter": 3e-3, "kind:lora": 3e-3,
                                                                         "head": 3e-3}
    full = learning_rates(TrainConfig(lr_scale=0.5), [], full=True)
    assert full == pytest.approx({"backbone": 2.5e-5, "head": 2.5e-5})


def test_planned_steps_matches_a_run(tmp_path, toy):
    cfg = TrainConfig(epochs=2, batch_size=16, progress=False, max_length=32)
    per_epoch, total = planned_steps(cfg, 96)
    assert (per_epoch, total) == (6, 12)
    m = baseline("bitfit", 500, toy, tmp_path / "b", cfg, model="tiny-bert")
    assert m["steps"] == total


def test_retrain_trains_each_kind_at_its_rate_and_records_it(tmp_path, toy):
    cfg = TrainConfig(max_steps=6, batch_size=16, progress=False, max_length=32, lr_scale=2.0)
    m = baseline("random", 3000, toy, tmp_path / "r", cfg, model="tiny-bert")
    kinds = {mod["kind"] for mod in json.loads((tmp_path / "r" / "structure.json").read_text())["modules"]}
    assert set(m["learning_rates"]) == {f"kind:{k}" for k in kinds} | {"head"}
    from s3pet.deltas import KINDS

    for k in kinds:
        assert m["learning_rates"][f"kind:{k}"] == pytest.approx(2 * KINDS[k].lr)
    assert m["pooling"] == "pooler"
    cfg_saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert cfg_saved["lr_scale"] == 2.0 and cfg_saved["pooling"] == "auto"


def test_lora_baselines_use_alpha_2r_and_lora_all_covers_every_linear():
    bb = load_backbone("tiny-bert")
    st = baseline_structure("lora", bb, 3000)
    assert all(m["params"]["alpha"] == 2 * m["rank"] for m in st.modules)
    sites = [s for s in discover_sites(bb) if s.host == "linear" and s.role != "other"]
    per_rank = sum(s.d_in + s.d_out for s in sites)
    st = baseline_structure("lora-all", bb, per_rank)  # exactly rank 1 on every linear
    assert {m["site"] for m in st.modules} == {s.path for s in sites}
    assert {m["rank"] for m in st.modules} == {1} and st.n_params == per_rank
    small = baseline_structure("lora-all", bb, per_rank // 3)  # trimmed: top layers first
    assert 0 < small.n_params <= per_rank // 3
    assert max(m["layer"] for m in small.modules) == max(s.layer for s in sites)


def test_cli_lists_every_baseline_method():
    from s3pet.baselines import METHODS
    from s3pet.peft_methods import METHODS as PEFT

    assert BASELINE_METHODS == METHODS + PEFT


# --------------------------------------------------------------------------- peft references

def test_peft_lora_reference_trains_and_its_adapter_loads_the_usual_way(tmp_path, toy):
    import peft

    from s3pet.peft_methods import load_classifier

    cfg = TrainConfig(max_steps=8, batch_size=16, progress=False, max_length=32)
    m = baseline("peft-lora-r8-qv", None, toy, tmp_path / "p", cfg, model="tiny-bert")
    # r=8 on query and value of 2 layers of width 32: 2 * 2 * 8 * (32 + 32)
    assert m["params"]["pet"] == m["params"]["trained"] == 2048
    assert m["params"]["head"] == 32 * 2 + 2 and m["learning_rates"] == {"kind:lora": 5e-4, "head": 5e-4}
    assert 0.0 <= m["test"]["main"] <= 1.0 and m["steps"] == 8
    # The saved adapter loads onto a fresh classifier with the two standard lines.
    base = load_classifier("tiny-bert", 2)
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "p" / "adapter")).eval()
    lora_b = [p for n, p in loaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(torch.count_nonzero(p) for p in lora_b)  # trained, not the zero init
    cls = [p for n, p in loaded.named_parameters() if "modules_to_save" in n and "classifier" in n]
    assert cls, "the classifier travels in modules_to_save"


def test_adalora_is_pruned_to_the_budget(tmp_path, toy):
    from s3pet.peft_methods import ALL_LINEARS, build, triplet_budget
    from s3pet.tasks import load_task

    card = load_task(toy).card
    tm, info = build("adalora", "tiny-bert", card, 1000, total_steps=40)
    bb = load_backbone("tiny-bert")
    k, mean = triplet_budget(bb, [s.path for s in discover_sites(bb) if s.role in ALL_LINEARS], 1000)
    assert info["triplets"] == k == int(1000 // mean) and info["final_params"] <= 1000
    cfg = TrainConfig(max_steps=40, batch_size=16, progress=False, max_length=32)
    m = baseline("adalora", 1000, toy, tmp_path / "a", cfg, model="tiny-bert")
    assert m["params"]["pet"] <= 1000 < m["params"]["trained"]  # trains more, keeps the budget
    with pytest.raises(ConfigError, match="triplet"):
        build("adalora", "tiny-bert", card, 10, total_steps=40)
    with pytest.raises(ConfigError, match="--budget"):
        baseline("adalora", None, toy, tmp_path / "b", cfg, model="tiny-bert")


def test_adalora_rank_allocator_runs_after_every_step(tmp_path, toy, monkeypatch):
    from s3pet import peft_methods as PM

    seen = []
    real = PM.adalora_step

    def spy(tm):
        step = real(tm)

        def wrapped(i):
            assert any(p.grad is not None for p in tm.peft_model.parameters() if p.requires_grad)
            seen.append(i)
            step(i)
        return wrapped

    monkeypatch.setattr(PM, "adalora_step", spy)
    cfg = TrainConfig(max_steps=12, batch_size=16, progress=False, max_length=32)
    baseline("adalora", 1000, toy, tmp_path / "a", cfg, model="tiny-bert")
    assert seen == list(range(12))  # 0-based, before the gradients are cleared


def test_peft_methods_refuse_multiple_choice():
    from s3pet.peft_methods import build
    from s3pet.tasks import get_card

    with pytest.raises(TaskError, match="sequence classification"):
        build("peft-lora-all-r1", "tiny-bert", get_card("copa"), None, total_steps=10)


def test_main_job_reads_out_by_mean_pooling_and_the_stages_by_the_models_pooler():
    from s3pet.cli import parse

    run = parse(["run", "--out", "x"]).cfg
    assert run.train.pooling == "mean" and run.search.pooling == "mean"
    base = parse(["baseline", "--method", "bitfit", "--budget", "1k", "--task", "t", "--out", "x"]).cfg
    assert base["train"].pooling == "auto"
    assert parse(["run", "--out", "x", "--pooling", "pooler"]).cfg.train.pooling == "pooler"


@pytest.mark.parametrize("alias", ["tiny-bert", "tiny-llama"])
def test_lnfit_baseline_trains_scale_and_bias_of_every_norm(alias):
    bb = load_backbone(alias)
    norms = [s for s in discover_sites(bb) if s.host == "norm"]
    both = 2 * sum(s.d_out for s in norms)
    st = baseline_structure("lnfit", bb, both)
    got = {(m["site"], m["kind"]) for m in st.modules}
    assert got == {(s.path, k) for s in norms for k in ("lnfit", "bitfit")} and st.n_params == both
    order = [(s.path, k) for s in sorted(norms, key=lambda s: (-s.layer, s.stack)) for k in ("lnfit", "bitfit")]
    small = baseline_structure("lnfit", bb, norms[0].d_out * 3)  # 3 vectors: the top norms, scale first
    assert {(m["site"], m["kind"]) for m in small.modules} == set(order[:3])


@pytest.mark.parametrize("method", ["peft-lora-r8-qv", "lst"])
def test_resume_of_a_run_outside_the_checkpointed_loop_is_one_line(tmp_path, toy, method):
    with pytest.raises(ConfigError, match="--resume is not supported") as e:
        baseline(method, "1k", toy, tmp_path / "o", TrainConfig(max_steps=2), model="tiny-bert", resume=True)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()
