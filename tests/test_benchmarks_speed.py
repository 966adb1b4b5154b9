"""Smoke test of the speed benchmark's code path on tiny models (CPU): every method of every
model runs a couple of steps and lands in the JSON and the markdown table. Not a timing test."""

from __future__ import annotations

import json

import peft  # noqa: F401  (installed with the test extras; export needs it)
import pytest

from scripts import load_benchmark


def _load():
    return load_benchmark("speed")


def test_tiny_run_has_every_row(tmp_path, capsys):
    speed = _load()
    out, md = tmp_path / "speed.json", tmp_path / "speed.md"
    code = speed.main(["--tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
                       "--out", str(out), "--md", str(md)])
    res = json.loads(out.read_text())
    rows = {(r["model"], r["method"]): r for r in res["rows"]}
    assert set(rows) == {(m, k) for m in speed.MODELS for k in speed.METHODS}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"))
        assert r["ms_step"] > 0 and r["ms_step_mean"] > 0 and r["tokens_per_s"] > 0, key
        assert r["ms_pass"] * r["passes"] == pytest.approx(r["ms_step"])
        assert r["pet"] > 0 and r["head"] > 0, key
    assert code == 0
    # The floor and peft-lora are their own reference; search methods report both phases.
    for m in speed.MODELS:
        assert rows[(m, "bias-only")]["x_floor"] == pytest.approx(1.0)
        assert rows[(m, "peft-lora")]["x_peft_lora"] == pytest.approx(1.0)
        first = rows[(m, "s3pet-search-first:s3pet-m")]
        assert first["passes"] == 2 and set(first["ms_phase"]) == {"alpha", "w"}
        assert rows[(m, "s3pet-search-second:unified")]["passes"] == 5
        # Retraining and search stay inside the 0.1% budget (the head is never counted).
        assert rows[(m, "s3pet-retrain")]["pet"] <= rows[(m, "s3pet-retrain")]["budget_params"]
        assert rows[(m, "peft-lora")]["pet"] == rows[(m, "s3pet-lora")]["pet"]  # same LoRA, two implementations
    assert len(res["order_ratios"]) == len(speed.MODELS) * len(speed.SPACES)
    assert res["machine"]["batch"] == 4 and res["machine"]["tiny"] is True
    text = md.read_text()
    assert "| model | method | ms/step | tokens/s | peak MiB | x floor | x peft-lora | warm-up s |" in text
    assert text.count("\n| ") >= 2 + len(rows)
    assert text.strip() in capsys.readouterr().out  # the table is printed last


def test_method_names_expand_and_reject():
    speed = _load()
    assert speed.parse_methods("s3pet-search-first") == ["s3pet-search-first:s3pet-m", "s3pet-search-first:unified"]
    assert speed.parse_methods("full,full,bias-only") == ["full", "bias-only"]
    assert len(speed.parse_methods("s3pet-search")) == 4
    with pytest.raises(ValueError, match="unknown method"):
        speed.parse_methods("lora")
    with pytest.raises(SystemExit):
        speed.parse_args(["--models", "gpt-5"])


def test_failure_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    speed = _load()

    def boom(ctx):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(speed, "build_full", boom)
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    common = ["--tiny", "--steps", "1", "--warmup", "0", "--device", "cpu", "--threads", "1", "--models", "bert-base"]
    code = speed.main(common + ["--methods", "full,bias-only", "--out", str(out), "--md", str(md)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 1
    assert rows["full"]["status"] == "error" and "out of memory" in rows["full"]["error"]
    assert rows["bias-only"]["status"] == "ok" and rows["bias-only"]["x_peft_lora"] is None
    assert "failed: RuntimeError" in md.read_text()
    # A model that cannot be set up (sequence longer than its positions) fails its rows only.
    code = speed.main(common + ["--methods", "bias-only", "--seq", "600", "--out", str(out), "--md", str(md)])
    assert code == 1 and json.loads(out.read_text())["rows"][0]["status"] == "error"


def test_profile_writes_the_ops_table(tmp_path):
    speed = _load()
    target = tmp_path / "prof-{model}-{method}.txt"
    code = speed.main(["--tiny", "--models", "bert-base", "--device", "cpu", "--threads", "1", "--warmup", "1",
                       "--profile", "s3pet-search-first:s3pet-m", "--profile-out", str(target)])
    text = (tmp_path / "prof-bert-base-s3pet-search-first_s3pet-m.txt").read_text()
    assert code == 0 and "top 20 ops by self CPU time" in text and "aten::" in text


def test_compiled_rows(tmp_path):
    """``+compile`` rows run through s3pet's compile path (traced with aot_eager here) and say so."""
    speed = _load()
    assert speed.parse_methods("s3pet-search-first+compile") == ["s3pet-search-first:s3pet-m+compile",
                                                                  "s3pet-search-first:unified+compile"]
    out, md = tmp_path / "c.json", tmp_path / "c.md"
    methods = "bias-only,bias-only+compile,s3pet-search-first:s3pet-m+compile,s3pet-search-second:s3pet-m+compile"
    code = speed.main(["--tiny", "--steps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
                       "--models", "bert-base", "--methods", methods, "--compile-backend", "aot_eager",
                       "--out", str(out), "--md", str(md)])
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert code == 0
    assert "compiled" not in rows["bias-only"]
    for m in methods.split(",")[1:]:
        assert rows[m]["status"] == "ok" and rows[m]["compiled"] is True and rows[m]["compile_error"] is None, m
        assert rows[m]["warmup_s"] > 0
    ratios = json.loads(out.read_text())["order_ratios"]
    assert [r["space"] for r in ratios] == ["s3pet-m+compile"]  # compiled second vs compiled first
