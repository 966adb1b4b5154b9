"""Tokenised task splits and batches.

A split is tokenised once (lists of token ids); batches pad dynamically to their longest
member, right-padded. Multiple-choice examples become one row per (context, choice) pair.
Batch order comes from a generator seeded by (seed, epoch), so a resumed run replays the same
order as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from s3pet.tasks import Example


@dataclass
class EncodedSplit:
    features: list[list[dict]]  # per example: one dict of token lists per row (several for multiple choice)
    labels: list
    regression: bool
    n_choices: int = 0
    lengths: list[int] = field(default_factory=list)  # tokens of each example before truncation (longest row)
    max_length: int = 0  # the length it was truncated at

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def truncated(self) -> float:
        """Share of the examples cut at ``max_length``."""
        return sum(n > self.max_length for n in self.lengths) / len(self.lengths) if self.lengths else 0.0


_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def _tokenize(tokenizer, ex: Example, max_length: int | None) -> list[dict]:
    """One dict of token lists per row (several for multiple choice); no truncation for None."""
    kw = {"truncation": True, "max_length": max_length} if max_length else {"truncation": False}
    if ex.choices:
        ctx = " ".join(ex.texts)
        enc = [tokenizer(ctx, c, **kw) for c in ex.choices]
    elif len(ex.texts) == 2:
        enc = [tokenizer(ex.texts[0], ex.texts[1], **kw)]
    else:
        enc = [tokenizer(ex.texts[0], **kw)]
    return [{k: list(v) for k, v in e.items() if k in _KEYS} for e in enc]


def token_lengths(examples: list[Example], tokenizer) -> list[int]:
    """Tokens of each example without truncation (its longest row for multiple choice)."""
    return [max(len(r["input_ids"]) for r in _tokenize(tokenizer, ex, None)) for ex in examples]


def length_from_data(lengths: list[int], cap: int, quantile: float = 0.95) -> int:
    """A max length that fits ``quantile`` of the examples: that quantile of ``lengths``, rounded
    up to a multiple of 8, at most the longest example and at most ``cap`` (the model's)."""
    if not lengths:
        return cap
    ordered = sorted(lengths)
    q = ordered[min(len(ordered) - 1, max(0, math.ceil(quantile * len(ordered)) - 1))]
    return max(1, min(-(-q // 8) * 8, ordered[-1], cap))


def encode(examples: list[Example], tokenizer, max_length: int, regression: bool) -> EncodedSplit:
    """Tokenise examples (pairs as pairs; multiple choice as one pair per choice), cut at ``max_length``.

    Each example is tokenised in full first, so the split knows how long it was (``lengths``,
    ``truncated``); only the longer ones are tokenised again with truncation."""
    rows, labels, lengths, n_choices = [], [], [], 0
    for ex in examples:
        enc = _tokenize(tokenizer, ex, None)
        n = max(len(r["input_ids"]) for r in enc)
        if n > max_length:
            enc = _tokenize(tokenizer, ex, max_length)
        if ex.choices:
            n_choices = len(ex.choices)
        rows.append(enc)
        labels.append(ex.label)
        lengths.append(n)
    return EncodedSplit(rows, labels, regression, n_choices, lengths, max_length)


def collate(split: EncodedSplit, idx: list[int], pad_id: int) -> dict:
    """Pad a batch of examples into tensors (right padding)."""
    flat = [r for i in idx for r in split.features[i]]
    width = max(len(r["input_ids"]) for r in flat)
    out = {}
    for key in flat[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in flat], dtype=torch.long)
    lab = [split.labels[i] for i in idx]
    out["labels"] = torch.tensor(lab, dtype=torch.float32 if split.regression else torch.long)
    if split.n_choices:
        out["n_choices"] = split.n_choices
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches(split: EncodedSplit, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0,
            epoch: int = 0, start: int = 0, drop_last: bool = False, shard: tuple[int, int] = (0, 1)):
    """Yield padded batches; ``start`` skips this shard's first batches of the epoch (resume).

    ``shard = (rank, world)``: every rank sees the same order and takes every world-th batch
    (data parallelism); the last batches that do not fill every rank are dropped.
    """
    order = epoch_order(len(split), seed, epoch) if shuffle else list(range(len(split)))
    nb = len(order) // batch_size if drop_last else -(-len(order) // batch_size)
    rank, world = shard
    mine = list(range(rank, nb - nb % world if world > 1 else nb, world))
    for b in mine[start:]:
        yield collate(split, order[b * batch_size:(b + 1) * batch_size], pad_id)


def n_batches(n: int, batch_size: int, drop_last: bool = False, world: int = 1) -> int:
    """Batches per epoch for one rank."""
    nb = n // batch_size if drop_last else -(-n // batch_size)
    return nb // world if world > 1 else nb


def to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
