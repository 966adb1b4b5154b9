"""``s3pet space``: the candidate table, its JSON form, and one-line errors."""

from __future__ import annotations

import json
import math
import re

import pytest

from s3pet.cli import main
from s3pet.models import TINY_ALIASES, count_params, load_backbone
from s3pet.space import SHIPPED_SPACES, discover_sites, instantiate, load_space

pytestmark = pytest.mark.usefixtures("one_thread")

KIND_LINE = re.compile(r"^\s+(\S+)\s+(\d+) modules\s+(\d+) candidates\s+([\d,]+) params$")
TOTAL_LINE = re.compile(r"^total: ([\d,]+) candidates, ([\d,]+) parameters = ([\d.]+)% of the backbone$")


def expected_totals(model, space):
    """Per-kind totals computed here from the library, not from the CLI's report."""
    specs = instantiate(load_space(space), discover_sites(model))
    per_kind: dict = {}
    for s in specs:
        k = per_kind.setdefault(s.kind, {"modules": 0, "candidates": 0, "params": 0})
        k["modules"] += 1
        k["candidates"] += s.units
        k["params"] += s.n_params
    seen = set()
    for s in specs:  # a tensor shared by several modules (Compacter, FacT) counts once, for its kind
        for name, shape in s.shared.items():
            if name not in seen:
                seen.add(name)
                per_kind[s.kind]["params"] += math.prod(shape)
    return per_kind, count_params(model)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("alias,space", [("tiny-bert", "s3pet-m"), ("tiny-t5", "unified"), ("tiny-gpt2", "s3pet-l")])
def test_table_has_totals_per_kind_and_share(alias, space, capsys, tiny_backbone):
    code, out, err = run(capsys, "space", alias, "--space", space)
    assert code == 0 and err == ""
    per_kind, backbone = expected_totals(tiny_backbone(alias), space)
    lines = out.splitlines()
    assert lines[0].startswith(f"space {space} on {alias}") and f"{backbone:,}" in lines[0]
    start = lines.index("per kind:")
    got = {}
    for line in lines[start + 1:]:
        m = KIND_LINE.match(line)
        if not m:
            break
        got[m[1]] = {"modules": int(m[2]), "candidates": int(m[3]), "params": int(m[4].replace(",", ""))}
    assert got == per_kind
    total = sum(v["params"] for v in per_kind.values())
    m = TOTAL_LINE.match(lines[-1])
    assert m, lines[-1]
    assert int(m[1].replace(",", "")) == sum(v["candidates"] for v in per_kind.values())
    assert int(m[2].replace(",", "")) == total
    assert float(m[3]) == pytest.approx(100 * total / backbone, abs=6e-4)
    # One table row per module.
    assert sum(1 for line in lines if re.search(r"\s(encoder|decoder)\s+-?\d+\s", line)) == \
        sum(v["modules"] for v in per_kind.values())


@pytest.mark.parametrize("space", SHIPPED_SPACES)
@pytest.mark.parametrize("alias", TINY_ALIASES)
def test_json_totals_equal_the_sum_of_rows(alias, space, capsys, tiny_backbone):
    code, out, err = run(capsys, "space", alias, "--space", space, "--json")
    assert code == 0
    r = json.loads(out)
    rows = r["modules"]
    assert (r["model"], r["space"]) == (alias, space)
    shared = sum(t["n_params"] for t in r.get("shared", []))
    assert ("shared" in r) == (space == "unified")  # only the unified space has kinds sharing tensors
    assert r["total_params"] == sum(m["n_params"] for m in rows) + shared
    assert r["candidates"] == sum(m["units"] for m in rows)
    assert all(m["n_params"] == m["units"] * m["unit_params"] for m in rows)
    kinds = {m["kind"] for m in rows}
    assert set(r["per_kind"]) == kinds
    for k in kinds:
        mine = [m for m in rows if m["kind"] == k]
        assert r["per_kind"][k] == {"modules": len(mine), "candidates": sum(m["units"] for m in mine),
                                    "params": sum(m["n_params"] for m in mine)
                                    + sum(t["n_params"] for t in r.get("shared", []) if t["kind"] == k)}
    assert sum(r["per_layer"].values()) == r["total_params"] - shared  # shared tensors belong to no layer
    for key, v in r["per_layer"].items():
        stack, layer = key.rsplit(".", 1)
        assert v == sum(m["n_params"] for m in rows if m["stack"] == stack and m["layer"] == int(layer))
    model = tiny_backbone(alias)
    assert r["backbone_params"] == count_params(model)
    assert r["share_of_backbone"] == pytest.approx(r["total_params"] / r["backbone_params"], rel=1e-12)
    assert r["per_kind"] == expected_totals(model, space)[0]


