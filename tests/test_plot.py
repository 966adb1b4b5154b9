"""Plots: computed data on hand-made structures, and smoke tests of every renderer."""

import csv
import json
import subprocess
import sys

import networkx as nx
import pytest

from s3pet import plot as P
from s3pet.errors import ConfigError, StructureError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mod(stack, layer, role, kind, rank=1, n=10, site=None):
    return {"site": site or f"{stack}.{layer}.{role}", "stack": stack, "layer": layer,
            "role": role, "kind": kind, "rank": rank, "n_params": n, "score": 0.9}


def _structure(stacks, modules, model_type="bert", task="rte", seed=0):
    return {"schema": "s3pet.structure/v1",
            "base_model": {"name_or_path": "org/tiny-model", "model_type": model_type,
                           "layers": sum(stacks.values()), "stacks": stacks, "n_params": 100_000},
            "space": "s3pet-m", "budget": {"params": max(100, sum(m.get("n_params", 0) for m in modules)),
                                           "fraction": 0.001},
            "n_params": sum(m.get("n_params", 0) for m in modules), "modules": modules,
            "provenance": {"task": task, "seed": seed, "s3pet_version": "0.1.0"}}


def bert(modules=None):
    """Encoder-only, 3 layers, embedding norm used."""
    return _structure({"encoder": 3}, modules if modules is not None else [
        _mod("encoder", 0, "attn.q", "lora", rank=2, n=20),
        _mod("encoder", 0, "attn.q", "bitfit", n=4),
        _mod("encoder", 1, "ffn.out", "lora", rank=1, n=10),
        _mod("encoder", 2, "norm.ffn", "lnfit", n=4),
        _mod("encoder", 2, "ffn.block", "lowrank_adapter", n=9),
        _mod("encoder", -1, "norm.emb", "bitfit", n=4),
    ])


def t5():
    """Encoder-decoder, 2 + 2 layers, final norms."""
    return _structure({"encoder": 2, "decoder": 2}, [
        _mod("encoder", 1, "attn.v", "lora", rank=4, n=40),
        _mod("decoder", 0, "xattn.k", "lora", rank=1, n=10),
        _mod("decoder", 1, "xattn.block", "adapter", rank=8, n=80),
        _mod("decoder", 2, "norm.final", "lnfit", n=4),
        _mod("encoder", 2, "norm.final", "bitfit", n=4),
    ], model_type="t5")


def gpt2():
    """Decoder-only, 2 layers, fused qkv."""
    return _structure({"decoder": 2}, [
        _mod("decoder", 0, "attn.qkv", "lora", rank=2, n=30),
        _mod("decoder", 1, "ffn.in", "ia3", n=5),
        _mod("decoder", 1, "norm.attn", "lnfit", n=4),
    ], model_type="gpt2")


# --------------------------------------------------------------------------- structure grid


def test_structure_grid_cells_rows_and_columns():
    g = P.structure_grid(bert())
    assert g.stacks == ("encoder",)
    assert g.layers["encoder"] == (-1, 0, 1, 2)  # embedding row first, every block shown
    assert g.roles["encoder"] == ("attn.q", "ffn.out", "norm.ffn", "ffn.block", "norm.emb")
    assert g.kinds == ("lora", "lowrank_adapter", "bitfit", "lnfit")
    assert g.cell("encoder", 0, "attn.q") == {"lora": 2, "bitfit": 1}
    assert g.params[("encoder", 0, "attn.q", "lora")] == 20
    assert g.cell("encoder", 1, "attn.q") == {}
    assert set(g.keep.values()) == {1.0} and g.n_structures == 1
    assert g.roles_of("encoder", "bitfit") == ("attn.q", "norm.emb")


def test_structure_grid_sums_sites_sharing_a_cell_and_marks_final_row():
    s = _structure({"decoder": 2}, [
        _mod("decoder", 0, "ffn.in", "lora", rank=2, n=20, site="d.0.experts.0"),
        _mod("decoder", 0, "ffn.in", "lora", rank=3, n=30, site="d.0.experts.1"),
        _mod("decoder", 2, "norm.final", "lnfit"),
    ])
    g = P.structure_grid(s)
    assert g.rank[("decoder", 0, "ffn.in", "lora")] == 5
    assert g.params[("decoder", 0, "ffn.in", "lora")] == 50
    assert g.layers["decoder"] == (0, 1, 2)
    assert [P.layer_label(x, 2) for x in (-1, 0, 2)] == ["emb", "0", "final"]


