"""The quality grid's protocol: lr sweep then seeds, resuming, merging calls, the report."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from scripts import load_benchmark

Q = load_benchmark("quality")


def _args(tmp_path, *extra):
    return Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "q"), "--tasks", "rte,mrpc",
                    "--budgets", "0.1%", "--methods", "lora,full", "--seeds", "0,1", "--small-seeds", "0,1,2",
                    "--lr-grid", "0.5,1,2", *extra])


def _done(out: Path, task, method, budget, seed, scale, val, test=0.5, status="ok"):
    d = Q.run_dir(out, task, method, budget, seed, scale)
    d.mkdir(parents=True, exist_ok=True)
    rec = {"task": task, "method": method, "budget": budget, "seed": seed, "lr_scale": scale, "status": status,
           "validation": val, "test": test, "params": {"pet": 10}, "retrain_cost": {"seconds": 1, "machine": "x"},
           "learning_rates": {"kind:lora": 5e-4 * scale, "head": 5e-4 * scale}, "lr": 5e-4 * scale}
    (d / "result.json").write_text(json.dumps(rec))


def test_sweep_first_then_the_other_seeds_at_the_chosen_rate(tmp_path):
    a = _args(tmp_path)
    out = Path(a.out)
    jobs = Q.pending_jobs(out, a)
    # only seed 0, one job per lr multiplier; full is budget-independent
    assert {(j["task"], j["method"], j["budget"], j["seed"], tuple(j["scales"])) for j in jobs} == {
        (t, m, b, 0, (s,)) for t in ("rte", "mrpc") for m, b in (("lora", "0.1%"), ("full", "-"))
        for s in (0.5, 1.0, 2.0)}
    for s, v in ((0.5, 0.6), (1.0, 0.7), (2.0, 0.65)):
        _done(out, "rte", "lora", "0.1%", 0, s, v)
    assert Q.chosen_scale(out, a, "rte", "lora", "0.1%") == 1.0
    later = [j for j in Q.pending_jobs(out, a) if (j["task"], j["method"]) == ("rte", "lora")]
    assert sorted((j["seed"], j["scales"][0]) for j in later) == [(1, 1.0), (2, 1.0)]  # rte: 3 seeds here


def test_ties_prefer_the_known_good_rate_and_failures_never_win(tmp_path):
    a = _args(tmp_path)
    out = Path(a.out)
    for s, v in ((0.5, 0.7), (1.0, 0.7), (2.0, 0.7)):
        _done(out, "mrpc", "full", "-", 0, s, v)
    assert Q.chosen_scale(out, a, "mrpc", "full", "-") == 1.0
    _done(out, "rte", "full", "-", 0, 0.5, 0.9, status="failed")
    _done(out, "rte", "full", "-", 0, 1.0, 0.1)
    assert Q.chosen_scale(out, a, "rte", "full", "-") is None  # lr 2 not run yet
    _done(out, "rte", "full", "-", 0, 2.0, 0.2)
    assert Q.chosen_scale(out, a, "rte", "full", "-") == 2.0


def test_search_methods_search_every_seed_first_then_retrain_each_rate_apart(tmp_path):
    a = Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "q"), "--tasks", "cb",
                 "--budgets", "0.01%", "--methods", "s3pet", "--small-seeds", "0,1"])
    out = Path(a.out)
    jobs = Q.pending_jobs(out, a)
    # one search job per seed, seed 1's too: a search does not wait for the learning rate
    assert [(j["seed"], j["scales"], j.get("search")) for j in jobs] == [(0, [], True), (1, [], True)]
    # cb: a training is 20 epochs of 250 examples at batch 32 = 160 steps; a search 20 epochs over
    # D_w, half of them: 80 steps
    assert Q.job_steps(a, jobs[0]) == 80
    job = jobs[0]
    assert Q.job_steps(a, {**job, "method": "s3pet-restarts3"}) == 3 * 80  # three searches
    assert Q.job_steps(a, {**job, "method": "s3pet-long3"}) == 3 * 80  # one of 3x the length
    assert Q.job_steps(a, {**job, "method": "s3pet-sens-select"}) == 80 // 20  # a 1-epoch warm-up only
    for seed in (0, 1):  # both searches done: seed 0's three rates are three jobs; seed 1 waits for the rate
        s = Q.run_dir(out, "cb", "s3pet", "0.01%", seed, 1.0).parent / "search"
        s.mkdir(parents=True)
        (s / "structure.json").write_text("{}")
    jobs = Q.pending_jobs(out, a)
    assert sorted((j["seed"], j["scales"][0]) for j in jobs) == [(0, 0.5), (0, 1.0), (0, 2.0)]
    assert not any(j.get("search") for j in jobs) and Q.job_steps(a, jobs[0]) == 160
    for sc, v in ((0.5, 0.1), (1.0, 0.3), (2.0, 0.2)):
        _done(out, "cb", "s3pet", "0.01%", 0, sc, v)
    assert [(j["seed"], j["scales"]) for j in Q.pending_jobs(out, a)] == [(1, [1.0])]


def test_a_failed_search_fails_its_retrains_once_instead_of_being_retried(tmp_path):
    a = Q.parse(["--model", str(tmp_path / "no-such-model"), "--data-dir", "d", "--out", str(tmp_path / "q"),
                 "--tasks", "cb", "--budgets", "0.1%", "--methods", "s3pet", "--small-seeds", "0",
                 "--lr-grid", "1"])
    out = Path(a.out)
    ad = {k: v for k, v in vars(a).items() if k != "budgets_order"}
    (job,) = Q.pending_jobs(out, a)
    (rec,) = Q.run_job(job, ad)
    assert rec["search"] and rec["status"] == "failed" and "no-such-model" in rec["error"]
    (job,) = Q.pending_jobs(out, a)  # not searched again: the retrain runs and records the failure
    assert job["scales"] == [1.0] and not job.get("search")
    (rec,) = Q.run_job(job, ad)
    assert rec["status"] == "failed" and "no-such-model" in rec["error"]
    assert Q.pending_jobs(out, a) == []


def test_report_keeps_the_results_shape_and_pairs_methods(tmp_path):
    a = _args(tmp_path)
    out = Path(a.out)
    for task, seeds in (("rte", (0, 1, 2)), ("mrpc", (0, 1))):
        for m, b, base in (("lora", "0.1%", 0.6), ("full", "-", 0.7)):
            for s in (0.5, 1.0, 2.0):
                _done(out, task, m, b, 0, s, val=s / 10, test=base + s / 100)
            for seed in seeds[1:]:
                _done(out, task, m, b, seed, 2.0, val=0.2, test=base + seed / 100)
    md = Q.report(out, a)
    res = json.loads((out / "results.json").read_text())
    runs = res["runs"]
    assert len(runs) == 2 * (3 + 2)
    for r in runs:
        assert {"task", "method", "budget", "seed", "test", "lr"} <= set(r) and 0 <= r["test"] <= 1
        assert r["lr_scale"] == 2.0 and r["lr_grid"] == [0.5, 1.0, 2.0]
    assert len(res["lr_sweep"]) == 2 * 2 * 3
    assert "| lora | full | **-10.00** |" in md  # lora is 0.1 below full on every pair
    assert "0 / 5 / 0 | 5 (2) |" in md


def test_merge_brings_in_another_calls_runs_from_a_folder_or_a_tarball(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _done(a, "rte", "lora", "0.1%", 0, 1.0, 0.5)
    _done(b, "rte", "lora", "0.1%", 0, 1.0, 0.9)  # present in both: a keeps its own
    _done(b, "rte", "lora", "0.1%", 1, 1.0, 0.8)
    s = Q.run_dir(b, "rte", "s3pet", "0.1%", 0, 1.0).parent / "search"
    s.mkdir(parents=True)
    (s / "structure.json").write_text("{}")
    with tarfile.open(tmp_path / "b.tgz", "w:gz") as tf:
        tf.add(b, arcname="q")
    assert Q.merge(a, tmp_path / "b.tgz") == 1
    assert json.loads((Q.run_dir(a, "rte", "lora", "0.1%", 0, 1.0) / "result.json").read_text())["validation"] == 0.5
    assert (Q.run_dir(a, "rte", "lora", "0.1%", 1, 1.0) / "result.json").is_file()
    assert (Q.run_dir(a, "rte", "s3pet", "0.1%", 0, 1.0).parent / "search" / "structure.json").is_file()
    assert not (a / ".merge-tmp").exists()
    assert Q.merge(a, b) == 0  # from a folder: nothing new any more


def test_merge_renames_the_runs_of_an_older_method_name(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    d = Q.run_dir(b, "cb", "s3pet-m", "0.1%", 0, 1.0)
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps({"task": "cb", "method": "s3pet-m", "budget": "0.1%", "seed": 0}))
    (d.parent / "search").mkdir()
    (d.parent / "search" / "structure.json").write_text("{}")
    assert Q.merge(a, b) == 1
    new = Q.run_dir(a, "cb", "s3pet", "0.1%", 0, 1.0)
    assert json.loads((new / "result.json").read_text())["method"] == "s3pet"
    assert (new.parent / "search" / "structure.json").is_file()
    assert not (a / "runs" / "cb" / "s3pet-m").exists()


def test_unknown_method_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path), "--methods", "lora,nope"])


def test_every_ablation_is_a_method_with_a_valid_search_config(tmp_path):
    from s3pet.search import SearchConfig

    names = ",".join(Q.ABLATIONS)
    a = Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path), "--tasks", "rte", "--methods",
                 f"s3pet,{names},random"])
    base = Q.search_config(a, "s3pet", "rte", 0)
    assert base.epochs == 10.0  # as many search epochs as the retrain (over D_w), best-validation logits
    assert base.select == "best"
    # `s3pet` is the library's default recipe: only the per-task length and the grid's plumbing differ
    lib = SearchConfig()
    assert {k for k in vars(lib) if getattr(base, k) != getattr(lib, k)} <= {"epochs", "max_length", "compile",
                                                                            "progress", "seed"}
    for name, over in Q.ABLATIONS.items():
        assert name in Q.METHODS and name in Q.SEARCH_METHODS and name not in Q.DEFAULT_METHODS
        cfg = Q.search_config(a, name, "rte", 3)
        assert isinstance(cfg, SearchConfig) and cfg.seed == 3
        for k, v in over.items():
            if k == "epochs_factor":
                assert cfg.epochs == base.epochs * v
            else:
                assert getattr(cfg, k) == v, (name, k)
        changed = {k for k in vars(cfg) if getattr(cfg, k) != getattr(base, k)} - {"seed"}
        assert changed and changed <= set(over) | {"epochs"}, name
    # ablations are searches like s3pet's: a search job before the retrains
    jobs = Q.pending_jobs(Path(a.out), a)
    assert {j["method"] for j in jobs if j.get("search")} == {"s3pet", *Q.ABLATIONS}
    # the default grid is unchanged: ablations run only when named
    assert Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path)]).methods == list(Q.DEFAULT_METHODS)


def test_a_search_longer_than_a_call_starts_anyway_and_runs_to_the_limit(tmp_path):
    a = Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "q"), "--tasks", "sst2,cb",
                 "--budgets", "0.1%", "--methods", "s3pet,lora", "--seeds", "0", "--small-seeds", "0",
                 "--time-limit", "500"])
    jobs = {(j["task"], j["method"], bool(j.get("search"))): j for j in Q.pending_jobs(Path(a.out), a)}
    long_search, short_search = jobs["sst2", "s3pet", True], jobs["cb", "s3pet", True]
    train = jobs["sst2", "lora", False]
    assert 1.3 * Q.job_steps(a, long_search) * 0.3 > 500  # 2,044 search steps: no call holds them
    assert Q.fits(a, long_search, 0.3, 500) and Q.fits(a, long_search, 0.3, 300)
    assert not Q.fits(a, long_search, 0.3, 200)  # too late in the call to reach a checkpoint
    assert Q.fits(a, short_search, 0.3, 100) and not Q.fits(a, short_search, 0.3, 10)
    assert Q.fits(a, train, 0.045, 500) and not Q.fits(a, train, 0.2, 500)  # a training never runs over


def test_merge_brings_the_furthest_checkpoint_of_a_cut_off_search(tmp_path):
    def cut(root, step):
        d = Q.run_dir(root, "sst2", "s3pet", "0.1%", 0, 1.0).parent / "search"
        d.mkdir(parents=True, exist_ok=True)
        (d / "search.pt").write_bytes(b"x" * step)
        (d / "history.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(0, step + 1, 10)))
        return d

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    cut(a, 500)
    cut(b, 1000)
    cut(c, 200)
    Q.merge(a, b)
    d = Q.run_dir(a, "sst2", "s3pet", "0.1%", 0, 1.0).parent / "search"
    assert (d / "search.pt").stat().st_size == 1000  # further along: replaces
    Q.merge(a, c)
    assert (d / "search.pt").stat().st_size == 1000  # behind: ignored
    (d / "structure.json").write_text("{}")  # finished here: nothing replaces it
    Q.merge(a, b)
    assert (d / "structure.json").is_file()


def test_a_cut_off_search_resumes_and_a_stale_checkpoint_starts_afresh(tmp_path, monkeypatch):
    import s3pet.pipeline as P
    from s3pet.errors import ConfigError

    calls = []

    def fake(model, task, space, budget, out, cfg, data_dir=None, resume=False, overwrite=False):
        calls.append((resume, overwrite))
        if resume and (out / "stale").exists():
            raise ConfigError("--resume: another recipe")
        return {"cost": {"seconds": 1}, "steps": 1}

    monkeypatch.setattr(P, "search", fake)
    a = _args(tmp_path)
    out = tmp_path / "s"
    out.mkdir()
    Q._search(a, "cb", "s3pet-m", "0.1%", out, None)
    assert calls == [(False, True)]  # no checkpoint: a fresh search
    (out / "search.pt").write_bytes(b"x")
    Q._search(a, "cb", "s3pet-m", "0.1%", out, None)
    assert calls[-1] == (True, False)
    (out / "stale").write_text("")
    calls.clear()
    Q._search(a, "cb", "s3pet-m", "0.1%", out, None)
    assert calls == [(True, False), (False, True)]


def test_every_kind_baseline_is_a_grid_method():
    from s3pet.baselines import KIND_METHODS

    assert Q.KIND_BASELINES == KIND_METHODS and set(KIND_METHODS) <= set(Q.METHODS)
    assert not set(KIND_METHODS) & set(Q.DEFAULT_METHODS)  # run only when named


def test_compile_reaches_both_the_search_and_the_training(tmp_path):
    off = _args(tmp_path)
    assert Q.search_config(off, "s3pet", "rte", 0).compile == "off" == Q.train_config(off, "rte", 0, 1.0).compile
    on = _args(tmp_path, "--compile", "auto")
    assert Q.search_config(on, "s3pet", "rte", 0).compile == "auto" == Q.train_config(on, "rte", 0, 1.0).compile


def test_a_derived_rule_retrains_its_parents_search_and_never_searches(tmp_path, monkeypatch):
    a = Q.parse(["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "q"), "--tasks", "cb",
                 "--budgets", "0.1%", "--methods", "s3pet-last", "--small-seeds", "0,1,2", "--lr-seeds", "0",
                 "--lr-grid", "1"])
    assert a.methods == ["s3pet", "s3pet-last"]  # the parent comes along: its searches, its retrains
    out = Path(a.out)
    assert {(j["method"], j["seed"]) for j in Q.pending_jobs(out, a)} == {("s3pet", s) for s in (0, 1, 2)}
    for seed, files in ((0, ("structure.json", "structure-last.json")), (1, ("structure.json",))):
        s = Q.run_dir(out, "cb", "s3pet", "0.1%", seed, 1.0).parent / "search"
        s.mkdir(parents=True)
        for f in files:
            (s / f).write_text(json.dumps({"rule": f}))
        (s / "metrics.json").write_text(json.dumps({"cost": {"seconds": 7.0}, "steps": 80}))
    assert [Q.search_state(out, "cb", "s3pet-last", "0.1%", s) for s in (0, 1, 2)] == ["done", "stale", "wait"]
    jobs = [j for j in Q.pending_jobs(out, a) if j["method"] == "s3pet-last"]
    assert [(j["seed"], j["scales"], j.get("search")) for j in jobs] == [(0, [1.0], None)]
    import s3pet.pipeline as P

    seen = []

    def fake_retrain(structure, task, out, cfg, **kw):
        seen.append(json.loads(Path(structure).read_text()))
        return {"main_metric": "acc", "validation": {"main": 0.5}, "test": {"main": 0.4}, "params": {"pet": 1},
                "cost": {"seconds": 1}, "learning_rates": {}, "steps": 1}

    monkeypatch.setattr(P, "retrain", fake_retrain)
    ad = {k: v for k, v in vars(a).items() if k != "budgets_order"}
    (rec,) = Q.run_job(jobs[0], ad)
    assert rec["status"] == "ok" and seen == [{"rule": "structure-last.json"}]
    assert rec["search_cost"] == {"seconds": 7.0}  # the parent's search is what it cost
