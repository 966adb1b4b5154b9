"""Bad input through the command line: each case exits 2 with ONE line naming the problem, no
traceback, and leaves nothing in --out (a failed start creates nothing).

Cases run the CLI in-process on tiny models. Cheap cases (settings checked before any model
loads) come first; the files they read are written once per module.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil

import pytest

from s3pet.cli import main
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--no-progress", "--max-steps", "2", "--batch-size", "8", "--max-eval-samples", "8"]


def _write(path, data) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Every file a case reads, by name: a valid task, structure and space, and broken copies."""
    from s3pet.baselines import baseline_structure
    from s3pet.models import load_backbone, load_tokenizer

    root = tmp_path_factory.mktemp("bad")
    f: dict[str, str] = {"root": str(root)}
    task_dir = root / "task"
    f["task"] = str(write_sentiment_task(task_dir, n_train=48, n_eval=16))
    card = json.loads((task_dir / "card.json").read_text())

    def card_with(name, edit=None, files=None):
        d = root / name
        d.mkdir()
        for split in ("train", "validation", "test"):
            shutil.copy(task_dir / f"{split}.csv", d / f"{split}.csv")
        for fname, data in (files or {}).items():
            _write(d / fname, data)
        c = json.loads(json.dumps(card))
        if edit:
            edit(c)
        return _write(d / "card.json", c)

    f["card_empty_train"] = card_with("empty_train", files={"train.csv": b""})
    f["card_header_train"] = card_with("header_train", files={"train.csv": "text,label\n"})
    f["card_header_val"] = card_with("header_val", files={"validation.csv": "text,label\n"})
    f["card_no_column"] = card_with("no_column", files={"train.csv": "words,label\nnice,pos\n"})
    f["card_bad_labels"] = card_with("bad_labels", files={"train.csv": "text,label\n" + "a b,maybe\n" * 20})
    f["card_missing_file"] = card_with("missing_file", lambda c: c["source"]["files"].update(train="nope.csv"))
    f["card_no_type"] = card_with("no_type", lambda c: c.pop("type"))
    f["card_bad_metric"] = card_with("bad_metric", lambda c: c.update(main_metric="bleu-9"))
    f["card_not_json"] = _write(root / "cardjson" / "card.json", "{name: toy")
    f["card_bytes"] = _write(root / "cardbytes" / "card.json", b"\xff\xfe{\x00")

    bb = load_backbone("tiny-bert")
    st = baseline_structure("bitfit", bb, 500)
    f["struct"] = str(root / "s.json")
    st.save(f["struct"])
    good = st.to_dict()

    def struct(name, edit):
        d = json.loads(json.dumps(good))
        edit(d)
        return _write(root / "structs" / f"{name}.json", d)

    def mod(key, value):
        return lambda d: d["modules"][0].__setitem__(key, value)

    for name, edit in {
        "n_params_str": mod("n_params", "64"), "n_params_float": mod("n_params", 32.0),
        "layer_str": mod("layer", "1"), "layer_far": mod("layer", 99), "stack_int": mod("stack", 3),
        "score_str": mod("score", "high"), "params_list": mod("params", [1]), "rank_huge": mod("rank", 10**12),
        "kind_unknown": mod("kind", "dora"), "role_unknown": mod("role", "attn.z"), "site_empty": mod("site", ""),
        "site_absent": mod("site", "encoder.layer.0.attention.self.nothing"),
        "schema": lambda d: d.__setitem__("schema", "s3pet.structure/v9"),
        "total": lambda d: d.__setitem__("n_params", 1), "budget_str": lambda d: d["budget"].__setitem__("params", "9"),
        "no_modules": lambda d: d.pop("modules"), "base_list": lambda d: d.__setitem__("base_model", []),
        "extra_field": mod("colour", "red"),
    }.items():
        f[f"st_{name}"] = struct(name, edit)
    f["st_bytes"] = _write(root / "structs" / "bytes.json", b'{"schema": "\xff\xfe"}')
    f["st_empty"] = _write(root / "structs" / "empty.json", b"")
    f["st_array"] = _write(root / "structs" / "array.json", [1, 2])
    f["st_deep"] = _write(root / "structs" / "deep.json", "[" * 100_000 + "]" * 100_000)
    (root / "structs" / "folder").mkdir()
    f["st_folder"] = str(root / "structs" / "folder")

    def space(name, entries):
        return _write(root / "spaces" / f"{name}.json", {"name": name, "entries": entries})

    f["sp_typo"] = space("typo", [{"kind": "lora", "roles": ["attn.q"], "rank": 2},
                                  {"kind": "lora", "roles": ["atn.*"], "rank": 2}])
    f["sp_rank_huge"] = space("rank_huge", [{"kind": "lora", "roles": ["attn.q"], "rank": 10**12}])
    f["sp_rank_str"] = space("rank_str", [{"kind": "lora", "roles": ["attn.q"], "rank": "8"}])
    f["sp_rank_zero"] = space("rank_zero", [{"kind": "lora", "roles": ["attn.q"], "rank": 0}])
    f["sp_alpha_nan"] = _write(root / "spaces" / "alpha_nan.json",
                               '{"entries": [{"kind": "lora", "roles": ["attn.q"], "alpha": NaN}]}')
    f["sp_kind"] = space("kind", [{"kind": "dora", "roles": ["attn.q"]}])
    f["sp_empty"] = space("empty", [])
    f["sp_layers"] = space("layers", [{"kind": "lora", "roles": ["attn.q"], "layers": ["0-99999999999"]}])
    f["sp_stacks"] = space("stacks", [{"kind": "lora", "roles": ["attn.q"], "stacks": ["middle"]}])
    f["sp_roles_str_list"] = space("roles", [{"kind": "lora", "roles": [1, 2]}])
    f["sp_nothing"] = space("nothing", [{"kind": "lora", "roles": ["xattn.q"]}])
    f["sp_unknown_field"] = space("field", [{"kind": "lora", "roles": ["attn.q"], "dropout": 0.1}])
    f["sp_bytes"] = _write(root / "spaces" / "bytes.json", b"\xff\xfe\x00")
    f["sp_not_json"] = _write(root / "spaces" / "notjson.json", "entries: []")

    model_dir = root / "model"
    bb.save_pretrained(model_dir)
    load_tokenizer("tiny-bert").save_pretrained(model_dir)
    f["model_no_tok"] = str(root / "model_no_tok")
    os.makedirs(f["model_no_tok"])
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, f["model_no_tok"])
    f["model_torn"] = str(root / "model_torn")
    shutil.copytree(model_dir, f["model_torn"])
    w = model_dir / "model.safetensors"
    (root / "model_torn" / "model.safetensors").write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    f["model_bad_config"] = str(root / "model_bad_config")
    shutil.copytree(model_dir, f["model_bad_config"])
    _write(root / "model_bad_config" / "config.json", "{not json")
    f["a_file"] = _write(root / "plain.txt", "x")
    f["run"] = str(root / "run")  # a finished baseline run, and broken copies
    assert main(["baseline", "--method", "lora", "--budget", "600", "--model", "tiny-bert", "--task", f["task"],
                 "--out", f["run"], *QUICK]) == 0
    for name, fname, data in (("run_torn_delta", "delta.safetensors", b"xx"),
                              ("run_bad_config", "config.json", "{oops"),
                              ("run_foreign_delta", "delta.safetensors", None)):
        shutil.copytree(f["run"], root / name)
        f[name] = str(root / name)
        if data is not None:
            _write(root / name / fname, data)
    from safetensors.torch import save_file
    import torch

    save_file({"deltas.x": torch.zeros(3)}, str(root / "run_foreign_delta" / "delta.safetensors"))
    f["finished"] = str(root / "finished")
    return f