def test_plots_read_structures_with_the_one_loader():
    """A structure without stack, rank or counts (the old plot reader guessed them) is refused,
    like every command refuses it."""
    legacy = {"schema": "s3pet.structure/v1", "base_model": {"layers": 4},
              "modules": [{"site": "h.1.attn", "layer": 1, "role": "attn.o", "kind": "bitfit"}]}
    with pytest.raises(StructureError, match="missing field 'budget'"):
        P.structure_grid(legacy)
    with pytest.raises(StructureError, match="base_model: missing field 'name_or_path'"):
        P.structure_grid({**legacy, "budget": {}})


@pytest.mark.parametrize("bad, match", [
    ({"modules": []}, "schema"),
    ({**bert(), "modules": {}}, "must be a list"),
    ({**bert(), "modules": [{"layer": 0, "kind": "lora"}]}, r"modules\[0\].*missing field.*role"),
    ({**bert(), "modules": [{**_mod("decoder", 0, "attn.q", "lora"), "n_params": 10}]}, r"stack"),
    ({**bert(), "modules": [{**_mod("encoder", 0, "attn.q", "lora"), "layer": "first"}]}, "layer"),
])
def test_structure_errors_name_the_entry(bad, match):
    bad = {**bad, "n_params": sum(m.get("n_params", 0) for m in bad["modules"] if isinstance(m, dict))} \
        if isinstance(bad.get("modules"), list) and "base_model" in bad else bad
    with pytest.raises(StructureError, match=match):
        P.structure_grid(bad)


def test_cell_label_and_title():
    assert P.cell_label({"lora": 2, "bitfit": 1}) == "L2+B"
    assert P.cell_label({"lowrank_adapter": 1, "adapter": 16}) == "LRA+A16"
    assert P.cell_label({"newkind": 3}) == "new3"
    title = P.structure_title(P.structure_grid(bert()))
    assert "org/tiny-model (bert)" in title and "space s3pet-m" in title
    assert "51 trainable params = 0.051% of the 100k backbone" in title
    assert "51% of the 100-param budget (0.1%)" in title


def test_average_grid_fractions_and_mean_rank():
    a = bert([_mod("encoder", 0, "attn.q", "lora", rank=2), _mod("encoder", 1, "attn.v", "bitfit")])
    b = bert([_mod("encoder", 0, "attn.q", "lora", rank=4)])
    c = bert([_mod("encoder", 2, "attn.q", "lora", rank=1)])
    c["provenance"]["seed"] = 2
    g = P.average_grid([a, b, c])
    assert g.n_structures == 3
    assert g.keep[("encoder", 0, "attn.q", "lora")] == pytest.approx(2 / 3)
    assert g.rank[("encoder", 0, "attn.q", "lora")] == pytest.approx(3.0)  # mean when kept
    assert g.keep[("encoder", 1, "attn.v", "bitfit")] == pytest.approx(1 / 3)
    assert g.keep[("encoder", 2, "attn.q", "lora")] == pytest.approx(1 / 3)
    assert g.info["seeds"] == ["0", "2"]
    assert P.structure_title(g).startswith("average of 3 structures")
    with pytest.raises(StructureError):
        P.average_grid([])


# --------------------------------------------------------------------------- gate grid


ALPHA_ROWS = [  # two LoRA components and a BitFit at one cell, a norm, the final norm
    {"index": "0", "site": "encoder.layer.0.q", "stack": "encoder", "layer": "0",
     "role": "attn.q", "kind": "lora", "unit": "0", "n": "8", "alpha": "1.0", "p": "0.9"},
    {"index": "1", "site": "encoder.layer.0.q", "stack": "encoder", "layer": "0",
     "role": "attn.q", "kind": "lora", "unit": "1", "n": "8", "alpha": "-1", "p": "0.3"},
    {"index": "2", "site": "encoder.layer.0.q", "stack": "encoder", "layer": "0",
     "role": "attn.q", "kind": "bitfit", "unit": "0", "n": "4", "alpha": "0", "p": "0.6"},
    {"index": "3", "site": "encoder.layer.1.ln", "stack": "encoder", "layer": "1",
     "role": "norm.ffn", "kind": "lnfit", "unit": "0", "n": "4", "alpha": "0", "p": "nan"},
    {"index": "4", "site": "encoder.final_layer_norm", "stack": "", "layer": "2",
     "role": "norm.final", "kind": "lnfit", "unit": "0", "n": "4", "alpha": "0", "p": "0.1"},
]


