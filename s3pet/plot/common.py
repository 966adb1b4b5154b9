"""Shared vocabulary of the plots: roles, kinds and their codes, sort orders, number formats."""

from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

# Canonical column order of roles; roles not listed here follow, sorted by name.
ROLES = (
    "attn.q", "attn.k", "attn.v", "attn.qkv", "attn.o",
    "xattn.q", "xattn.k", "xattn.v", "xattn.o",
    "ffn.gate", "ffn.in", "ffn.out",
    "norm.attn", "norm.xattn", "norm.ffn",
    "attn.block", "xattn.block", "ffn.block",
    "norm.emb", "norm.final",
)
_STACK_ORDER = ("encoder", "decoder")

Key = tuple  # (stack, layer, role, kind)


class _Module(NamedTuple):
    stack: str
    layer: int
    role: str
    kind: str
    rank: float
    n_params: float
    site: str
    score: float | None


def _stack_sort(stacks: Iterable[str]) -> tuple[str, ...]:
    s = set(stacks)
    return tuple(x for x in _STACK_ORDER if x in s) + tuple(sorted(s - set(_STACK_ORDER)))


def _role_key(role: str):
    return (ROLES.index(role), "") if role in ROLES else (len(ROLES), role)


def _kind(name: str):
    """The registered kind of that name, or None (a structure file may name a kind this
    installation lacks). Imported here so that the plot package loads without torch."""
    from s3pet.deltas import KINDS

    return KINDS.get(name)


def _kind_key(kind: str):
    """Sort key of kinds: their declared plot order, then the name; unknown kinds last."""
    k = _kind(kind)
    return (k.order, kind) if k is not None else (float("inf"), kind)


def _infer_stack(site: str, stacks: Sequence[str]) -> str | None:
    if len(stacks) == 1:
        return stacks[0]
    parts = site.split(".")
    hits = [s for s in stacks if s in parts]
    return hits[0] if len(hits) == 1 else None


def _layer_rows(n_layers: int, observed: Iterable[int]) -> tuple[int, ...]:
    """Rows of a stack: every block 0..n-1, plus the embedding (-1) / final (n) rows if used."""
    return tuple(sorted(set(range(n_layers)) | set(observed)))


def layer_label(layer: int, n_layers: int) -> str:
    """'emb' for layer -1, 'final' for the row after the last block, else the block index."""
    if layer < 0:
        return "emb"
    if layer == n_layers:
        return "final"
    return str(layer)


def _short_model(name: str) -> str:
    parts = [p for p in str(name).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else "?"


def _pct(x: float) -> str:
    v = 100.0 * float(x)
    if v >= 10:
        return f"{v:.0f}%"
    if v >= 1:
        return f"{v:.1f}%"
    return f"{v:.2g}%"


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def kind_code(kind: str) -> str:
    """Short code of a kind written in cells ("L" in "L2+B"): the kind's own, else its first letters."""
    k = _kind(kind)
    return (k.code if k is not None else "") or kind[:3]


_code = kind_code


def ranked(kind: str) -> bool:
    """Whether the kind's rank is searched (so always written; other kinds are rank 1)."""
    k = _kind(kind)
    return bool(k is not None and k.ranked)


def _shows_rank(kind: str, rank: float) -> bool:
    """Whether a module's rank is written: always for searched ranks, else only if not 1."""
    return ranked(kind) or abs(rank - 1) > 1e-9


def _kind_entry(kind: str) -> str:
    """Legend text of a kind, e.g. 'L = lora'."""
    return f"{_code(kind)} = {kind}"
