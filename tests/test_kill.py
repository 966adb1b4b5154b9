"""kill -9 at several points of a search, a retrain and an export: the folder holds old state or
new (every file whole; only the last line of history.jsonl may be torn), nothing looks
finished, and the next run (``--resume`` for a search) completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from s3pet.cli import main
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return str(write_sentiment_task(tmp_path_factory.mktemp("task"), n_train=96, n_eval=16))


def _start(argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "s3pet.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fails if it ends first."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point: {proc.stderr.read()[-1500:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("the kill point was never reached")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _history_lines(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_whole(folder) -> None:
    """Every file a run wrote parses; a kill may tear only the last line of history.jsonl."""
    for p in folder.iterdir():
        if p.name.endswith(".json"):
            json.loads(p.read_text())
        elif p.name == "history.jsonl":
            lines = p.read_text().splitlines()
            for line in lines[:-1]:
                json.loads(line)
        elif p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".pt":
            torch.load(p, weights_only=False)
        elif p.suffix == ".csv":
            assert p.read_text().startswith("index,")
    assert not (folder / "metrics.json").exists()  # a killed run never looks finished


SEARCH = ["search", "--model", "tiny-bert", "--budget", "800", "--max-steps", "40", "--batch-size", "8",
          "--eval-every", "4", "--max-eval-samples", "8", "--no-progress", "--device", "cpu"]


@pytest.mark.parametrize("point", ["first-checkpoint", "mid-run"])
def test_killed_search_resumes_to_the_uninterrupted_structure(task, tmp_path, point):
    out = tmp_path / "run"
    argv = [*SEARCH, "--task", task, "--out", str(out)]
    proc = _start(argv)
    if point == "first-checkpoint":
        _kill_when(proc, lambda: (out / "search.pt").exists())
    else:
        _kill_when(proc, lambda: _history_lines(out / "history.jsonl") >= 12)
    assert_whole(out)
    assert (out / ".s3pet.lock").exists()  # left by the killed holder; the kernel has dropped its lock
    assert main([*argv, "--resume"]) == 0
    ref = tmp_path / "ref"
    assert main([*SEARCH, "--task", task, "--out", str(ref)]) == 0
    assert (out / "structure.json").read_text() == (ref / "structure.json").read_text()
    assert not (out / ".s3pet.lock").exists()


def _retrain_argv(task, tmp_path, eval_every: str) -> tuple[list[str], object]:
    """A short search's structure, and the argv of a retrain of it into ``tmp_path/retrain``."""
    structure = tmp_path / "s"
    assert main([*SEARCH[:5], "--max-steps", "2", "--batch-size", "8", "--no-progress", "--task", task,
                 "--out", str(structure)]) == 0
    out = tmp_path / "retrain"
    return ["retrain", "--structure", str(structure / "structure.json"), "--task", task, "--out", str(out),
            "--batch-size", "8", "--eval-every", eval_every, "--no-progress", "--device", "cpu"], out


def test_killed_retrain_is_unfinished_and_reruns_without_overwrite(task, tmp_path):
    argv, out = _retrain_argv(task, tmp_path, "50")
    proc = _start([*argv, "--max-steps", "400"])
    _kill_when(proc, lambda: _history_lines(out / "history.jsonl") >= 3)
    assert_whole(out)
    assert not (out / "delta.safetensors").exists()
    assert main([*argv, "--max-steps", "4"]) == 0  # unfinished: no --overwrite needed
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    load_file(str(out / "delta.safetensors"))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_an_export_after_a_killed_one_cleans_its_staging(task, tmp_path):
    """A kill while staging leaves ``.NAME.PID.*.tmp``; a kill between the two renames leaves the
    previous export moved aside. The next export removes the first and puts back the second."""
    run = tmp_path / "r"
    assert main(["baseline", "--method", "lora", "--budget", "600", "--model", "tiny-bert", "--task", task,
                 "--out", str(run), "--max-steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    out = tmp_path / "export"
    assert main(["export", "--structure", str(run / "structure.json"), "--out", str(out)]) == 0
    pid = _dead_pid()
    staged = tmp_path / f".export.{pid}.abc123.tmp"
    staged.mkdir()
    (staged / "adapter_model.safetensors").write_bytes(b"half")
    os.replace(out, tmp_path / f".export.{pid}.def456.tmp.old")  # killed between the renames
    live = tmp_path / f".export.{os.getpid()}.ghi789.tmp"  # a running export's: left alone
    live.mkdir()
    assert main(["export", "--structure", str(run / "structure.json"), "--out", str(out)]) == 0
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export."))
    assert hidden == [live.name]
    assert (out / "s3pet_export.json").is_file()


def test_a_second_process_on_the_same_out_is_refused_with_the_holders_pid(task, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*SEARCH, "--task", task, "--out", str(out)]
    proc = _start([*argv[:argv.index("--max-steps") + 1], "4000", *argv[argv.index("--max-steps") + 2:]])
    try:
        t0 = time.monotonic()
        while not (out / "history.jsonl").exists():  # the lock is taken before the first line
            assert proc.poll() is None and time.monotonic() - t0 < 120
            time.sleep(0.01)
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"pid {proc.pid}" in err
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert (out / "history.jsonl").exists()  # the refused process touched nothing of the holder's


@pytest.mark.parametrize("stage", ["retrain", "baseline", "transfer"])
def test_killed_retrain_resumes_to_the_uninterrupted_result(task, tmp_path, caplog, stage):
    argv, out = _retrain_argv(task, tmp_path, "3")
    argv += ["--max-steps", "60", "--max-eval-samples", "8"]
    if stage == "baseline":  # the same training loop behind a hand-designed structure
        argv = ["baseline", "--method", "bitfit", "--budget", "800", "--model", "tiny-bert", *argv[3:]]
    elif stage == "transfer":  # ... and behind a structure carried to another task
        argv = ["transfer", *argv[1:]]
    proc = _start(argv)
    _kill_when(proc, lambda: (out / "train.pt").exists() and _history_lines(out / "history.jsonl") >= 12)
    assert_whole(out)
    at = torch.load(out / "train.pt", weights_only=False)["step"]
    assert at >= 3
    with caplog.at_level("INFO", logger="s3pet.train"):
        assert main([*argv, "--resume"]) == 0
    assert f"resuming training at step {at} of 60" in caplog.text  # continued, not started again
    assert not (out / "train.pt").exists()  # finished: nothing left to resume
    ref = tmp_path / "ref"
    assert main([str(ref) if a == str(out) else a for a in argv]) == 0
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert (got["steps"], got["best_step"], got["validation"], got["test"]) == (
        want["steps"], want["best_step"], want["validation"], want["test"])
    a, b = load_file(str(out / "delta.safetensors")), load_file(str(ref / "delta.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x).get("step") for x in (out / "history.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(x).get("step") for x in (ref / "history.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # the history is the uninterrupted run's, no line twice


def test_retrain_resume_must_repeat_the_settings(task, tmp_path, capsys):
    argv, out = _retrain_argv(task, tmp_path, "3")
    proc = _start([*argv, "--max-steps", "400"])
    _kill_when(proc, lambda: (out / "train.pt").exists())
    capsys.readouterr()
    assert main([*argv, "--max-steps", "300", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_steps" in err and "--resume" in err
    (out / "train.pt").write_bytes(b"not a checkpoint")
    assert main([*argv, "--max-steps", "400", "--resume"]) == 2
    assert "train.pt is not a readable training checkpoint" in capsys.readouterr().err