def _argv(template: list[str], env: dict, out: str) -> list[str]:
    """The argv with ``{name}`` replaced by the file of that name (``{out}``: the case's --out)."""
    names = {**env, "out": out}
    return [re.sub(r"\{(\w+)\}", lambda m: names[m.group(1)], a) for a in template]


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, needle: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("s3pet: error: ") and "Traceback" not in err
    assert needle.lower() in lines[0].lower(), lines[0]


SEARCH = ["search", "--model", "tiny-bert", "--task", "{task}", "--budget", "800", "--out", "{out}", *QUICK]
RETRAIN = ["retrain", "--structure", "{struct}", "--task", "{task}", "--out", "{out}", *QUICK]
BASELINE = ["baseline", "--method", "bitfit", "--budget", "500", "--model", "tiny-bert", "--task", "{task}",
            "--out", "{out}", *QUICK]
RUN = ["run", "--model", "tiny-bert", "--task", "{task}", "--budget", "800", "--out", "{out}", *QUICK]


def _with(base: list[str], *extra: str) -> list[str]:
    return [*base, *extra]


def _replace(base: list[str], flag: str, value: str) -> list[str]:
    out = list(base)
    out[out.index(flag) + 1] = value
    return out


# (id, argv, what the one line must name). Settings first: they fail before any model loads.
SETTINGS = [
    *[(f"{cmd}-{flag}-{v}", _with(base, f"--{flag}", v), flag.replace("-", "_"))
      for cmd, base in (("search", SEARCH), ("retrain", RETRAIN), ("baseline", BASELINE))
      for flag, v in (("epochs", "nan"), ("epochs", "inf"), ("epochs", "0"), ("max-length", "-1"),
                      ("seed", "-1"), ("grad-clip", "nan"), ("head-lr", "-1"), ("eval-every", "-2"),
                      ("max-train-samples", "-1"), ("device", "foo"), ("device", "gpu"), ("device", "mps"))],
    *[(f"search-{flag}-{v}", _with(SEARCH, f"--{flag}", v), flag.replace("-", "_"))
      for flag, v in (("alpha-lr", "nan"), ("alpha-lr", "0"), ("w-lr", "inf"), ("w-lr", "-1"), ("beta", "0"),
                      ("temperature", "nan"), ("l0-weight", "-1"))],
    ("search-max-steps-negative", _replace(SEARCH, "--max-steps", "-3"), "max_steps"),
    ("search-batch-size-zero", _replace(SEARCH, "--batch-size", "0"), "batch_size"),
    ("search-xi-negative", _with(SEARCH, "--order", "second", "--xi", "-1"), "xi"),
    *[(f"{cmd}-{flag}-{v}", _with(base, f"--{flag}", v), flag.replace("-", "_"))
      for cmd, base in (("retrain", RETRAIN), ("baseline", BASELINE))
      for flag, v in (("lr", "nan"), ("lr", "inf"), ("lr", "-1"), ("weight-decay", "nan"), ("grad-accum", "0"),
                      ("full-lr", "nan"), ("patience", "-1"))],
    ("retrain-max-steps-negative", _replace(RETRAIN, "--max-steps", "-3"), "max_steps"),
    ("run-epochs-nan", _with(RUN, "--epochs", "nan"), "epochs"),
    ("run-alpha-lr-inf", _with(RUN, "--alpha-lr", "inf"), "alpha_lr"),
    ("baseline-full-with-budget", _replace(_replace(BASELINE, "--method", "full"), "--budget", "1000"), "--budget"),
    ("baseline-lora-without-budget", [a for a in BASELINE if a not in ("--budget", "500")], "--budget"),
    ("optuna-trials-zero", ["optuna", "--model", "tiny-bert", "--task", "{task}", "--budget", "500", "--trials",
                            "0", "--out", "{out}"], "trials"),
    ("optuna-sqlite-missing-folder", ["optuna", "--model", "tiny-bert", "--task", "{task}", "--budget", "500",
                                      "--trials", "1", "--storage", "sqlite:////nonexistent/dir/x.db",
                                      "--out", "{out}"], "storage"),
]

