"""Run files: readable by everyone (0644), a log.txt of the run's console lines, cleaned like the rest."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from s3pet import rundir
from s3pet.io import append_jsonl, atomic_write_text
from s3pet.pipeline import plot_list


@pytest.fixture
def private_umask():
    old = os.umask(0o077)  # a user whose files are private by default
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_run_files_are_0644_whatever_the_umask(tmp_path, private_umask):
    atomic_write_text(tmp_path / "config.json", "{}")
    append_jsonl(tmp_path / "history.jsonl", {"step": 1})
    append_jsonl(tmp_path / "history.jsonl", {"step": 2})
    with rundir.RunDir(tmp_path / "run"):
        pass
    for p in (tmp_path / "config.json", tmp_path / "history.jsonl"):
        assert _mode(p) == 0o644, p
    assert (tmp_path / "history.jsonl").read_text().count("\n") == 2


@pytest.fixture
def console_log():
    """An INFO console handler on the root logger, as the s3pet command sets up."""
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield
    root.removeHandler(handler)
    root.setLevel(old)


def test_log_txt_holds_the_console_lines_of_each_run(tmp_path, console_log, private_umask):
    log = logging.getLogger("s3pet.somewhere")
    log.info("before the run")
    with rundir.RunDir(tmp_path / "job"):
        log.info("job starts")
        with rundir.RunDir(tmp_path / "job" / "search"):
            log.warning("inside the stage")
            logging.getLogger(rundir.RUN_LOG).info("progress beside a bar")
        log.info("job ends")
    log.info("after the run")
    job = (tmp_path / "job" / rundir.LOG).read_text().splitlines()
    stage = (tmp_path / "job" / "search" / rundir.LOG).read_text().splitlines()
    assert job == ["INFO job starts", "WARNING inside the stage", "INFO progress beside a bar", "INFO job ends"]
    assert stage == ["WARNING inside the stage", "INFO progress beside a bar"]
    assert _mode(tmp_path / "job" / rundir.LOG) == 0o644
    ours = [h for name in (None, rundir.RUN_LOG) for h in logging.getLogger(name).handlers
            if str(getattr(h, "baseFilename", "")).startswith(str(tmp_path))]
    assert ours == []  # detached when the runs ended


def test_a_new_or_failed_run_removes_log_and_tensorboard(tmp_path, console_log):
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events.out.tfevents.1").write_bytes(b"old")
    (out / rundir.LOG).write_text("an older run\n")
    with rundir.RunDir(out):
        logging.getLogger("s3pet").info("new run")
        assert not (out / "tb").exists()
    assert (out / rundir.LOG).read_text() == "INFO new run\n"  # in the console format
    with pytest.raises(RuntimeError):
        with rundir.RunDir(out):
            (out / "tb").mkdir()
            raise RuntimeError("boom")
    assert not (out / rundir.LOG).exists() and not (out / "tb").exists()


def test_the_summary_names_plots_by_their_stage(tmp_path):
    plots = tmp_path / "plots"
    paths = [plots / "search" / "gates.png", plots / "search" / "trajectory.png", plots / "search" / "trajectory.svg",
             plots / "retrain" / "trajectory.png"]
    assert plot_list([str(p) for p in paths]) == (f"search/gates.png, search/trajectory.png, "
                                                  f"retrain/trajectory.png (in {plots}/)")
    assert plot_list([]) == "(none)"
