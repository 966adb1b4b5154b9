"""Progress output: a bar on a terminal, a few readable log lines in a file or a pipe."""

from __future__ import annotations

import logging

import pytest

from s3pet import structure as S
from s3pet import train as T
from s3pet.baselines import baseline_structure
from s3pet.heads import TaskModel
from s3pet.models import load_backbone, load_tokenizer
from s3pet.progress import Progress, progress_line
from s3pet.tasks import load_task
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "s3pet.progress"]


def test_progress_line_names_stage_step_fields_and_time():
    line = progress_line("search", 32, 64, {"loss_w": "0.534"}, elapsed=61.0)
    assert line == "search: step 32/64 (50%) · loss_w 0.534 · 1m01s elapsed, ~1m01s left"
    assert progress_line("train", 10, 10, {}, elapsed=5.2).endswith("5s elapsed")  # done: nothing left
    # a resumed run: the rate comes from the steps done in this process only
    assert "~5s left" in progress_line("train", 90, 100, {}, elapsed=45.0, done_here=90)
    assert "~45s left" in progress_line("train", 90, 100, {}, elapsed=45.0, done_here=10)
    assert "1h02m elapsed" in progress_line("eval", 1, 2, {}, elapsed=3725.0, unit="batch")


def test_log_mode_writes_one_line_per_tenth(caplog):
    caplog.set_level(logging.INFO, logger="s3pet.progress")
    bar = Progress(1000, "train", bar=False, every_s=1e9)
    for i in range(1000):
        bar.set(loss=f"{1 / (i + 1):.4f}")
        bar.update(1)
    bar.close()
    lines = _lines(caplog)
    assert len(lines) == 10
    assert lines[0].startswith("train: step 100/1,000 (10%) · loss 0.0100 · ")
    assert lines[-1].startswith("train: step 1,000/1,000 (100%)")


def test_log_mode_every_seconds_delay_and_off(caplog):
    caplog.set_level(logging.INFO, logger="s3pet.progress")
    bar = Progress(1000, "search", bar=False, every_s=0.0)  # slow loops: a line at least every every_s
    for _ in range(5):
        bar.update(1)
    assert len(_lines(caplog)) == 5
    caplog.clear()
    timed = Progress(10, "eval", bar=False, tenths=False, every_s=1e9, unit="batch")  # time only: quick is silent
    for _ in range(10):
        timed.update(1)
    timed.close()
    short = Progress(10, "eval", bar=False, delay_s=60.0, unit="batch")  # ends before the delay
    for _ in range(10):
        short.update(1)
    short.close()
    off = Progress(10, "train", bar=False, enabled=False)
    for _ in range(10):
        off.update(1)
    off.close()
    assert _lines(caplog) == []


def test_an_early_stop_logs_where_the_loop_ended(caplog):
    caplog.set_level(logging.INFO, logger="s3pet.progress")
    bar = Progress(100, "train", bar=False, every_s=1e9)
    for _ in range(15):
        bar.update(1)
    bar.close()
    assert [m.split(" · ")[0] for m in _lines(caplog)] == ["train: step 10/100 (10%)", "train: step 15/100 (15%)"]


def test_fit_into_a_pipe_logs_lines_and_draws_no_bar(tmp_path, capsys, caplog):
    """Under pytest stderr is not a terminal: the bar becomes log lines, no carriage returns."""
    caplog.set_level(logging.INFO, logger="s3pet.progress")
    td = load_task(str(write_sentiment_task(tmp_path / "task", n_train=64, n_eval=16)))
    tok = load_tokenizer("tiny-bert")
    enc = T.encode_task(td, tok, 32)
    bb = load_backbone("tiny-bert")
    ds = S.apply(baseline_structure("bitfit", bb, 500), bb)
    tm = TaskModel(bb, td.card, tok)
    T.fit(tm, {"deltas": list(ds.parameters()), "head": tm.head_parameters()}, enc,
          T.TrainConfig(batch_size=8, epochs=2.5, log_every=4, device="cpu"))
    assert "\r" not in capsys.readouterr().err
    lines = _lines(caplog)
    assert 5 <= len(lines) <= 11 and lines[-1].startswith("train: step 20/20 (100%) · loss ")
