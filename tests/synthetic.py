"""A small learnable task in a user card (CSV files), written into a test's tmp folder."""

from __future__ import annotations

import json
import random
from pathlib import Path

POS = ["good", "great", "fine", "lovely", "superb"]
NEG = ["bad", "awful", "poor", "dull", "sad"]
FILLER = ["the", "movie", "plot", "was", "really", "quite", "a", "story", "cast", "film", "it", "and"]


def _rows(n: int, rng: random.Random) -> list[tuple[str, str]]:
    rows = []
    for _ in range(n):
        y = rng.random() < 0.5
        words = rng.choices(FILLER, k=rng.randint(3, 7)) + [rng.choice(POS if y else NEG)]
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if y else "neg"))
    return rows


def write_sentiment_task(folder: Path, n_train: int = 160, n_eval: int = 40, seed: int = 0) -> Path:
    """Write train/validation/test CSVs and a card; returns the card path."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval), ("test", n_eval)):
        lines = ["text,label"] + [f"{t},{y}" for t, y in _rows(n, rng)]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    card = {
        "name": "toy-sentiment", "benchmark": "custom", "type": "classification", "text_fields": ["text"],
        "labels": ["neg", "pos"], "label_words": ["bad", "good"], "metrics": ["accuracy"],
        "main_metric": "accuracy", "size_class": "small",
        "source": {"files": {"train": "train.csv", "validation": "validation.csv", "test": "test.csv"},
                   "columns": {"text": "text", "label": "label"}},
        "description": "synthetic: the label is the polarity of the one sentiment word", "citation": "",
    }
    path = folder / "card.json"
    path.write_text(json.dumps(card))
    return path