def test_gate_grid_mean_max_counts():
    g = P.gate_grid(ALPHA_ROWS)
    key = ("encoder", 0, "attn.q", "lora")
    assert g.agg == "mean" and g.p[key] == pytest.approx(0.6)
    assert g.count[key] == 2 and g.n_open[key] == 1
    assert g.p[("encoder", 0, "attn.q", "bitfit")] == pytest.approx(0.6)
    assert ("encoder", 1, "norm.ffn", "lnfit") not in g.p  # NaN skipped
    assert g.n_layers == {"encoder": 2}  # the final norm is not a block
    assert g.layers["encoder"] == (0, 1, 2)
    assert g.roles_of("encoder", "lnfit") == ("norm.final",)
    assert P.gate_grid(ALPHA_ROWS, agg="max").p[key] == pytest.approx(0.9)
    assert P.gate_grid(ALPHA_ROWS, n_layers={"encoder": 6}).layers["encoder"] == tuple(range(6))


def test_gate_grid_errors():
    with pytest.raises(ConfigError):
        P.gate_grid(ALPHA_ROWS, agg="median")
    with pytest.raises(StructureError, match="row 0"):
        P.gate_grid([{"layer": "x", "role": "attn.q", "kind": "lora", "p": "1", "stack": "e"}])


def test_gate_grid_marks_the_kept_modules_of_the_structure():
    s = _structure({"encoder": 2}, [_mod("encoder", 0, "attn.q", "lora", rank=1, n=10),
                                    _mod("encoder", 0, "attn.q", "bitfit", n=4)])
    g = P.gate_grid(ALPHA_ROWS, structure=s)
    assert g.kept == {("encoder", 0, "attn.q", "lora"): 1, ("encoder", 0, "attn.q", "bitfit"): 1}
    assert g.n_kept_modules == 2 and g.n_layers == {"encoder": 2}  # the structure's layers
    title = P.gates_title(g)
    assert "outlined: the 2 modules of the derived structure (2 of the candidates" in title
    assert "p from 0.10 to 0.60" in title and "> 0.5" not in title  # no count of p > 0.5
    assert "outlined" not in P.gates_title(P.gate_grid(ALPHA_ROWS))  # no structure: nothing marked


def test_titles_name_a_task_card_by_its_name():
    assert P.task_label({"task": "rte"}) == "rte"
    assert P.task_label({"task": "/home/u/cards/news.json", "task_name": "news-topics"}) == "news-topics"
    assert P.task_label({"task": "/home/u/cards/news.json"}) == "news"  # written before task_name
    assert P.task_label({}) is None
    title = P.structure_title(P.structure_grid(bert() | {"provenance": {"task": "/x/y/card.json",
                                                                        "task_name": "toy", "seed": 0}}))
    assert "task toy, seed 0" in title and "/x/y" not in title


def test_read_alphas_checks_columns(tmp_path):
    path = tmp_path / "alphas.csv"
    path.write_text("index,site,p\n0,a,0.5\n")
    with pytest.raises(StructureError, match="missing column"):
        P.read_alphas(path)


# --------------------------------------------------------------------------- trajectory


def test_trajectory_series_with_missing_keys():
    t = P.trajectory([
        {"step": 0, "loss_w": 1.0, "loss_alpha": 1.1, "shift": 0.0, "expected_params": 99,
         "budget": 100, "gate_entropy": 0.69, "gates_open": 0},
        {"step": 10, "loss_w": 0.8, "shift": float("nan")},          # partial, NaN skipped
        {"step": 10, "eval": {"main": 0.7, "accuracy": 0.7, "name": "x"}},
        {"loss_w": 0.5},                                              # no step: keeps 10
        {"step": 20, "loss": 0.4, "lr": 1e-4},                        # a retrain record
        "not a record",
    ])
    assert t.loss_w == P.Series((0.0, 10.0, 10.0), (1.0, 0.8, 0.5))
    assert t.loss_alpha.value == (1.1,)
    assert t.shift == P.Series((0.0,), (0.0,))
    assert t.eval_main == P.Series((10.0,), (0.7,))
    assert set(t.evals) == {"main", "accuracy"}
    assert t.loss == P.Series((20.0,), (0.4,)) and t.lr.value == (1e-4,)
    empty = P.trajectory([])
    assert empty.gates_open == P.Series((), ()) and empty.eval_main == P.Series((), ())


