"""Task metrics: one function per metric name, and ``compute_metrics`` for a whole card.

Metric names (the ones task cards may list):

- ``accuracy``: fraction of exact matches (classification and multiple choice).
- ``f1``: binary F1 of class 1 (the positive class; MRPC, QQP, MultiRC's F1a).
- ``f1_macro``: unweighted mean of per-class F1 (CB).
- ``mcc``: Matthews correlation coefficient (CoLA).
- ``pearson`` / ``spearman``: correlation of regression scores (STS-B).

Degenerate inputs never give NaN: a correlation where the predictions or the labels are
constant (or fewer than two examples) is defined as 0.0, F1 with no predicted or true
positive is 0.0, and MCC with a constant prediction is 0.0 (scikit-learn's convention).
All metrics are fractions in [0, 1] (correlations in [-1, 1]), not percentages.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from s3pet.errors import TaskError

METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {}
#: ``main_metric`` value meaning "the mean of every metric the card lists".
MEAN = "mean"
_REGRESSION = {"pearson", "spearman"}


def _metric(name: str):
    """Register ``fn(predictions, labels) -> float`` under ``name``."""

    def register(fn):
        METRICS[name] = fn
        return fn

    return register


@_metric("accuracy")
def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(labels, predictions))


@_metric("f1")
def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predictions, average="binary", pos_label=1, zero_division=0.0))


@_metric("f1_macro")
def f1_macro(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    # Average over the classes present in either vector, as scikit-learn does.
    return float(f1_score(labels, predictions, average="macro", zero_division=0.0))


@_metric("mcc")
def mcc(predictions: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        # A constant prediction makes the denominator 0; scikit-learn returns 0.0 and warns.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(matthews_corrcoef(labels, predictions))


def _constant(x: np.ndarray) -> bool:
    return x.size < 2 or bool(np.all(x == x[0]))


@_metric("pearson")
def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import pearsonr

    if _constant(predictions) or _constant(labels):
        return 0.0  # undefined correlation; 0.0 instead of NaN so that model selection works
    return float(pearsonr(predictions, labels)[0])


@_metric("spearman")
def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if _constant(predictions) or _constant(labels):
        return 0.0
    return float(spearmanr(predictions, labels)[0])


def compute_metrics(card_or_metric_names: Any, predictions: Sequence, labels: Sequence, *,
                    main: str | None = None) -> dict[str, float]:
    """Score predictions against labels with every metric of a task card.

    Args:
        card_or_metric_names: a ``TaskCard`` (anything with ``metrics`` and ``main_metric``),
            a list of metric names, or one metric name.
        predictions: class indices (or choice indices), floats for regression; a 2-D array of
            scores per class is reduced with argmax.
        labels: gold class indices or floats, same length.
        main: overrides the main metric: a metric name or ``"mean"``. Default: the card's
            ``main_metric``; for a list of names, the first name.

    Returns:
        ``{name: value}`` for every metric, plus ``"main"``: the main metric, or the mean of
        all listed metrics when the main metric is ``"mean"`` (e.g. MRPC accuracy and F1).

    Raises:
        TaskError: unknown metric, mismatched lengths, no examples, or unlabelled (-1) labels.
    """
    names, default_main = _names(card_or_metric_names)
    main = main or default_main
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise TaskError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)}")
    if main != MEAN and main not in names:
        raise TaskError(f"main metric '{main}' is neither one of {names} nor '{MEAN}'")

    regression = bool(set(names) & _REGRESSION)
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.ndim == 2 and not regression:
        preds = preds.argmax(axis=-1)
    preds = preds.reshape(-1)
    gold = gold.reshape(-1)
    if preds.shape != gold.shape:
        raise TaskError(f"{preds.size} predictions but {gold.size} labels")
    if gold.size == 0:
        raise TaskError("no examples to score")
    if regression:
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
    else:
        preds, gold = _as_indices(preds, "predictions"), _as_indices(gold, "labels")
        if np.any(gold < 0):
            raise TaskError("labels contain -1 (unlabelled examples cannot be scored)")

    out = {name: METRICS[name](preds, gold) for name in names}
    out["main"] = float(np.mean([out[n] for n in names])) if main == MEAN else out[main]
    return out


def _names(spec: Any) -> tuple[list[str], str]:
    if isinstance(spec, str):
        return [spec], spec
    if hasattr(spec, "metrics") and hasattr(spec, "main_metric"):
        return list(spec.metrics), spec.main_metric
    names = list(spec) if isinstance(spec, (list, tuple)) else []
    if not names or not all(isinstance(n, str) for n in names):
        raise TaskError(f"expected a task card or metric names, got {spec!r}")
    return names, names[0]


def _as_indices(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype.kind in "iub":
        return x.astype(np.int64)
    if x.dtype.kind == "f" and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
        return x.astype(np.int64)
    raise TaskError(f"{what} must be class indices (integers), got dtype {x.dtype}")
