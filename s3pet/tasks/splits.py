"""Split rules: train / validation / test from the files a card names, seeded and stable."""

from __future__ import annotations

import hashlib

from s3pet.errors import TaskError
from s3pet.tasks.cards import Example, TaskCard

#: Training examples held out as validation for large tasks (S3PET's rule).
HELDOUT_VALIDATION = 2000
DEFAULT_FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def _order(n: int, salt: str) -> list[int]:
    """A seeded permutation of range(n) that never changes across Python/NumPy versions."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}:{i}".encode()).digest())


def _pick(examples: list[Example], idx) -> list[Example]:
    return [examples[i] for i in sorted(idx)]


def _subsample(examples: list[Example], k: int, salt: str) -> list[Example]:
    return _pick(examples, _order(len(examples), salt)[:k])


def _make_splits(card: TaskCard, raw: dict, seed: int):
    """(train, validation, test, info) from the parsed files by the card's split rule."""
    src = card.source
    fixed = "split_seed" in src
    s = src["split_seed"] if fixed else seed
    salt = f"{card.name}:split:{s}"
    keys = set(raw)
    if keys == {"all"}:
        data = raw["all"]
        fr = src.get("fractions", DEFAULT_FRACTIONS)
        n_val, n_test = round(len(data) * fr["validation"]), round(len(data) * fr["test"])
        order = _order(len(data), salt)
        validation, test = _pick(data, order[:n_val]), _pick(data, order[n_val:n_val + n_test])
        train = _pick(data, order[n_val + n_test:])
        rule = (f"one file split {fr['train']:g}/{fr['validation']:g}/{fr['test']:g} "
                "into train/validation/test")
    elif "validation" in keys or keys == {"train", "dev", "test"}:
        train, test = raw["train"], raw["test"]
        validation = raw.get("validation", raw.get("dev"))
        rule = "files used as given"
    elif "dev" in keys and card.size_class == "small":
        dev = raw["dev"]
        order = _order(len(dev), salt)
        half = len(dev) // 2
        train, validation, test = raw["train"], _pick(dev, order[:half]), _pick(dev, order[half:])
        rule = "dev halved into validation and test"
    else:
        heldout = src.get("heldout", HELDOUT_VALIDATION)
        full = raw["train"]
        if len(full) <= heldout:
            raise TaskError(f"task '{card.name}': cannot hold out {heldout} validation examples "
                            f"from {len(full)} training examples (set source.heldout in the card)")
        order = _order(len(full), salt)
        validation, train = _pick(full, order[:heldout]), _pick(full, order[heldout:])
        test = raw["test"] if "test" in keys else raw["dev"]
        rule = (f"{heldout} held out from train as validation; test = official "
                f"{'test' if 'test' in keys else 'dev'}")
    for name, split in (("train", train), ("validation", validation)):
        if not split:
            raise TaskError(f"task '{card.name}': the {name} split is empty ({rule}); check the card's files "
                            f"and label rules")
    info = {"rule": rule, "split_seed": s, "seed_from": "card (fixed)" if fixed else "run seed",
            "file_sizes": {k: len(v) for k, v in raw.items()},
            "sizes": {"train": len(train), "validation": len(validation), "test": len(test)}}
    return train, validation, test, info
