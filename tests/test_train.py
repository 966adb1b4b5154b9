"""Retrain, baselines, evaluate, transfer and average through the library and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from s3pet import structure as S
from s3pet.baselines import METHODS, baseline_structure
from s3pet.cli import main
from s3pet.errors import ConfigError
from s3pet.models import count_params, load_backbone, load_tokenizer
from s3pet.pipeline import baseline, evaluate_run, retrain, search
from s3pet.search import SearchConfig
from s3pet.space import discover_sites, stack_depths, total_params
from s3pet.train import TrainConfig
from s3pet.transfer import average_runs, map_structure
from synthetic import write_sentiment_task


@pytest.fixture
def toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=128, n_eval=40))


def _tcfg(**kw):
    base = dict(max_steps=30, batch_size=16, lr=1e-2, eval_every=10, progress=False, log_every=5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("full", "lst")])  # lst: tests/test_lst.py
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-gpt2", "tiny-llama", "tiny-t5"])
def test_baseline_structures_fit_the_budget(method, model):
    bb = load_backbone(model)
    budget = 2000
    st = baseline_structure(method, bb, budget, seed=1)
    assert 0 < st.n_params <= budget
    kinds = {"random": {"lora", "adapter", "bitfit", "lnfit", "lowrank_adapter", "ia3"},
             "lnfit": {"lnfit", "bitfit"}}  # LN-tuning: a norm's scale and its bias
    assert {m["kind"] for m in st.modules} <= kinds.get(method, {method.removesuffix("-all")})
    # Rebuilt on the model, the structure has exactly the parameters it claims (each tensor
    # shared across modules, Compacter's and FacT's, once).
    assert total_params(S.to_specs(st, bb)) == st.n_params


def test_lora_baseline_uses_largest_uniform_rank_on_query_value():
    bb = load_backbone("tiny-bert")
    st = baseline_structure("lora", bb, 1500)  # q,v at rank 5 (1,280) beats every wider placement
    roles = {m["role"] for m in st.modules}
    assert roles == {"attn.q", "attn.v"}
    ranks = {m["rank"] for m in st.modules}
    assert len(ranks) == 1
    r = ranks.pop()
    assert st.n_params <= 1500 < st.n_params // r * (r + 1)  # one rank more would not fit


def test_random_baseline_is_seeded():
    bb = load_backbone("tiny-bert")
    a, b, c = (baseline_structure("random", bb, 1500, seed=s).modules for s in (0, 0, 1))
    assert a == b and a != c


def test_retrain_writes_a_complete_run_and_learns(tmp_path, toy):
    bb = load_backbone("tiny-bert")
    st = baseline_structure("lora", bb, 1500)
    st.save(tmp_path / "s.json")
    # Mean pooling: a random tiny model's pooler is random and frozen, which makes the toy task
    # needlessly hard; the pooler read-out is tested against transformers in test_yardstick.py.
    m = retrain(tmp_path / "s.json", toy, tmp_path / "run", _tcfg(max_steps=100, lr=3e-2, eval_every=20,
                                                                   pooling="mean"))
    run = tmp_path / "run"
    for name in ("config.json", "metrics.json", "history.jsonl", "delta.safetensors", "structure.json"):
        assert (run / name).is_file(), name
    assert m["params"]["pet"] == st.n_params and m["params"]["head"] == 32 * 2 + 2
    assert m["test"]["main"] >= 0.8, m  # the toy task is learnable: chance is 0.5
    w = load_file(str(run / "delta.safetensors"))
    assert all(k.startswith(("deltas.", "head.")) for k in w)
    assert sum(v.numel() for k, v in w.items() if k.startswith("deltas.")) == st.n_params
    hist = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert any("eval" in r for r in hist) and any("loss" in r for r in hist)
    # Re-evaluating the saved weights reproduces the reported test metric.
    ev = evaluate_run(run)
    assert ev["test"]["main"] == pytest.approx(m["test"]["main"])


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-t5"])
def test_retrain_other_families(tmp_path, toy, model):
    bb = load_backbone(model)
    st = baseline_structure("bitfit", bb, 1000)
    st.save(tmp_path / "s.json")
    m = retrain(tmp_path / "s.json", toy, tmp_path / "run", _tcfg(max_steps=6))
    assert m["params"]["pet"] == st.n_params
    assert 0.0 <= m["test"]["main"] <= 1.0


def test_full_finetuning_trains_every_weight(tmp_path, toy):
    m = baseline("full", None, toy, tmp_path / "run", _tcfg(max_steps=4), model="tiny-bert")
    bb = load_backbone("tiny-bert")
    assert m["params"]["pet"] == count_params(bb)
    assert m["method"] == "full"


def test_baseline_requires_budget(tmp_path, toy):
    with pytest.raises(ConfigError, match="--budget"):
        baseline("lora", None, toy, tmp_path / "run", _tcfg(), model="tiny-bert")


def _deep_bert(tmp_path, layers):
    import transformers as tf

    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    path = tmp_path / f"bert{layers}"
    tf.BertModel(cfg).save_pretrained(path)
    load_tokenizer("tiny-bert").save_pretrained(path)
    return str(path)


def test_transfer_six_to_twelve_layers_by_relative_depth(tmp_path):
    small, big = _deep_bert(tmp_path, 6), _deep_bert(tmp_path, 12)
    bb6 = load_backbone(small)
    st = baseline_structure("random", bb6, 4000, seed=3)
    bb12 = load_backbone(big)
    held = map_structure(st, bb12, "depth")
    assert len(held.modules) == len(st.modules)
    assert stack_depths(discover_sites(bb12)) == {"encoder": 12}
    src = {(m["role"], m["kind"], m["layer"]) for m in st.modules}
    for m in held.modules:
        if 0 <= m["layer"] < 12:
            # layer l of 6 lands at round(l * 11 / 5): 0 -> 0, 5 -> 11.
            assert any(r == m["role"] and k == m["kind"] and round(l * 11 / 5) == m["layer"] for r, k, l in src)
    assert sorted(m["rank"] for m in held.modules) == sorted(m["rank"] for m in st.modules)
    stretched = map_structure(st, bb12, "stretch")
    in_blocks = sum(1 for m in st.modules if 0 <= m["layer"] < 6)
    assert sum(1 for m in stretched.modules if 0 <= m["layer"] < 12) == 2 * in_blocks
    assert stretched.provenance["transfer"]["budget"] == "scaled"
    # The mapped structure applies cleanly to the deeper model.
    ds = S.apply(held, bb12)
    assert sum(p.numel() for p in ds.parameters()) == held.n_params


def test_average_of_searches_rederives_under_the_budget(tmp_path, toy):
    cfg = SearchConfig(max_steps=4, batch_size=8, eval_every=4, progress=False)
    runs = []
    for seed in (0, 1):
        cfg.seed = seed
        search("tiny-bert", toy, "s3pet-m", "700", tmp_path / f"s{seed}", cfg)
        runs.append(tmp_path / f"s{seed}")
    st = average_runs(runs, "500")
    assert 0 < st.n_params <= 500
    assert st.provenance["average_of"] == [str(r) for r in runs]


def test_cli_stages_end_to_end(tmp_path, toy, capsys):
    out = tmp_path / "s"
    assert main(["search", "--model", "tiny-bert", "--task", toy, "--budget", "0.08%", "--out", str(out),
                 "--max-steps", "4", "--batch-size", "8", "--no-progress"]) == 0
    assert "structure:" in capsys.readouterr().out
    assert main(["retrain", "--structure", str(out / "structure.json"), "--task", toy, "--out", str(tmp_path / "r"),
                 "--max-steps", "4", "--batch-size", "8", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(tmp_path / "r")]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["main"] >= 0


@pytest.mark.parametrize("argv, needle", [
    (["retrain", "--structure", "/nonexistent/s.json", "--task", "rte", "--out", "/tmp/x"], "not found"),
    (["search", "--model", "tiny-bert", "--task", "no-such-task", "--budget", "100", "--out", "OUT"], "no-such-task"),
    (["search", "--model", "tiny-bert", "--task", "rte", "--budget", "lots", "--out", "OUT"], "lots"),
    (["baseline", "--method", "lora", "--task", "rte", "--out", "OUT", "--model", "tiny-bert"], "--budget"),
    (["evaluate", "--run", "/nonexistent"], "not a finished"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err


def test_cli_tasks_lists_every_card(capsys):
    from s3pet.tasks import list_tasks

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for card in list_tasks():
        assert card.name in out
    assert "mean(accuracy,f1)" in out  # MRPC's main metric is the mean of its two metrics
