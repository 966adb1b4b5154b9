"""``s3pet predict`` / ``predict_file``: predictions on new text equal what evaluation computes."""

from __future__ import annotations

import csv
import json
import math
import shutil

import pytest

from s3pet import train as T
from s3pet.baselines import baseline_structure
from s3pet.cli import main
from s3pet.errors import TaskError
from s3pet.models import load_backbone
from s3pet.pipeline import evaluate_run, retrain
from s3pet.predict import predict_file
from s3pet.tasks import get_card, input_examples, input_fields, load_task
from s3pet.train import TrainConfig
from synthetic import write_sentiment_task

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(tmp, card: str, model: str = "tiny-bert", **kw) -> str:
    st = baseline_structure("lora", load_backbone(model), 1500)
    st.save(tmp / "s.json")
    cfg = dict(max_steps=60, batch_size=16, lr=3e-2, eval_every=30, progress=False, log_every=10, pooling="mean",
               eval_batch_size=8)  # several eval batches: predictions must come back in order across them
    cfg.update(kw)
    retrain(tmp / "s.json", card, tmp / "run", TrainConfig(**cfg))
    return str(tmp / "run")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predict")
    card = str(write_sentiment_task(tmp / "task", n_train=128, n_eval=40))
    return card, _train(tmp, card)


def _evaluation_predictions(monkeypatch, run) -> tuple[dict, dict]:
    """evaluate_run's result and the predictions its evaluation scored, per split."""
    seen = []
    real = T.compute_metrics

    def spy(card, preds, labels):
        seen.append(list(preds))
        return real(card, preds, labels)

    monkeypatch.setattr(T, "compute_metrics", spy)
    ev = evaluate_run(run)
    monkeypatch.setattr(T, "compute_metrics", real)
    return ev, dict(zip(("validation", "test"), seen))


def _test_rows(card_path: str, run: str) -> list:
    cfg = json.loads(open(f"{run}/config.json").read())["train"]
    return load_task(card_path, seed=cfg["seed"], max_eval_samples=cfg["max_eval_samples"] or None).test


def _write_csv(path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _read_jsonl(path) -> list[dict]:
    return [json.loads(x) for x in open(path).read().splitlines()]


def test_predictions_equal_evaluation(tmp_path, monkeypatch, toy):
    card_path, run = toy
    ev, seen = _evaluation_predictions(monkeypatch, run)
    test = _test_rows(card_path, run)
    # A label column and an extra column are ignored; the text field is all a row needs.
    _write_csv(tmp_path / "in.csv", [{"id": i, "text": ex.texts[0], "label": "junk"} for i, ex in enumerate(test)])
    n = predict_file(run, tmp_path / "in.csv", tmp_path / "out.jsonl")
    out = _read_jsonl(tmp_path / "out.jsonl")
    assert n == len(out) == len(test) == len(seen["test"])
    card = get_card(card_path)
    assert [r["label_id"] for r in out] == seen["test"]  # row by row, in order
    assert len(set(seen["test"])) == 2  # a trained model: both labels occur, so the comparison means something
    for r in out:
        assert r["label"] == card.labels[r["label_id"]]
        assert len(r["scores"]) == len(card.labels) and math.isclose(sum(r["scores"]), 1.0, rel_tol=1e-5)
        assert max(range(len(r["scores"])), key=r["scores"].__getitem__) == r["label_id"]
    # The same rows as JSON lines predict the same, at another batch size.
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": ex.texts[0]}) + "\n" for ex in test))
    predict_file(run, tmp_path / "in.jsonl", tmp_path / "out2.jsonl", batch_size=3)
    out2 = _read_jsonl(tmp_path / "out2.jsonl")
    assert [r["label_id"] for r in out2] == seen["test"]
    for a, b in zip(out, out2):
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)


