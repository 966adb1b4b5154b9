"""benchmarks/pairs.py: paired differences of named methods from a results.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pairs  # noqa: E402


def _results(tmp_path):
    runs = [{"task": t, "method": m, "budget": "0.1%", "seed": s, "test": v}
            for t, m, s, v in [("rte", "a", 0, 0.60), ("rte", "b", 0, 0.55), ("rte", "a", 1, 0.62),
                               ("rte", "b", 1, 0.61), ("cb", "a", 0, 0.70), ("cb", "b", 0, 0.72),
                               ("cb", "b", 1, 0.50)]]  # cb seed 1 has no pair: left out
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"runs": runs}))
    return p


def test_pairs_report_the_task_stratified_difference(tmp_path, capsys):
    assert pairs.main([str(_results(tmp_path)), "a:b", "a:missing"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = out[2].split(" | ")
    # rte: mean of +5 and +1 = +3; cb: -2; the task average: +0.5
    assert row[2] == "cb, rte" and row[3] == "3 (1)" and row[4] == "+0.5" and row[6].startswith("2 / 1")
    assert "| `a` | `missing` | – | 0 |" in out[3]


def test_a_pair_without_a_colon_is_refused(tmp_path):
    with pytest.raises(SystemExit) as e:
        pairs.main([str(_results(tmp_path)), "ab"])
    assert e.value.code == 2