BUDGETS = [(f"search-budget-{b}", _replace(SEARCH, "--budget", b), why)
           for b, why in (("lots", "lots"), ("0", "at least 1"), ("-5", "malformed"), ("0.01", "percent"),
                          ("nan", "malformed"), ("inf", "malformed"), ("3", "raise the budget"))] + [
    ("baseline-budget-lots", _replace(BASELINE, "--budget", "lots"), "lots"),
]

MODELS = [
    ("search-model-missing", _replace(SEARCH, "--model", "/nonexistent/model"), "/nonexistent/model"),
    ("search-model-is-file", _replace(SEARCH, "--model", "{a_file}"), "cannot load model"),
    ("search-model-no-tokenizer", _replace(SEARCH, "--model", "{model_no_tok}"), "tokenizer"),
    ("search-model-torn-weights", _replace(SEARCH, "--model", "{model_torn}"), "cannot load model"),
    ("search-model-bad-config", _replace(SEARCH, "--model", "{model_bad_config}"), "cannot load model"),
    ("retrain-model-torn-weights", _with(RETRAIN, "--model", "{model_torn}"), "cannot load model"),
    ("search-max-length-beyond-positions", _with(SEARCH, "--max-length", "100000"), "--max-length"),
    ("retrain-max-length-beyond-positions", _with(RETRAIN, "--max-length", "100000"), "positions"),
]

