"""The main-job profiler's bookkeeping: nested stage timers on a fake clock, the stage tree and
activity tables, the grouping of cProfile rows, and the report. Not a timing test; the job
itself is not run here."""

from __future__ import annotations

import types

import pytest

from scripts import load_benchmark


def _load():
    return load_benchmark("profile_main")


pm = _load()


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_job(clock: FakeClock):
    """A module whose ``job`` calls ``load`` once and ``step`` twice; each call takes fake time."""
    mod = types.ModuleType("fake_job")

    def load():
        clock.now += 2.0

    def write():
        clock.now += 0.25

    def save():
        clock.now += 0.25
        mod.write()  # a writer calling a writer: charged once

    def step(k):
        clock.now += 1.5
        mod.save()
        return k * 10

    def job():
        clock.now += 0.5  # the job's own work
        mod.load()
        return [mod.step(1), mod.step(2)]

    mod.load, mod.write, mod.save, mod.step, mod.job = load, write, save, step, job
    return mod


def test_stage_timer_nests_merges_and_restores():
    clock = FakeClock()
    mod = _fake_job(clock)
    originals = {k: getattr(mod, k) for k in ("job", "load", "step", "save", "write")}
    seen = []
    timer = pm.StageTimer(clock)
    timer.wrap(mod, "job", "job", self_label="job glue")
    timer.wrap(mod, "load", "load")
    timer.wrap(mod, "step", lambda k: f"step {'odd' if k % 2 else 'even'}", on_result=seen.append)
    timer.wrap(mod, "save", "write outputs")
    timer.wrap(mod, "write", "write outputs")
    with timer.stage("top"):
        assert mod.job() == [10, 20]
    clock.now += 1.0  # outside every stage
    timer.restore()
    assert {k: getattr(mod, k) for k in originals} == originals
    assert seen == [10, 20]

    rows = pm.stage_rows(timer.records, total=clock.now)
    got = [(r["path"], r["seconds"], r["self_seconds"], r["calls"]) for r in rows]
    assert got == [
        ("top", 6.5, 0.0, 1),
        ("top / job", 6.5, 0.5, 1),
        ("top / job / load", 2.0, 2.0, 1),
        ("top / job / step odd", 2.0, 1.5, 1),
        ("top / job / step odd / write outputs", 0.5, 0.5, 1),
        ("top / job / step even", 2.0, 1.5, 1),
        ("top / job / step even / write outputs", 0.5, 0.5, 1),
        ("(outside the stages)", 1.0, 1.0, 1),
    ]
    assert sum(r["self_seconds"] for r in rows) == pytest.approx(clock.now)
    assert [r["depth"] for r in rows] == [0, 1, 2, 2, 3, 2, 3, 0]

    acts = {a["activity"]: a for a in pm.activity_rows(rows, timer.self_labels, clock.now)}
    assert acts["job glue"]["seconds"] == pytest.approx(0.5)
    assert acts["write outputs"]["seconds"] == pytest.approx(1.0) and acts["write outputs"]["calls"] == 2
    assert sum(a["seconds"] for a in acts.values()) == pytest.approx(clock.now)
    assert sum(a["share"] for a in acts.values()) == pytest.approx(1.0)


def test_a_stage_that_raises_is_still_charged():
    clock = FakeClock()
    timer = pm.StageTimer(clock)
    with pytest.raises(ValueError):
        with timer.stage("boom"):
            clock.now += 3.0
            raise ValueError("x")
    assert timer.records[("boom",)] == {"seconds": 3.0, "calls": 1} and timer.open == []


def test_wrapping_a_class_method_and_an_inherited_one():
    class Base:
        def inherited(self):
            return "base"

    class Child(Base):
        def own(self):
            return "own"

    timer = pm.StageTimer(FakeClock())
    timer.wrap(Child, "own", "own")
    timer.wrap(Child, "inherited", "inherited")
    c = Child()
    assert (c.own(), c.inherited()) == ("own", "base")
    assert set(timer.records) == {("own",), ("inherited",)}
    timer.restore()
    assert "inherited" not in vars(Child) and Child.own.__name__ == "own" and not hasattr(Child.own, "__wrapped__")


@pytest.mark.parametrize("file, func, group", [
    ("~", "<method 'run_backward' of 'torch._C._EngineBase' objects>", "autograd engine (backward, C++)"),
    ("~", "<built-in method torch._C._nn.linear>", "torch ops (C++ kernels)"),
    ("~", "<method 'encode_batch' of 'tokenizers.Tokenizer' objects>", "tokenizer (Rust)"),
    ("~", "<built-in method matplotlib.ft2font.set_text>", "plotting (matplotlib, PIL)"),
    ("~", "<built-in method marshal.loads>", "imports"),
    ("~", "<built-in method posix.stat>", "file I/O"),
    ("~", "<method 'startswith' of 'str' objects>", "other built-ins"),
    ("<frozen importlib._bootstrap>", "_find_and_load", "imports"),
    ("/v/lib/python3.11/site-packages/torch/optim/adam.py", "step", "optimizer (torch.optim Python)"),
    ("/v/lib/python3.11/site-packages/torch/nn/modules/module.py", "_call_impl",
     "torch Python (module calls, hooks, autograd glue)"),
    ("/v/lib/python3.11/site-packages/transformers/models/bert/modeling_bert.py", "forward",
     "transformers Python (+ its tensor operators)"),
    ("/v/lib/python3.11/site-packages/matplotlib/figure.py", "savefig", "plotting (matplotlib, PIL)"),
    ("/work/main/s3pet/inject.py", "hook", "s3pet Python (+ its tensor operators)"),
    ("/v/lib/python3.11/copy.py", "deepcopy", "other Python"),
])
def test_classify(file, func, group):
    assert pm.classify(file, func) == group


