"""The LST memory benchmark on a tiny model (CPU): every row lands in the JSON and the table, and what
autograd keeps for the backward pass is smaller for LST than for modules inside the backbone.
Not a timing test: the memory compared is the exact count of saved bytes, not the resident set."""

from __future__ import annotations

import json

from scripts import load_benchmark


def test_every_row_and_lst_keeps_less_for_backward(tmp_path, capsys):
    bench = load_benchmark("lst_memory")
    out = tmp_path / "lst.json"
    methods = ("lora", "bitfit", "lst")  # one process each: the other rows run the same code
    assert bench.main(["--models", "tiny-bert", "--methods", ",".join(methods), "--batch", "8", "--seq", "64",
                       "--steps", "1", "--warmup", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(methods) and not any("error" in r for r in rows.values())
    for m in methods:  # one budget: 1% of the tiny model
        assert 0 < rows[m]["trainable_params"] <= 0.01 * _backbone_params()
    for m in ("lora", "bitfit"):  # the frozen backbone keeps nothing for a backward pass under LST
        assert rows["lst"]["saved_for_backward_mb"] < rows[m]["saved_for_backward_mb"]
    table = capsys.readouterr().out
    assert all(f"| tiny-bert | {m} |" in table for m in methods)


def _backbone_params() -> int:
    from s3pet.models import count_params, load_backbone

    return count_params(load_backbone("tiny-bert"))