SPACES = [(f"search-space-{name}", _with(SEARCH, "--space", "{sp_" + name + "}"), why) for name, why in (
    ("typo", "'atn.*' matches no role"), ("rank_huge", "rank"), ("rank_str", "rank"), ("rank_zero", "rank"),
    ("alpha_nan", "alpha"), ("kind", "dora"), ("empty", "entries"), ("layers", "layers"), ("stacks", "stacks"),
    ("roles_str_list", "roles"), ("nothing", "matches no site"), ("unknown_field", "dropout"),
    ("bytes", "UTF-8"), ("not_json", "not valid JSON"))] + [
    ("search-space-unknown-name", _with(SEARCH, "--space", "s3pet-xl"), "s3pet-xl"),
    ("space-command-typo", ["space", "tiny-bert", "--space", "{sp_typo}"], "atn.*"),
]

STRUCTURES = [(f"retrain-structure-{name}", _replace(RETRAIN, "--structure", "{st_" + name + "}"), why)
              for name, why in (
    ("n_params_str", "n_params"), ("n_params_float", "n_params"), ("layer_str", "layer"), ("layer_far", "layer"),
    ("stack_int", "stack"), ("score_str", "score"), ("params_list", "params"), ("rank_huge", "rank"),
    ("kind_unknown", "dora"), ("role_unknown", "role"), ("site_empty", "site"), ("site_absent", "no such site"),
    ("schema", "schema"), ("total", "n_params"), ("budget_str", "budget.params"), ("no_modules", "modules"),
    ("base_list", "base_model"), ("extra_field", "colour"), ("bytes", "UTF-8"), ("empty", "not valid JSON"),
    ("array", "JSON object"), ("deep", "structure"), ("folder", "not found"))] + [
    ("retrain-structure-missing", _replace(RETRAIN, "--structure", "/nonexistent/s.json"), "not found"),
    ("plot-structure-bytes", ["plot", "{st_bytes}", "--out", "{out}"], "UTF-8"),
    ("plot-structure-n_params_str", ["plot", "{st_n_params_str}", "--out", "{out}"], "n_params"),
    ("plot-structure-layer_far", ["plot", "{st_layer_far}", "--out", "{out}"], "layer"),
    ("transfer-structure-layer_str", ["transfer", "--structure", "{st_layer_str}", "--task", "{task}", "--out",
                                      "{out}", "--model", "tiny-bert", *QUICK], "layer"),
    ("export-structure-score_str", ["export", "--structure", "{st_score_str}", "--out", "{out}"], "score"),
]

TASKS = [(f"retrain-task-{name}", _replace(RETRAIN, "--task", "{card_" + name + "}"), why) for name, why in (
    ("empty_train", "train.csv"), ("header_train", "header only"), ("header_val", "validation.csv"),
    ("no_column", "column"), ("bad_labels", "cannot be read"), ("missing_file", "nope.csv"), ("no_type", "type"),
    ("bad_metric", "bleu-9"), ("not_json", "card"), ("bytes", "card"))] + [
    ("search-task-unknown", _replace(SEARCH, "--task", "no-such-task"), "no-such-task"),
    ("search-task-empty-train", _replace(SEARCH, "--task", "{card_empty_train}"), "no data rows"),
    ("baseline-task-header-train", _replace(BASELINE, "--task", "{card_header_train}"), "no data rows"),
]

