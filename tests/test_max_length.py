"""The max length: the share of examples cut is always reported; 0 takes the length from the data."""

from __future__ import annotations

import json
import logging

import pytest

from s3pet import data as D
from s3pet import train as T
from s3pet.errors import ConfigError
from s3pet.models import load_tokenizer
from s3pet.search import SearchConfig
from s3pet.tasks import Example, load_task


def test_length_from_data_is_the_95th_percentile_rounded_up_and_capped():
    lengths = list(range(1, 101))  # 95th percentile: 95
    assert D.length_from_data(lengths, cap=512) == 96  # a multiple of 8
    assert D.length_from_data(lengths, cap=64) == 64  # never beyond the model
    assert D.length_from_data([5, 6, 7], cap=512) == 7  # never beyond the longest example
    assert D.length_from_data([3] * 99 + [10_000], cap=512) == 8  # one outlier does not set it
    assert D.length_from_data([], cap=512) == 512
    assert D.length_from_data(lengths, cap=512, quantile=1.0) == 100


def test_encode_records_full_lengths_and_cuts_only_the_long_ones():
    tok = load_tokenizer("tiny-bert")
    exs = [Example(("good",), 1), Example((" ".join(["word"] * 50),), 0), Example(("a b", "c d e"), 1)]
    full = D.token_lengths(exs, tok)
    assert full[0] == 3 and full[1] == 52 and full[2] == 2 + 2 + 3 + 1  # [CLS] .. [SEP] .. [SEP]
    split = D.encode(exs, tok, 16, regression=False)
    assert split.lengths == full and split.max_length == 16
    assert [len(r[0]["input_ids"]) for r in split.features] == [3, 16, 8]
    assert split.features[1][0]["input_ids"][-1] == tok.sep_token_id  # cut by the tokenizer, [SEP] kept
    assert split.truncated == pytest.approx(1 / 3)
    mc = D.encode([Example(("ctx",), 0, choices=("x", "y " * 30))], tok, 12, regression=False)
    assert mc.lengths == [max(D.token_lengths([Example(("ctx", "y " * 30), 0)], tok))] and mc.truncated == 1.0


def _long_task(folder, n=40):
    """A task whose i-th training text has i + 1 words: lengths 3 .. n + 2 tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, m in (("train", n), ("validation", 10), ("test", 10)):
        rows = ["text,label"] + [f"{' '.join(['good'] * (i + 1))},{i % 2}" for i in range(m)]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n")
    card = {"name": "long-docs", "benchmark": "custom", "type": "classification", "text_fields": ["text"],
            "labels": ["a", "b"], "metrics": ["accuracy"], "main_metric": "accuracy",
            "source": {"files": {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"},
                       "columns": {"text": "text", "label": "label"}}}
    (folder / "card.json").write_text(json.dumps(card))
    return load_task(str(folder / "card.json"))


def test_encode_task_warns_with_the_share_cut(tmp_path, caplog):
    td = _long_task(tmp_path / "t")
    caplog.set_level(logging.INFO, logger="s3pet.train")
    enc = T.encode_task(td, load_tokenizer("tiny-bert"), 12)
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # lengths 3..42: 30 of 40 training texts exceed 12 tokens; validation/test lengths 3..12: none
    assert len(warn) == 1 and "max length 12 cuts 75.0% of the training examples of long-docs" in warn[0]
    assert "validation 0.0%, test 0.0%" in warn[0] and "--max-length 0" in warn[0]
    assert enc.truncation() == {"max_length": 12, "truncated": {"train": 0.75, "validation": 0.0, "test": 0.0}}
    caplog.clear()
    T.encode_task(td, load_tokenizer("tiny-bert"), 64)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # nothing cut: nothing to say


def test_max_length_zero_takes_it_from_the_data(tmp_path, caplog):
    td = _long_task(tmp_path / "t")
    caplog.set_level(logging.INFO, logger="s3pet.train")
    enc = T.encode_task(td, load_tokenizer("tiny-bert"), 0)
    assert enc.max_length == 40  # the 95th percentile of 3..42 tokens (40), a multiple of 8
    assert enc.train.truncated == pytest.approx(2 / 40)
    assert any("max length from the data: 40 tokens" in r.getMessage() for r in caplog.records)
    assert T.encode_task(td, load_tokenizer("tiny-bert"), 0, positions=16).max_length == 16  # the model's limit


def test_max_length_settings():
    assert T.TrainConfig(max_length=0).max_length == 0 and SearchConfig(max_length=0).max_length == 0
    for make in (T.TrainConfig, SearchConfig):
        with pytest.raises(ConfigError, match="max_length"):
            make(max_length=-1)