def _search_history(controller="shift", n=30):
    recs = []
    for step in range(1, n + 1):
        held = controller == "shift"
        recs.append({"step": step, "loss_w": 1 / step, "loss_alpha": 0.9, "budget": 100,
                     "shift": 1.5 + step / 100 if held else 0.0,
                     "expected_params": 100.0 if held else 300 - step, "gate_entropy": 0.5, "gates_open": 0,
                     "p_max": 0.2 + step / 100, "p_median": 0.1, "p_kept_min": 0.15, "derived_kept": 5,
                     "derived_params_by_kind": {"lora": 60, "bitfit": 30} if step < 20 else {"lora": 90}})
    return recs + [{"step": n, "eval": {"main": 0.8}}]


def test_panels_draw_what_moves():
    t = P.trajectory(_search_history())
    assert t.derived_by_kind == {"lora": P.Series(tuple(map(float, range(1, 31))), (60.0,) * 19 + (90.0,) * 11),
                                 "bitfit": P.Series(tuple(map(float, range(1, 31))), (30.0,) * 19 + (0.0,) * 11)}
    assert t.budget_gap == 0.0 and t.p_kept_min.value[0] == 0.15
    # the shift holds sum n p at the budget: the derived structure's size replaces the flat panel
    assert P.trajectory_panels(t) == ("losses", "derived", "shift", "gates")
    # no shift controller: the expected size moves, the shift stays 0
    free = P.trajectory(_search_history("none"))
    assert free.budget_gap == pytest.approx(1.99) and P.trajectory_panels(free) == ("losses", "budget", "gates")
    # histories written before the derivation statistics: the flat budget panel is dropped
    old = P.trajectory([{k: v for k, v in r.items() if not k.startswith(("p_", "derived"))}
                        for r in _search_history()])
    assert P.trajectory_panels(old) == ("losses", "shift", "gates")
    retrain = P.trajectory([{"step": 10, "loss": 0.5, "lr": 1e-3}, {"step": 10, "eval": {"main": 0.7}}])
    assert P.trajectory_panels(retrain) == ("losses", "validation", "lr")
    assert P.trajectory_panels(P.trajectory([{"step": 1, "loss": 0.5}])) == ("losses",)


def test_trajectory_figures_have_one_axes_per_panel():
    axes = P.plot_trajectory(P.trajectory(_search_history()))
    assert axes.shape == (2, 2)
    assert [a.get_title(loc="left") for a in axes.flat] == [
        "losses", "derived structure", "shift b of the global sigmoid", "gates"]
    assert axes[1, 1].get_yscale() == "log"  # p near the budget share reads on a log scale
    retrain = P.plot_trajectory(P.trajectory([{"step": s, "loss": 1 / s, "lr": 1e-3} for s in range(1, 9)]
                                             + [{"step": 8, "eval": {"main": 0.7, "f1": 0.6}}]))
    assert retrain.shape == (1, 3) and retrain[0, 1].get_title(loc="left") == "validation"


