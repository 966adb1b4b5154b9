"""The training loop and the search on bad runs: empty splits, gradient accumulation per
optimizer step, divergence stopping the run at once with nothing presented as a result."""

from __future__ import annotations

import pytest
import torch

from s3pet import structure as S
from s3pet import train as T
from s3pet.baselines import baseline_structure
from s3pet.errors import ConfigError, TaskError, TrainingError
from s3pet.heads import TaskModel
from s3pet.models import load_backbone, load_tokenizer
from s3pet.pipeline import retrain, search
from s3pet.search import SearchConfig
from s3pet.tasks import load_task
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return str(write_sentiment_task(tmp_path_factory.mktemp("task"), n_train=80, n_eval=16))


def _task(toy, n_train=None):
    td = load_task(toy)
    enc = T.encode_task(td, load_tokenizer("tiny-bert"), 32)
    if n_train is not None:
        enc.train.features, enc.train.labels = enc.train.features[:n_train], enc.train.labels[:n_train]
    return td, enc


def _fit(toy, n_train=None, **cfg):
    td, enc = _task(toy, n_train)
    bb = load_backbone("tiny-bert")
    ds = S.apply(baseline_structure("bitfit", bb, 500), bb)
    tm = TaskModel(bb, td.card, load_tokenizer("tiny-bert"))
    base = dict(batch_size=8, epochs=1.0, progress=False, device="cpu")
    base.update(cfg)
    return tm, T.fit(tm, {"deltas": list(ds.parameters()), "head": tm.head_parameters()}, enc, T.TrainConfig(**base))


def test_each_optimizer_step_sums_exactly_grad_accum_micro_batches(toy, monkeypatch):
    """10 batches an epoch, grad_accum 3: 3 steps of 3 micro-batches per epoch, the 10th batch
    is skipped, not carried into the next epoch's first step."""
    per_step, counter = [], {"n": 0}
    real = T.make_adamw

    def counting(*a, **kw):
        opt = real(*a, **kw)

        def before_step(*_):
            per_step.append(counter["n"])
            counter["n"] = 0

        opt.register_step_pre_hook(before_step)
        return opt

    monkeypatch.setattr(T, "make_adamw", counting)
    monkeypatch.setattr(TaskModel, "loss", lambda self, logits, labels, _real=TaskModel.loss:
                        counter.__setitem__("n", counter["n"] + 1) or _real(self, logits, labels))
    _, res = _fit(toy, grad_accum=3, epochs=3.0)  # 80 examples / 8 = 10 batches
    assert res.steps == 9
    assert per_step == [3] * 9


@pytest.mark.parametrize("n_train", [0])
def test_empty_training_split_is_a_task_error_not_a_hang(toy, n_train):
    with pytest.raises(TaskError, match="training split .* is empty"):
        _fit(toy, n_train=n_train)


def test_grad_accum_beyond_an_epoch_is_a_config_error(toy):
    with pytest.raises(ConfigError, match="--grad-accum"):
        _fit(toy, grad_accum=11)


def test_diverged_training_stops_at_once_and_names_the_setting(toy):
    with pytest.raises(TrainingError, match=r"diverged at step \d+: .* lower --lr"):
        _fit(toy, lr=1e30, grad_clip=0.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("name", ["lr", "epochs", "weight_decay", "warmup_ratio"])
def test_train_settings_must_be_finite_and_in_range(name, value):
    with pytest.raises(ConfigError, match=name):
        T.TrainConfig(**{name: value})


@pytest.mark.parametrize("kw", [dict(xi=-1.0), dict(max_steps=-3), dict(alpha_lr=float("nan")),
                                dict(epochs=float("inf")), dict(max_steps=2.5), dict(device="gpu"),
                                dict(device="mps"), dict(seed=-1), dict(batch_size=True)])
def test_search_settings_must_be_finite_and_in_range(kw):
    with pytest.raises(ConfigError):
        SearchConfig(**kw)


def test_diverged_retrain_leaves_no_result(tmp_path, toy):
    bb = load_backbone("tiny-bert")
    baseline_structure("bitfit", bb, 500).save(tmp_path / "s.json")
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="lower --lr"):
        retrain(tmp_path / "s.json", toy, out, T.TrainConfig(lr=1e30, grad_clip=0.0, max_steps=5, batch_size=8,
                                                            progress=False))
    assert not out.exists()


def test_diverged_search_stops_at_once_and_leaves_no_result(tmp_path, toy):
    out = tmp_path / "run"
    cfg = SearchConfig(alpha_lr=1e30, max_steps=20, batch_size=8, progress=False)
    with pytest.raises(TrainingError, match=r"search diverged at step \d+: .*--alpha-lr"):
        search("tiny-bert", toy, "s3pet-m", "800", out, cfg)
    assert not out.exists()


def test_a_budget_beyond_the_whole_space_is_warned_about(tmp_path, toy, caplog):
    cfg = SearchConfig(max_steps=2, batch_size=8, progress=False)
    with caplog.at_level("WARNING", logger="s3pet.pipeline"):
        search("tiny-bert", toy, "s3pet-m", "1M", tmp_path / "run", cfg)
    assert "the whole space" in caplog.text


def test_an_unwritable_out_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    from s3pet import rundir

    monkeypatch.setattr(rundir.os, "access", lambda path, mode: False)  # as for a read-only parent
    with pytest.raises(ConfigError, match="not writable"):
        rundir.check(tmp_path / "a" / "b")
    assert not (tmp_path / "a").exists()


def test_a_failed_run_removes_exactly_what_it_made(tmp_path):
    from s3pet import rundir

    made = tmp_path / "new" / "run"
    with pytest.raises(TrainingError):
        with rundir.RunDir(made):
            (made / "config.json").write_text("{}")
            raise TrainingError("diverged")
    assert not (tmp_path / "new").exists()  # every folder it created, and nothing else
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (kept / "history.jsonl").write_text("{}\n")  # an older, unfinished run's
    with pytest.raises(TrainingError):
        with rundir.RunDir(kept):
            assert not (kept / "history.jsonl").exists()  # cleared at the start of a new run
            (kept / "metrics.json").write_text("{}")
            raise TrainingError("diverged")
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_a_resumed_run_keeps_its_files_on_error(tmp_path):
    from s3pet import rundir

    out = tmp_path / "run"
    out.mkdir()
    (out / "search.pt").write_bytes(b"checkpoint")
    with pytest.raises(ConfigError):
        with rundir.RunDir(out, resume=True):
            raise ConfigError("corrupt checkpoint")
    assert (out / "search.pt").read_bytes() == b"checkpoint" and not (out / ".s3pet.lock").exists()
