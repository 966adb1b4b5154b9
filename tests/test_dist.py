"""Data parallelism: two CPU processes (gloo) under torchrun run a search and a retrain."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from s3pet import structure as S
from synthetic import write_sentiment_task


def _free_port() -> int:
    """A port nothing listens on (the OS picks it for port 0), so parallel runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "-m", "s3pet.cli"] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_search_and_retrain(tmp_path):
    task = str(write_sentiment_task(tmp_path / "task", n_train=128, n_eval=32))
    out = tmp_path / "s"
    r = _torchrun(["search", "--model", "tiny-bert", "--task", task, "--budget", "800", "--out", str(out),
                   "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    st = S.load(out / "structure.json")
    assert 0 < st.n_params <= 800
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in hist if "loss_w" in h]
    # D_w has 64 examples = 8 batches, split over 2 ranks: 4 steps, each logged once (rank 0 only).
    assert max(steps) == 4 and len(steps) == len(set(steps))
    r = _torchrun(["retrain", "--structure", str(out / "structure.json"), "--task", task, "--out",
                   str(tmp_path / "r"), "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--no-progress"],
                  tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["steps"] == 8  # 16 batches of 8 over 2 ranks