def test_read_history_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"step": 0, "loss_w": 1}\n\n{"step": 1, "loss_w": 0.5}\n{"step": 2, "lo')
    assert [r["step"] for r in P.read_history(path)] == [0, 1]
    path.write_text('{"step": 0}\nbroken\n{"step": 1}\n')
    with pytest.raises(StructureError, match="history.jsonl:2"):
        P.read_history(path)


# --------------------------------------------------------------------------- graph


def _residual_path(g, stack):
    sub = nx.DiGraph([(u, v) for u, v, t in g.edges(data="type") if t == "residual"])
    return nx.shortest_path(sub, f"{stack}.in", f"{stack}.out")


def test_graph_bert_nodes_edges_and_attachment():
    g = P.structure_graph(bert())
    types = [t for _, t in g.nodes(data="type")]
    # in + out + 3 blocks x (block + attn, norm, ffn, norm) + 6 modules
    assert types.count("block") == 3 and types.count("module") == 6
    assert g.number_of_nodes() == 2 + 3 * 5 + 6
    residual = [e for e in g.edges(data="type") if e[2] == "residual"]
    assert len(residual) == 2 + 3 * 5 - 1
    # post-LN (BERT): attention, then its norm, FFN, then its norm
    path = _residual_path(g, "encoder")
    assert path[:6] == ["encoder.in", "encoder.0", "encoder.0.attn", "encoder.0.norm.attn",
                        "encoder.0.ffn", "encoder.0.norm.ffn"]
    hosts = {g.nodes[v]["role"] + "/" + g.nodes[v]["kind"]: u
             for u, v, t in g.edges(data="type") if t == "delta"}
    assert hosts == {"attn.q/lora": "encoder.0.attn", "attn.q/bitfit": "encoder.0.attn",
                     "ffn.out/lora": "encoder.1.ffn", "norm.ffn/lnfit": "encoder.2.norm.ffn",
                     "ffn.block/lowrank_adapter": "encoder.2.ffn",
                     "norm.emb/bitfit": "encoder.in"}
    assert g.nodes["encoder.0.attn.q:lora"]["label"] == "lora r2"
    assert g.nodes["encoder.0.attn.q:bitfit"]["label"] == "bitfit"


def test_graph_t5_cross_edges_and_final_norm():
    g = P.structure_graph(t5())
    assert g.graph["sublayers"]["encoder"] == ("norm.attn", "attn", "norm.ffn", "ffn")  # pre-LN
    assert "xattn" in g.graph["sublayers"]["decoder"]
    cross = [(u, v) for u, v, t in g.edges(data="type") if t == "cross"]
    assert cross == [("encoder.out", "decoder.0.xattn"), ("encoder.out", "decoder.1.xattn")]
    assert g.number_of_nodes() == (2 + 2 * 5) + (2 + 2 * 7) + 5
    preds = {v: next(iter(g.predecessors(v))) for v, t in g.nodes(data="type") if t == "module"}
    assert preds["decoder.1.xattn.block:adapter"] == "decoder.1.xattn"
    assert preds["decoder.2.norm.final:lnfit"] == "decoder.out"
    assert preds["encoder.2.norm.final:bitfit"] == "encoder.out"


def test_graph_layout_is_deterministic_and_distinct():
    for s in (bert(), t5(), gpt2()):
        g = P.structure_graph(s)
        pos = P.graph_layout(g)
        assert set(pos) == set(g.nodes)
        assert len(set(pos.values())) == len(pos)
        assert pos == P.graph_layout(P.structure_graph(s))
    pos = P.graph_layout(P.structure_graph(t5()))
    assert max(x for n, (x, _) in pos.items() if n.startswith("encoder")) < min(
        x for n, (x, _) in pos.items() if n.startswith("decoder"))  # side by side


def test_compute_functions_do_not_import_matplotlib():
    code = ("import sys, json; from s3pet import plot as P; "
            f"s = json.loads({json.dumps(json.dumps(bert()))}); "
            "P.structure_grid(s); P.average_grid([s, s]); P.trajectory([]); "
            "assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- renderers


def _png_ok(path):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 2000


@pytest.mark.parametrize("make", [bert, t5, gpt2], ids=["encoder", "encoder-decoder", "decoder"])
def test_renderers_draw_every_structure(make):
    s = make()
    grid = P.structure_grid(s)
    ax = P.plot_structure(grid)
    assert len(grid.stacks) > 1 or hasattr(ax, "figure")
    per_kind = P.plot_structure(grid, mode="per-kind")
    assert len(per_kind) == sum(len([k for k in grid.kinds if grid.roles_of(st, k)])
                                for st in grid.stacks)
    assert P.plot_average(P.average_grid([s, s])) is not None
    assert P.plot_graph(P.structure_graph(s)).figure is not None
    with pytest.raises(ConfigError):
        P.plot_structure(grid, mode="stacked")


def test_renderers_draw_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8))
    a, b, c, d = fig.subplots(2, 2).flat
    assert P.plot_structure(P.structure_grid(bert()), ax=a) is not a  # split into panels
    assert P.plot_gates(P.gate_grid(ALPHA_ROWS[:3]), ax=b) is not None
    assert P.plot_graph(P.structure_graph(gpt2()), ax=c) is c
    axes = P.plot_trajectory(P.trajectory([{"step": 0, "loss": 1.0}]),
                             axes=Figure().subplots(2, 2))
    assert axes.shape == (2, 2)


