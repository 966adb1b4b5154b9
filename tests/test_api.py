"""The Python API (``import s3pet``): lazy import, the stage functions, ``apply_structure``, the README example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

import s3pet
from s3pet import structure as S
from s3pet.baselines import baseline_structure
from s3pet.errors import ConfigError, StructureError
from s3pet.models import load_backbone, load_config
from s3pet.pipeline import evaluate_run
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(max_steps=12, batch_size=16, max_train_samples=64, max_eval_samples=20, progress=False, eval_every=6)


@pytest.fixture
def toy(tmp_path):
    return str(write_sentiment_task(tmp_path / "task", n_train=64, n_eval=20))


def test_import_is_light_and_names_resolve():
    code = ("import sys, s3pet; assert 'torch' not in sys.modules, 'torch imported'; "
            "print(sorted(set(s3pet.__all__) - set(dir(s3pet))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    for name in s3pet.__all__:
        assert getattr(s3pet, name) is not None
    with pytest.raises(AttributeError):
        s3pet.no_such_name  # noqa: B018


def test_search_and_export_are_functions_and_stay_modules():
    import s3pet.export as export_pkg
    from s3pet.search import SearchConfig

    assert callable(s3pet.search) and callable(s3pet.export)
    assert s3pet.search.SearchConfig is SearchConfig is s3pet.SearchConfig  # the module's names are all there
    assert s3pet.export is export_pkg and callable(export_pkg.export_run)


def test_stages_through_the_api(tmp_path, toy):
    st = s3pet.search("tiny-bert", toy, budget=1000, out=tmp_path / "search", **QUICK)  # s3pet-m: every kind
    assert st.to_dict() == S.load(tmp_path / "search" / "structure.json").to_dict()
    assert 0 < st.n_params <= 1000
    # Re-derived at the search's own budget: the search's structure; at a smaller one: within it.
    same = s3pet.derive(tmp_path / "search", 1000)
    assert [(m["site"], m["kind"], m["rank"]) for m in same.modules] == [(m["site"], m["kind"], m["rank"])
                                                                       for m in st.modules]
    small = s3pet.derive(str(tmp_path / "search"), 400)
    assert 0 < small.n_params <= 400 and small.budget["params"] == 400
    m = s3pet.retrain(st, toy, tmp_path / "retrain", config=s3pet.TrainConfig(**QUICK), pooling="mean")
    assert m["params"]["pet"] == st.n_params and m["pooling"] == "mean"
    assert S.load(tmp_path / "retrain" / "structure.json").to_dict()["modules"] == st.to_dict()["modules"]
    run = s3pet.load_run(tmp_path / "retrain")
    preds = run.predict(["a great film", {"text": "a dull plot"}])
    assert [set(p) for p in preds] == [{"label", "label_id", "scores"}] * 2
    assert all(p["label"] == ("neg", "pos")[p["label_id"]] for p in preds)
    # The loaded run is the one evaluation scores.
    assert evaluate_run(tmp_path / "retrain")["test"] == pytest.approx(m["test"])
    with pytest.raises(StructureError, match="lowrank_adapter"):  # export_run's own refusal, passed on
        s3pet.export(tmp_path / "retrain", tmp_path / "merged", to="merged")
    assert not (tmp_path / "merged").exists()


def test_unknown_setting_is_a_config_error_before_anything_is_written(tmp_path, toy):
    with pytest.raises(ConfigError, match="max_stepz"):
        s3pet.search("tiny-bert", toy, budget=1000, out=tmp_path / "s", max_stepz=3)
    with pytest.raises(ConfigError, match="TrainConfig"):
        s3pet.retrain(tmp_path / "none.json", toy, tmp_path / "r", config=s3pet.SearchConfig())
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def _inputs(alias: str) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 500, (2, 7), generator=g)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if alias == "tiny-t5":
        kw["decoder_input_ids"] = torch.zeros(2, 1, dtype=torch.long)
    return kw


# (alias, transformers class a user would load, the trainable parameters outside the backbone)
FAMILIES = [("tiny-bert", tf.AutoModelForSequenceClassification, {"classifier.weight", "classifier.bias"}),
            ("tiny-gpt2", tf.AutoModelForSequenceClassification, {"score.weight"}),
            ("tiny-llama", tf.AutoModelForSequenceClassification, {"score.weight"}),
            ("tiny-t5", tf.AutoModelForSeq2SeqLM, set())]


@pytest.mark.parametrize("alias,auto,head", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_apply_structure_is_get_peft_model(tmp_path, alias, auto, head):
    st = baseline_structure("random", load_backbone(alias), 600, seed=1)
    st.save(tmp_path / "s.json")
    torch.manual_seed(0)
    model = auto.from_config(load_config(alias)).eval()
    inputs = _inputs(alias)
    with torch.no_grad():
        before = model(**inputs).logits
    pm = s3pet.apply_structure(model, tmp_path / "s.json")
    assert isinstance(pm, s3pet.PetModel) and pm.config is model.config
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert {n for n in trainable if not n.startswith("deltas.")} == {f"model.{n}" for n in head}
    assert pm.trainable_parameters()["pet"] == st.n_params
    assert set(model.state_dict()) == set(auto.from_config(load_config(alias)).state_dict())  # its tree untouched
    with torch.no_grad():
        for p in pm.deltas.parameters():
            p.normal_(0, 0.5)
    out = pm(**inputs).logits
    assert not torch.allclose(out, before, atol=1e-4)  # the modules act on the output through the hooks
    out.float().pow(2).mean().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n not in head)  # the backbone is frozen
    assert all(p.grad is not None for p in pm.deltas.parameters())
    pm.deltas.detach()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)  # without the hooks: the model as it was


def test_apply_structure_checks_the_model():
    st = baseline_structure("lora", load_backbone("tiny-gpt2"), 600)
    with pytest.raises(StructureError, match="no such site"):
        s3pet.apply_structure(tf.AutoModelForSequenceClassification.from_config(load_config("tiny-bert")), st)


def test_readme_example_runs(tmp_path, monkeypatch, toy):
    """The README's Python API example, verbatim but for the task: the synthetic card stands for
    rotten-tomatoes, whose data comes from PyPI."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert code.count('"rotten-tomatoes"') == 2
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"rotten-tomatoes"', repr(toy)), "README.md", "exec"), {})
    for f in ("search/structure.json", "retrain/metrics.json", "adapter/adapter_config.json"):
        assert (tmp_path / "runs" / f).is_file(), f
