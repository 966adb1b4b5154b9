"""The command line generated from the stage configs: flags, defaults in --help, --config replays."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest

import s3pet.configs
from s3pet import cli, flags, pipeline
from s3pet.configs import Config, RunConfig, SearchConfig, TrainConfig, setting
from s3pet.errors import ConfigError
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Inner(Config):
    rate: float = setting(0.5, "a rate", check="> 0")
    mode: str = setting("a", "a mode", choices=("a", "b"))
    steps: int = setting(3, "steps")


@dataclass
class Outer(Config):
    name: str | None = setting(None, "a name")
    flag: bool = setting(False, "a switch")
    inner: Inner = setting(help="the inner stage", factory=lambda: Inner(steps=7), prefixed=("steps",))
    other: Inner = setting(help="another stage", factory=Inner)


def _parser(tree):
    import argparse

    p = argparse.ArgumentParser(prog="t")
    flags.add_config_flags(p, tree)
    return p


def test_a_field_of_a_config_becomes_a_flag_with_its_type_choices_and_default():
    p = _parser(Outer)
    text = " ".join(p.format_help().split())
    assert "--name NAME a name (default: none)" in text
    assert "--flag, --no-flag a switch (default: false)" in text
    assert "--mode {a,b} a mode; sets inner and other (default: a)" in text
    assert "--inner-steps INNER_STEPS steps (default: 7)" in text  # the nested config's own default
    assert "--steps STEPS steps (default: 3)" in text  # the other section, alone on the shared name
    cfg = flags.build(Outer, flags.given(p.parse_args(["--rate", "2", "--flag", "--inner-steps", "9",
                                                         "--name", "x"])))
    assert cfg == Outer(name="x", flag=True, inner=Inner(rate=2.0, steps=9), other=Inner(rate=2.0))
    assert isinstance(cfg.inner.rate, float) and isinstance(cfg.inner.steps, int)
    assert flags.build(Outer) == Outer()  # no flags: the config's own defaults
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])  # not a choice
    with pytest.raises(ConfigError, match=r"rate \(--rate\) must be positive"):
        flags.build(Outer, flags.given(p.parse_args(["--rate", "-1"])))


def test_a_field_added_to_a_stage_config_reaches_the_command_line_and_the_stage(monkeypatch, capsys):
    @dataclass
    class Wider(SearchConfig):
        exportable: bool = setting(False, "only modules that export to peft")
        tolerance: float = setting(0.25, "a new number", check=">= 0")

    monkeypatch.setattr(s3pet.configs, "SearchConfig", Wider)
    with pytest.raises(SystemExit):
        cli.parse(["search", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--exportable, --no-exportable only modules that export to peft (default: false)" in text
    assert "--tolerance TOLERANCE a new number (default: 0.25)" in text
    seen = {}

    def search(model, task, space, budget, out, cfg, **kw):
        seen["cfg"] = cfg
        raise ConfigError("stop here")  # the stage's config is all this test needs

    monkeypatch.setattr(pipeline, "search", search)
    rc = cli.main(["search", "--task", "t", "--budget", "1k", "--out", "o", "--exportable", "--tolerance", "0.5"])
    assert rc == 2 and "stop here" in capsys.readouterr().err
    assert isinstance(seen["cfg"], Wider) and seen["cfg"].exportable is True and seen["cfg"].tolerance == 0.5
    assert cli.main(["search", "--task", "t", "--budget", "1k", "--out", "o", "--tolerance", "nan"]) == 2
    assert "tolerance (--tolerance) must be a finite number" in capsys.readouterr().err


def _help_entries(text: str) -> dict[str, str]:
    """Each option of a --help text -> its help, lines joined."""
    entries, flag = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (-\w, )?(--[\w-]+)", line)
        if m:
            flag = m[2]
            entries[flag] = line[m.end():]
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


def _expected(v) -> str:
    return "none" if v is None else ("true" if v else "false") if isinstance(v, bool) else str(v)


@pytest.mark.parametrize("command", [c.name for c in cli.COMMANDS])
def test_help_of_every_command_shows_every_setting_with_its_default(command, capsys):
    c = next(c for c in cli.COMMANDS if c.name == command)
    with pytest.raises(SystemExit) as e:
        cli.parse([command, "--help"])
    assert e.value.code == 0
    entries = _help_entries(capsys.readouterr().out)
    tree = cli._tree(c.tree)
    for leaf in flags.leaves(tree) if tree is not None else []:
        m = re.search(r"\((?:default: ([^()]*)|required)\)$", entries[leaf.flag])
        assert m, (leaf.flag, entries[leaf.flag])
        if leaf.default is dataclasses.MISSING:
            assert m[0] == "(required)"
            continue
        shown = m[1].split(", ")
        section = ".".join(leaf.path[:-1])
        assert _expected(leaf.default) in shown or f"{section} {_expected(leaf.default)}" in shown, (leaf, m[0])
    for a in c.args:  # the command's own arguments, where they have a default
        if a.default not in (None, False):
            assert entries[a.flags[0]].endswith(f"(default: {a.default})"), a.flags


def test_the_main_job_runs_its_own_defaults_from_python_and_from_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_run_all", lambda *a: {})  # everything but the training
    assert cli.main(["run", "--out", str(tmp_path / "cli")]) == 0
    pipeline.run_all(tmp_path / "py")
    got = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("cli", "py")]
    assert got[0] == got[1]
    # The defaults of the main job, not those of the stages (read from cmd_run before RunConfig).
    assert got[0]["search"] == dataclasses.asdict(SearchConfig(**s3pet.configs.RUN_SEARCH))
    assert got[0]["train"] == dataclasses.asdict(TrainConfig(**s3pet.configs.RUN_TRAIN))
    assert got[0]["train"]["lr"] == got[0]["search"]["w_lr"] == 3e-3 and got[0]["train"]["max_train_samples"] == 2000
    assert cli.parse(["run", "--out", "x"]).cfg == RunConfig()


def test_a_replayed_main_job_has_its_settings_and_flags_override_them(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "_run_all", lambda *a: {})
    first = ["run", "--model", "tiny-bert", "--budget", "900", "--compare", "--search-epochs", "1.5", "--epochs",
             "4", "--seed", "3", "--gates", "hard-concrete", "--no-progress", "--data-dir", "somewhere"]
    assert cli.main([*first, "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["run", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b and a["search"]["epochs"] == 1.5 and a["train"]["epochs"] == 4.0 and a["data_dir"] == "somewhere"
    assert cli.main(["run", "--config", str(tmp_path / "a" / "config.json"), "--seed", "5", "-q",
                     "--out", str(tmp_path / "c")]) == 0
    c = json.loads((tmp_path / "c" / "config.json").read_text())
    assert c["search"]["seed"] == c["train"]["seed"] == 5
    assert {**c, "search": {**c["search"], "seed": 3}, "train": {**c["train"], "seed": 3}} == a


def test_a_replayed_search_reproduces_its_run(tmp_path, capsys):
    toy = str(write_sentiment_task(tmp_path / "task", n_train=64, n_eval=16))
    argv = ["search", "--model", "tiny-bert", "--task", toy, "--budget", "700", "--max-steps", "3", "--batch-size",
            "8", "--no-progress", "--alpha-lr", "0.05", "--select", "last", "--seed", "2"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["search", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b  # every setting, the model, task, space and budget
    for name in ("structure.json", "alphas.csv"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text(), name


def test_a_replayed_baseline_has_its_method_budget_and_settings(tmp_path):
    toy = str(write_sentiment_task(tmp_path / "task", n_train=32, n_eval=16))
    argv = ["baseline", "--method", "lora", "--budget", "600", "--model", "tiny-bert", "--task", toy, "--max-steps",
            "2", "--batch-size", "8", "--no-progress", "--lr-scale", "0.5", "--pooling", "mean"]
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["baseline", "--config", str(tmp_path / "a" / "config.json"), "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in "ab")
    assert a == b and a["method"] == "lora" and a["budget"]["params"] == 600 and a["train"]["lr_scale"] == 0.5


@pytest.mark.parametrize("content,needle", [
    ({"search": {"epochs": 1.0, "colour": "red"}}, "unknown setting 'search.colour'"),
    ({"model": "tiny-bert", "speed": 3}, "unknown key 'speed'"),
    ({"search": [1]}, "'search' must be an object"),
    ({"search": {"precision": "fp16"}}, "precision must be one of auto, fp32, bf16"),
    ({"command": "retrain", "train": {}}, "settings of 's3pet retrain', not of 's3pet search'"),
    ([1, 2], "must be a JSON object"),
    ("{", "not valid JSON"),
], ids=["unknown-setting", "unknown-key", "section-not-object", "bad-value", "other-command", "array", "not-json"])
def test_a_bad_config_file_is_one_line_naming_the_key(content, needle, tmp_path, capsys):
    p = tmp_path / "config.json"
    p.write_text(content if isinstance(content, str) else json.dumps(content))
    rc = cli.main(["search", "--config", str(p), "--task", "t", "--budget", "1k", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_every_choice_of_every_config_is_checked_on_construction():
    classes = [SearchConfig, TrainConfig, *(getattr(s3pet.configs, n) for n in ("OptunaConfig", "TransferConfig",
                                                                                "ExportConfig"))]
    n = 0
    for cls in classes:
        base = {"trials": 1} if cls.__name__ == "OptunaConfig" else {}
        for f in dataclasses.fields(cls):
            if "choices" in f.metadata:
                with pytest.raises(ConfigError, match=re.escape(f"(--{f.name.replace('_', '-')})")):
                    cls(**base, **{f.name: "fp16"})
                n += 1
    assert n >= 12  # precision, pooling, compile, order, gates, controller, selector, ... all of them


def test_same_names_across_commands_and_the_older_spellings():
    p = cli.parse
    assert p(["space", "tiny-bert"]).args.model == p(["space", "--model", "tiny-bert"]).args.model == "tiny-bert"
    assert p(["space"]).args.model == "minilm"
    for argv in (["A", "B"], ["--run", "A", "--run", "B"], ["--runs", "A", "B"], ["A", "--run", "B"]):
        assert p(["plot", *argv]).args.run == ["A", "B"], argv
        assert p(["average", *argv, "--budget", "1k", "--out", "s.json"]).args.run == ["A", "B"], argv
    assert p(["export", "--run", "r", "--out", "o"]).args.structure == "r"
    assert p(["export", "--structure", "r", "--out", "o", "--merge"]).cfg["export"].to == "merged"
    retrain = p(["retrain", "--structure", "s", "--task", "t", "--out", "o", "--no-progress"])
    assert retrain.cfg["train"].progress is False
    for argv in (["-v", "tasks"], ["tasks", "-v"], ["tasks", "--verbose"]):
        assert p(argv).args.verbose is True, argv
    assert p(["-q", "tasks"]).args.quiet is True and p(["tasks", "-q"]).args.quiet is True
    with pytest.raises(SystemExit):
        p(["search", "--budget", "1k", "--out", "o"])  # --task: required


def test_a_torchrun_rank_sets_the_device_of_every_stage():
    run = cli.on_device(cli.parse(["run", "--out", "x", "--seed", "4"]).cfg, "cuda:1")
    assert (run.search.device, run.train.device, run.search.seed) == ("cuda:1", "cuda:1", 4)
    optuna = cli.on_device(cli.parse(["optuna", "--task", "t", "--budget", "1k", "--trials", "2"]).cfg, "cpu")
    assert optuna["train"].device == "cpu" and optuna["optuna"].trials == 2


def test_verbose_and_quiet_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["-v", "tasks", "-q"])
    assert e.value.code == 2 and "not both" in capsys.readouterr().err


def test_parsing_any_command_line_loads_no_torch():
    code = ("import sys; from s3pet import cli\n"
            "for c in cli.COMMANDS:\n"
            "    try: cli.parse([c.name, '--help'])\n"
            "    except SystemExit: pass\n"
            "cli.parse(['run', '--out', 'x', '--seed', '2'])\n"
            "assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