def _run_dir(root, structure, n_steps=30):
    search = root / "search"
    search.mkdir(parents=True)
    (search / "structure.json").write_text(json.dumps(structure))
    with open(search / "alphas.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "site", "stack", "layer", "role", "kind", "unit", "n", "alpha", "p"])
        for i, m in enumerate(structure["modules"]):
            w.writerow([i, m["site"], m["stack"], m["layer"], m["role"], m["kind"], 0,
                        m["n_params"], 0.5, 0.1 + 0.8 * (i % 2)])
    with open(search / "history.jsonl", "w") as f:
        for step in range(n_steps):
            f.write(json.dumps({"step": step, "loss_w": 1 / (step + 1), "loss_alpha": 0.9,
                                "shift": step / 10, "expected_params": 100, "budget": 100,
                                "gate_entropy": 0.5, "gates_open": step // 10}) + "\n")
        f.write(json.dumps({"step": n_steps, "eval": {"main": 0.8}}) + "\n")
    retrain = root / "retrain"
    retrain.mkdir()
    with open(retrain / "history.jsonl", "w") as f:
        for step in range(n_steps):
            f.write(json.dumps({"step": step, "loss": 1 / (step + 1), "lr": 1e-4}) + "\n")
    return root


def test_plot_paths_run_dirs_and_average(tmp_path):
    runs = [_run_dir(tmp_path / "runs" / "a", bert()), _run_dir(tmp_path / "runs" / "b", t5())]
    written = P.plot_paths(runs, formats=("png",))
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    for run in ("a", "b"):
        for stem in ("structure", "structure_per_kind", "structure_graph", "gates",
                     "trajectory"):
            assert f"runs/{run}/search/{stem}.png" in names
        assert f"runs/{run}/retrain/trajectory.png" in names
    assert "runs/average.png" in names  # in the inputs' common folder
    assert all(_png_ok(p) for p in written)


def test_a_stage_holding_the_same_structure_is_not_drawn_twice(tmp_path):
    run = _run_dir(tmp_path / "run", bert())
    same = json.loads((run / "search" / "structure.json").read_text())
    for m in same["modules"]:
        m["score"] = None  # retraining keeps the modules; only the scores may differ
    (run / "retrain" / "structure.json").write_text(json.dumps(same))
    names = {p.relative_to(run).as_posix() for p in P.plot_paths(run, formats=("png",))}
    assert "search/structure.png" in names and "retrain/trajectory.png" in names
    assert not any(n.startswith("retrain/structure") for n in names)
    other = json.loads(json.dumps(same))
    other["modules"] = other["modules"][:-1]  # a different structure in retrain/ is drawn
    other["n_params"] = sum(m["n_params"] for m in other["modules"])
    (run / "retrain" / "structure.json").write_text(json.dumps(other))
    names = {p.relative_to(run).as_posix() for p in P.plot_paths(run, formats=("png",))}
    assert "retrain/structure.png" in names


def test_plot_paths_structure_file_out_folder_and_svg(tmp_path):
    src = tmp_path / "seed0.json"
    src.write_text(json.dumps(gpt2()))
    written = P.plot_paths([str(src)], out=tmp_path / "plots", formats=("png", "svg"))
    assert sorted(p.name for p in written) == sorted(
        f"seed0{x}.{f}" for x in ("", "_per_kind", "_graph") for f in ("png", "svg"))
    assert all(p.parent == tmp_path / "plots" for p in written)
    svg = (tmp_path / "plots" / "seed0.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_plot_paths_single_file_out(tmp_path):
    src = [tmp_path / f"s{i}.json" for i in range(2)]
    for p in src:
        p.write_text(json.dumps(bert()))
    out = tmp_path / "fig" / "avg.png"
    assert P.plot_paths(src, out=out) == [out]  # the average, alone
    assert _png_ok(out)


def test_plot_paths_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        P.plot_paths([tmp_path / "missing"])
    with pytest.raises(StructureError, match="no structure.json"):
        P.plot_paths([tmp_path])
    (tmp_path / "x.json").write_text('{"schema": "other"}')
    with pytest.raises(StructureError, match="schema"):
        P.plot_paths([tmp_path / "x.json"])
    (tmp_path / "y.json").write_text("{broken")
    with pytest.raises(StructureError, match="not valid JSON"):
        P.plot_paths([tmp_path / "y.json"])
    with pytest.raises(ConfigError, match="unknown plot format"):
        P.plot_paths([tmp_path / "x.json"], formats=("gif",))
    with pytest.raises(ConfigError):
        P.plot_paths([])


def test_empty_structure_still_draws(tmp_path):
    s = _structure({"encoder": 2}, [])
    grid = P.structure_grid(s)
    assert grid.roles == {"encoder": ()} and grid.kinds == ()
    P.plot_structure(grid, mode="per-kind")  # falls back to the (empty) combined grid
    g = P.structure_graph(s)
    assert [t for _, t in g.nodes(data="type")].count("module") == 0
    run = tmp_path / "run"
    run.mkdir()
    (run / "structure.json").write_text(json.dumps(s))
    out = tmp_path / "one.svg"
    assert P.plot_paths([run], out=out) == [out]  # a run dir into one file: the heatmap
    assert out.read_text().lstrip().startswith("<?xml")