OUTS = [
    ("search-out-is-file", _replace(SEARCH, "--out", "{a_file}"), "not a directory"),
    ("search-out-below-file", _replace(SEARCH, "--out", "{a_file}/sub"), "is a file"),
    ("retrain-out-is-file", _replace(RETRAIN, "--out", "{a_file}"), "not a directory"),
    ("average-out-folder", ["average", "{finished}", "--budget", "500", "--out", "{root}"], "is a folder"),
    ("evaluate-unfinished", ["evaluate", "--run", "{root}"], "not a finished"),
]

RUNS = [
    ("evaluate-torn-delta", ["evaluate", "--run", "{run_torn_delta}"], "delta.safetensors"),
    ("evaluate-bad-config", ["evaluate", "--run", "{run_bad_config}"], "config.json"),
    ("evaluate-foreign-delta", ["evaluate", "--run", "{run_foreign_delta}"], "does not fit"),
    ("evaluate-unknown-task", ["evaluate", "--run", "{run}", "--task", "no-such"], "no-such"),
    ("export-torn-weights", ["export", "--structure", "{run}/structure.json", "--weights",
                             "{run_torn_delta}/delta.safetensors", "--out", "{out}"], "cannot read weights"),
    ("export-missing-weights", ["export", "--structure", "{run}/structure.json", "--weights", "/nonexistent.st",
                                "--out", "{out}"], "not found"),
    ("export-onto-a-run", ["export", "--structure", "{run}/structure.json", "--out", "{run_bad_config}"],
     "not an s3pet export"),
    ("transfer-unknown-task", ["transfer", "--structure", "{run}/structure.json", "--task", "nope", "--out", "{out}",
                               *QUICK], "nope"),
    ("transfer-other-family", ["transfer", "--structure", "{run}/structure.json", "--task", "{task}", "--model",
                               "tiny-gpt2", "--out", "{out}", *QUICK], "no encoder stack"),
    ("retrain-other-family", _with(RETRAIN, "--model", "tiny-gpt2"), "another model"),
    ("plot-missing-input", ["plot", "/nonexistent.json", "--out", "{out}"], "no such file"),
    ("plot-unknown-format", ["plot", "{run}", "--format", "gif", "--out", "{out}"], "gif"),
    ("average-not-a-search", ["average", "{run}", "--budget", "500", "--out", "{out}/s.json"], "alphas.csv"),
    ("space-command-missing-model", ["space", "/nonexistent/model"], "cannot load model"),
]

CASES = SETTINGS + BUDGETS + MODELS + SPACES + STRUCTURES + TASKS + OUTS + RUNS