def test_user_space_file(tmp_path, capsys):
    p = tmp_path / "q-only.json"
    p.write_text(json.dumps({"name": "q-only", "entries": [{"kind": "lora", "roles": ["attn.q"], "rank": 4}]}))
    code, out, _ = run(capsys, "space", "tiny-llama", "--space", str(p), "--json")
    r = json.loads(out)
    assert code == 0 and r["space"] == "q-only"
    assert {m["role"] for m in r["modules"]} == {"attn.q"} and {m["units"] for m in r["modules"]} == {4}


@pytest.mark.parametrize("args,needle", [
    (["--space", "no-such-space"], "no-such-space"),
    (["--space", "does/not/exist.json"], "does/not/exist.json"),
], ids=["unknown-name", "missing-file"])
def test_bad_space_exits_2_with_one_line(args, needle, capsys):
    code, out, err = run(capsys, "space", "tiny-bert", *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("s3pet: error:") and needle in lines[0]
    assert "Traceback" not in err


def test_malformed_space_file_exits_2_naming_the_field(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"entries": [{"kind": "lora", "roles": ["*"], "rank": 0}]}))
    code, out, err = run(capsys, "space", "tiny-bert", "--space", str(p))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "rank" in err and "entries[0]" in err


def test_space_matching_nothing_exits_2(tmp_path, capsys):
    p = tmp_path / "cross.json"
    p.write_text(json.dumps({"entries": [{"kind": "lora", "roles": ["xattn.*"]}]}))
    code, _, err = run(capsys, "space", "tiny-gpt2", "--space", str(p))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "roles found" in err


@pytest.mark.slow
def test_minilm_real_weights(capsys):
    code, out, _ = run(capsys, "space", "minilm", "--json")
    assert code == 0
    r = json.loads(out)
    model = load_backbone("minilm")
    cfg = model.config
    d, ff, n = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    assert n == 6 and cfg.model_type == "bert"
    sites = discover_sites(model)
    assert {s.layer for s in sites if s.host == "linear"} == set(range(6))
    assert r["backbone_params"] == count_params(model)
    # s3pet-m on a post-norm BERT, written out from the design: per block, LoRA r=1 and BitFit on
    # q, k, v, o, FFN in, FFN out; LNFit and BitFit on both norms; a rank-1 adapter (d // 32)
    # after each sublayer; plus LNFit and BitFit on the embedding norm.
    lora = 4 * (d + d) + (d + ff) + (ff + d)
    bitfit = 5 * d + ff + 2 * d
    lnfit = 2 * d
    lowrank = 2 * 3 * (d + d // 32)
    per_layer = lora + bitfit + lnfit + lowrank
    assert r["per_layer"] == {**{f"encoder.{i}": per_layer for i in range(n)}, "encoder.-1": 2 * d}
    assert r["per_kind"]["lora"]["params"] == n * lora
    assert r["per_kind"]["lowrank_adapter"]["params"] == n * lowrank
    assert r["total_params"] == n * per_layer + 2 * d == sum(m["n_params"] for m in r["modules"])
    assert r["candidates"] == n * (6 + 6 + 2 + 2 + 2) + 2
