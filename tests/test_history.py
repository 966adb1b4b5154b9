"""history.jsonl and its TensorBoard mirror: the same numbers, at the same steps."""

from __future__ import annotations

import importlib.util
import json

import pytest

from s3pet import history as H
from s3pet.errors import ConfigError
from s3pet.search import SearchConfig
from s3pet.train import TrainConfig

RECORDS = [{"step": 10, "epoch": 0, "loss": 0.5, "lr": 1e-3, "phase": "bilevel", "flag": True},
           {"step": 20, "epoch": 1, "eval": {"main": 0.8, "f1": 0.7, "name": "x"}},
           {"step": 20, "derived_params_by_kind": {"lora": 96, "bitfit": 32}, "loss": float("nan")}]


def test_scalars_of_a_record():
    assert H.scalars(RECORDS[0], "train") == {"train/loss": 0.5, "train/lr": 1e-3}
    assert H.scalars(RECORDS[1], "train") == {"eval/main": 0.8, "eval/f1": 0.7}
    assert H.scalars(RECORDS[2], "search") == {"search/derived_params_by_kind/lora": 96.0,
                                               "search/derived_params_by_kind/bitfit": 32.0}


def test_history_without_tensorboard_writes_jsonl_only(tmp_path):
    h = H.History(tmp_path, "train")
    for r in RECORDS:
        h.write(r)
    h.close()
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [10, 20, 20]
    assert not (tmp_path / H.TB_DIR).exists()
    H.History(None).write(RECORDS[0])  # no folder: nothing written, no error


def test_tensorboard_events_hold_the_history(tmp_path):
    pytest.importorskip("tensorboard", reason="TensorBoard logging needs the optional extra s3pet[tensorboard]")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    h = H.History(tmp_path, "search", tensorboard=True)
    for r in RECORDS:
        h.write(r)
    h.close()
    acc = EventAccumulator(str(tmp_path / H.TB_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"search/loss", "search/lr", "eval/main", "eval/f1", "search/derived_params_by_kind/lora",
                    "search/derived_params_by_kind/bitfit"}
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("eval/main")] == [(20, 0.8)]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("search/loss")] == [(10, 0.5)]


def test_tensorboard_missing_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    for make in (TrainConfig, SearchConfig):
        with pytest.raises(ConfigError, match=r"pip install 's3pet\[tensorboard\]'"):
            make(tensorboard=True)
        make(tensorboard=False)  # off by default: never needs the package