@pytest.mark.parametrize("argv", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(env, tmp_path, capsys, argv):
    needle = next(c[2] for c in CASES if c[1] is argv)
    out = tmp_path / "out"
    before = sorted(os.listdir(env["root"]))
    rc, err = run_cli(_argv(argv, env, str(out)), capsys)
    assert_one_line_error(rc, err, needle)
    assert not out.exists(), f"a failed start left {sorted(p.name for p in out.iterdir())}"
    assert sorted(os.listdir(env["root"])) == before  # nothing written beside the inputs either


def test_the_table_is_large_enough():
    assert len(CASES) >= 100, len(CASES)
    assert len({c[0] for c in CASES}) == len(CASES)  # ids are unique


# --------------------------------------------------------------------------- folders that hold a run

def _snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_retrain(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("done") / "run"
    assert main(_argv(RETRAIN, env, str(out))) == 0
    return out


def test_a_finished_run_is_never_overwritten_without_the_flag(env, finished_retrain, capsys):
    before = _snapshot(finished_retrain)
    for argv in (RETRAIN, _with(RETRAIN, "--lr", "0.5")):
        rc, err = run_cli(_argv(argv, env, str(finished_retrain)), capsys)
        assert_one_line_error(rc, err, "--overwrite")
    assert _snapshot(finished_retrain) == before


def test_overwrite_replaces_a_finished_run(env, finished_retrain, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_retrain, out)
    (out / "search.pt").write_bytes(b"old")  # an older run's file of another stage
    assert main(_argv(_with(RETRAIN, "--overwrite", "--seed", "3"), env, str(out))) == 0
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 3
    assert not (out / "search.pt").exists() and (out / "metrics.json").is_file()


def test_a_failed_rerun_leaves_the_finished_run_alone(env, finished_retrain, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_retrain, out)
    before = _snapshot(out)
    rc, err = run_cli(_argv(_replace(_with(RETRAIN, "--overwrite"), "--task", "{card_empty_train}"), env, str(out)),
                      capsys)
    assert_one_line_error(rc, err, "no data rows")
    assert _snapshot(out) == before


def test_a_second_writer_is_refused_with_the_holders_pid(env, tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / ".s3pet.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file: conflicts even within this process
    try:
        rc, err = run_cli(_argv(RETRAIN, env, str(out)), capsys)
    finally:
        os.close(fd)
    assert_one_line_error(rc, err, "pid 4242")
    assert sorted(p.name for p in out.iterdir()) == [".s3pet.lock"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(env, tmp_path):
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".s3pet.lock").write_text("999999\n")  # no process holds it
    assert main(_argv(RETRAIN, env, str(out))) == 0
    assert (out / "metrics.json").is_file() and not (out / ".s3pet.lock").exists()


def test_diverged_runs_exit_2_and_leave_nothing(env, tmp_path, capsys):
    for i, argv in enumerate((_with(RETRAIN, "--lr", "1e30", "--grad-clip", "0"),
                              _with(SEARCH, "--alpha-lr", "1e30"))):
        out = tmp_path / f"d{i}"
        rc, err = run_cli(_argv(argv, env, str(out)), capsys)
        assert_one_line_error(rc, err, "diverged at step")
        assert "--lr" in err or "--alpha-lr" in err
        assert not out.exists()


# --------------------------------------------------------------------------- resume

@pytest.fixture(scope="module")
def killed_search(env, tmp_path_factory):
    """A search folder as a kill leaves it: config, checkpoint, history, no metrics.json."""
    out = tmp_path_factory.mktemp("search") / "run"
    assert main(_argv(_replace(SEARCH, "--max-steps", "4") + ["--eval-every", "2"], env, str(out))) == 0
    for name in ("metrics.json", "structure.json", "alphas.csv"):
        (out / name).unlink()
    return out


@pytest.mark.parametrize("change, needle", [
    (("--budget", "900"), "budget_arg"), (("--max-steps", "9"), "max_steps"), (("--task", "{card_header_val}"), "task"),
])
def test_resume_with_other_settings_is_refused(env, killed_search, tmp_path, capsys, change, needle):
    out = tmp_path / "run"
    shutil.copytree(killed_search, out)
    before = _snapshot(out)
    argv = _replace(_replace(SEARCH, "--max-steps", "4"), *change) + ["--eval-every", "2", "--resume"]
    rc, err = run_cli(_argv(argv, env, str(out)), capsys)
    assert_one_line_error(rc, err, needle)
    assert _snapshot(out) == before


def test_resume_from_a_corrupt_checkpoint_is_one_line(env, killed_search, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(killed_search, out)
    (out / "search.pt").write_bytes((out / "search.pt").read_bytes()[:100])
    before = _snapshot(out)
    argv = _replace(SEARCH, "--max-steps", "4") + ["--eval-every", "2", "--resume"]
    rc, err = run_cli(_argv(argv, env, str(out)), capsys)
    assert_one_line_error(rc, err, "search.pt")
    assert _snapshot(out) == before


def test_resume_drops_a_torn_last_history_line(env, killed_search, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_search, out)
    with open(out / "history.jsonl", "a") as f:
        f.write('{"step": 5, "loss_w": 0.')  # a kill in the middle of a write
    argv = _replace(SEARCH, "--max-steps", "4") + ["--eval-every", "2", "--resume"]
    assert main(_argv(argv, env, str(out))) == 0
    for line in (out / "history.jsonl").read_text().splitlines():
        json.loads(line)
    assert (out / "metrics.json").is_file()


def test_the_main_job_refuses_a_finished_run_and_overwrites_on_request(env, tmp_path, capsys):
    out = tmp_path / "job"
    argv = _argv(_with(RUN, "--max-train-samples", "0"), env, str(out))
    assert main(argv) == 0
    before = _snapshot(out)
    rc, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, "--overwrite")
    assert _snapshot(out) == before
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0  # passed on to search/ and retrain/
    assert json.loads((out / "retrain" / "config.json").read_text())["train"]["seed"] == 1
    assert (out / "summary.json").is_file() and not (out / ".s3pet.lock").exists()