def _fake_stats() -> dict:
    site = "/v/lib/python3.11/site-packages/"
    # (file, line, func): (primitive calls, calls, self s, cumulative s, callers)
    return {
        ("/work/main/s3pet/heads.py", 72, "forward"): (10, 10, 0.5, 6.0, {}),
        ("~", 0, "<built-in method torch._C._nn.linear>"): (400, 400, 4.0, 4.0, {}),
        ("~", 0, "<method 'run_backward' of 'torch._C._EngineBase' objects>"): (8, 8, 7.0, 7.0, {}),
        (site + "torch/optim/adam.py", 215, "step"): (8, 8, 0.25, 1.0, {}),
        (site + "torch/nn/modules/module.py", 1770, "_call_impl"): (90, 500, 1.0, 6.0, {}),
        ("<frozen importlib._bootstrap>", 1165, "_find_and_load"): (30, 40, 0.25, 3.0, {}),
        ("~", 0, "<built-in method marshal.loads>"): (30, 30, 1.0, 1.0, {}),
    }


def test_profile_summary_groups_entry_points_and_tops():
    s = pm.profile_summary(_fake_stats(), top=3)
    assert s["profiled_seconds"] == pytest.approx(14.0)
    groups = {g["group"]: g["self_seconds"] for g in s["groups"]}
    assert groups == pytest.approx({"autograd engine (backward, C++)": 7.0, "torch ops (C++ kernels)": 4.0,
                                    "imports": 1.25, "torch Python (module calls, hooks, autograd glue)": 1.0,
                                    "s3pet Python (+ its tensor operators)": 0.5,
                                    "optimizer (torch.optim Python)": 0.25})
    assert [g["self_seconds"] for g in s["groups"]] == sorted(groups.values(), reverse=True)
    entries = {e["entry"]: e for e in s["entry_points"]}
    assert entries["forward (TaskModel.forward)"]["cumulative_seconds"] == 6.0
    assert entries["backward (autograd engine)"]["cumulative_seconds"] == 7.0
    assert entries["optimizer step (AdamW)"]["calls"] == 8
    assert entries["imports (import machinery)"]["cumulative_seconds"] == 3.0
    assert entries["matplotlib savefig"]["functions"] == 0
    assert [r["cumulative_seconds"] for r in s["top_cumulative"]] == [7.0, 6.0, 6.0]
    assert [r["self_seconds"] for r in s["top_self"]] == [7.0, 4.0, 1.0]
    assert s["top_cumulative"][1]["function"] == "s3pet/heads.py:72(forward)"
    assert s["top_self"][1]["function"] == "<built-in method torch._C._nn.linear>"


def test_markdown_report_lists_every_stage_and_group():
    clock = FakeClock()
    timer = pm.StageTimer(clock)
    with timer.stage("imports"):
        clock.now += 2.0
    with timer.stage("s3pet run"):
        with timer.stage("search"):
            clock.now += 5.0
    rows = pm.stage_rows(timer.records, 8.0)
    result = {"command": "s3pet run --out x", "cprofile": True, "total_seconds": 8.0,
              "machine": {"cpu": "Some CPU", "usable_cores": 2, "memory_mib": 1024, "torch": "2.x",
                          "torch_threads": 2, "transformers": "4.x", "python": "3.11",
                          "loadavg_before": [0.1, 0.2, 0.3], "loadavg_after": [1.0, 1.0, 1.0]},
              "process": {"cpu_user_s": 12.0, "cpu_sys_s": 1.0, "cpu_per_wall": 1.625, "peak_rss_mib": 900.0},
              "stages": rows, "activities": pm.activity_rows(rows, {}, 8.0),
              "profile": pm.profile_summary(_fake_stats(), top=2)}
    md = pm.markdown(result)
    assert "| · search | 5.0 | 5.0 | 1 | 62.5 |" in md
    assert "| (outside the stages) | 1.0 | 1.0 | 1 | 12.5 |" in md
    assert "| 1 more under 0.05 s each: s3pet run | 0.0 | 0.0 |" in md  # its self time is 0
    assert "Some CPU, 2 usable cores" in md and "1.62 cores busy" in md
    assert "| autograd engine (backward, C++) | 7.0 | 50.0 | 8 |" in md


def test_run_args_may_not_set_the_output_folder():
    with pytest.raises(SystemExit):
        pm.parse_args(["--run-args", "--out elsewhere"])
    assert pm.parse_args(["--run-args", "--max-steps 4 --no-progress"]).extra == ["--max-steps", "4", "--no-progress"]


def test_instrument_finds_every_function_it_times_and_restores_them():
    """A renamed pipeline function fails here rather than in a several-minute profile run."""
    from s3pet import pipeline, search

    before = (pipeline.search, pipeline.fit, search.BiLevel.alpha_step, search.evaluate)
    timer = pm.StageTimer()
    pm.instrument(timer, pipeline)
    try:
        assert pipeline.fit is not before[1] and pipeline.fit.__wrapped__ is before[1]
    finally:
        timer.restore()
    assert (pipeline.search, pipeline.fit, search.BiLevel.alpha_step, search.evaluate) == before