def test_predict_reads_the_main_jobs_retrain(tmp_path, toy):
    card_path, run = toy
    shutil.copytree(run, tmp_path / "job" / "retrain")
    (tmp_path / "in.jsonl").write_text('{"text": "a great film"}\n{"text": "a dull plot"}\n')
    predict_file(run, tmp_path / "in.jsonl", tmp_path / "a.jsonl")
    assert main(["predict", "--run", str(tmp_path / "job"), "--input", str(tmp_path / "in.jsonl"),
                 "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "a.jsonl").read_text() == (tmp_path / "b.jsonl").read_text()
    assert len(_read_jsonl(tmp_path / "b.jsonl")) == 2
    assert evaluate_run(tmp_path / "job")["test"] == evaluate_run(run)["test"]  # evaluate reads it too


def test_regression_scores_are_the_evaluated_values(tmp_path, monkeypatch):
    card_path = write_sentiment_task(tmp_path / "task", n_train=64, n_eval=20)
    card = json.loads(card_path.read_text())
    card.update(name="toy-score", type="regression", labels=None, label_words=None, metrics=["pearson"],
                main_metric="pearson")
    card["source"]["value_maps"] = {"label": {"pos": "1.0", "neg": "0.0"}}
    card_path.write_text(json.dumps(card))
    run = _train(tmp_path, str(card_path), max_steps=10, eval_every=10)
    _, seen = _evaluation_predictions(monkeypatch, run)
    test = _test_rows(str(card_path), run)
    _write_csv(tmp_path / "in.csv", [{"text": ex.texts[0]} for ex in test])
    predict_file(run, tmp_path / "in.csv", tmp_path / "out.jsonl")
    out = _read_jsonl(tmp_path / "out.jsonl")
    assert all(r["label"] is None and r["label_id"] is None for r in out)
    assert [r["scores"] for r in out] == pytest.approx(seen["test"], abs=1e-5)


def test_text_to_text_predictions_equal_evaluation(tmp_path, monkeypatch):
    card_path = str(write_sentiment_task(tmp_path / "task", n_train=64, n_eval=20))
    run = _train(tmp_path, card_path, model="tiny-t5", max_steps=6, eval_every=6)  # T5 reads the label words
    _, seen = _evaluation_predictions(monkeypatch, run)
    _write_csv(tmp_path / "in.csv", [{"text": ex.texts[0]} for ex in _test_rows(card_path, run)])
    predict_file(run, tmp_path / "in.csv", tmp_path / "out.jsonl")
    out = _read_jsonl(tmp_path / "out.jsonl")
    assert [r["label_id"] for r in out] == seen["test"]
    assert all(len(r["scores"]) == 2 for r in out)


def test_input_fields_follow_the_card_templates_and_choices():
    assert input_fields(get_card("rte")) == ("sentence1", "sentence2")
    copa = get_card("copa")
    assert input_fields(copa) == ("premise", "question", "choice1", "choice2")
    ex = input_examples(copa, [("row", {"premise": "The man fell.", "question": "cause", "choice1": "He slipped.",
                                        "choice2": "He sang."})])
    assert ex[0].texts == ("The man fell. What was the cause?",) and ex[0].choices == ("He slipped.", "He sang.")
    with pytest.raises(TaskError, match="'question' value 'why'"):
        input_examples(copa, [("row", {"premise": "p", "question": "why", "choice1": "a", "choice2": "b"})])
    assert input_examples(get_card("sst2"), [("row", "just a string")])[0].texts == ("just a string",)


BAD = [  # (name, input file name, its content or None, extra CLI args, what the one line names)
    ("missing-field-csv", "in.csv", "review,label\nnice,pos\n", [], ["'text'", "in.csv"]),
    ("missing-field-jsonl", "in.jsonl", '{"text": "ok"}\n{"review": "no"}\n', [], ["'text'", "in.jsonl:2"]),
    ("not-an-object", "in.jsonl", '["text"]\n', [], ["in.jsonl:1", "object"]),
    ("bad-json", "in.jsonl", '{"text": "ok"}\n{"text": \n', [], ["in.jsonl:2"]),
    ("not-text", "in.jsonl", '{"text": 3}\n', [], ["in.jsonl:1", "not text"]),
    ("ragged-csv", "in.csv", "text,id\nok,1\nno\n", [], ["in.csv:3", "columns"]),
    ("header-only", "in.csv", "text\n", [], ["no rows"]),
    ("no-such-input", "none.csv", None, [], ["none.csv", "not found"]),
    ("unknown-suffix", "in.xml", "<a/>", [], ["in.xml", "format"]),
    ("batch-size", "in.csv", "text\nok\n", ["--batch-size", "0"], ["--batch-size"]),
    ("device", "in.csv", "text\nok\n", ["--device", "gpu"], ["--device"]),
]


@pytest.mark.parametrize("name,fname,content,extra,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, toy, name, fname, content, extra, needles):
    _, run = toy
    src = tmp_path / fname
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out.jsonl"
    out.write_text("earlier predictions\n")  # a failed run leaves an existing file as it was
    rc = main(["predict", "--run", run, "--input", str(src), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("s3pet: error:"), err
    for needle in needles:
        assert needle in err, err
    assert out.read_text() == "earlier predictions\n"
    assert {p.name for p in tmp_path.iterdir()} == {"out.jsonl"} | ({fname} if content is not None else set())


@pytest.mark.parametrize("case", ["out-is-folder", "out-is-input", "unfinished-run", "search-run"])
def test_bad_run_or_out_is_one_line(tmp_path, capsys, toy, case):
    _, run = toy
    src = tmp_path / "in.csv"
    src.write_text("text\nok\n")
    out, needle = tmp_path / "out.jsonl", ""
    if case == "out-is-folder":
        out, needle = tmp_path, "is a folder"
    elif case == "out-is-input":
        out, needle = src, "is the input file"
    elif case == "unfinished-run":
        run, needle = str(tmp_path), "not a finished"
    else:
        (tmp_path / "search").mkdir()
        (tmp_path / "search" / "search.pt").write_bytes(b"")
        run, needle = str(tmp_path / "search"), "retrain its structure.json"
    rc = main(["predict", "--run", run, "--input", str(src), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert src.read_text() == "text\nok\n" and not (tmp_path / "out.jsonl").exists()
