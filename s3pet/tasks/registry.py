"""The shipped task cards (``tasks/*.json``, installed as ``s3pet.task_cards``) and lookup by name."""

from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path

from s3pet.errors import ConfigError, TaskError
from s3pet.tasks.cards import BENCHMARKS, TaskCard, _card_from_dict


def list_tasks() -> list[TaskCard]:
    """Every shipped task card, GLUE first, then SuperGLUE, then the PyPI tasks."""
    order = {b: i for i, b in enumerate(BENCHMARKS)}
    return sorted(_registry().values(), key=lambda c: (order[c.benchmark], c.name))


def get_card(name_or_path: str | os.PathLike) -> TaskCard:
    """A shipped card by name (``rte``, ``SST-2`` and ``sst2`` alike), or a user card JSON path.

    Raises:
        TaskError: unknown name or unreadable file. ConfigError: an invalid card.
    """
    if isinstance(name_or_path, TaskCard):
        return name_or_path
    text = os.fspath(name_or_path)
    path = Path(text)
    if text.endswith(".json") or path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise TaskError(f"task card {path} does not exist") from e
        except (OSError, ValueError) as e:
            raise TaskError(f"task card {path} cannot be read: {e}") from e
        return _card_from_dict(raw, str(path), path=str(path.resolve()))
    cards = _registry()
    key = _norm(text)
    for card in cards.values():
        if _norm(card.name) == key:
            return card
    raise TaskError(f"unknown task '{text}'; known: {', '.join(sorted(cards))} "
                    "(or pass the path of a task card JSON)")


def _norm(name: str) -> str:
    return re.sub(r"[-_ ]", "", name.lower())


_CARDS: dict[str, TaskCard] = {}


def _registry() -> dict[str, TaskCard]:
    if not _CARDS:
        for entry in resources.files("s3pet.task_cards").iterdir():
            if entry.name.endswith(".json"):
                card = _card_from_dict(json.loads(entry.read_text(encoding="utf-8")),
                                       f"s3pet.task_cards/{entry.name}")
                if card.name in _CARDS:
                    raise ConfigError(f"two shipped task cards are named '{card.name}'")
                _CARDS[card.name] = card
    return _CARDS
