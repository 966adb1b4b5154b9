"""Metrics against values worked out by hand on small vectors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from s3pet.errors import TaskError
from s3pet.metrics import METRICS, compute_metrics
from s3pet.tasks import get_card, list_tasks

# labels [1,1,0,0,1] vs predictions [1,0,1,0,1]: TP=2 FP=1 FN=1 TN=1
# precision = recall = 2/3 -> F1 = 2/3; accuracy 3/5;
# MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3*3*2*2) = 1/6
BIN_PRED, BIN_GOLD = [1, 0, 1, 0, 1], [1, 1, 0, 0, 1]
# 3 classes, labels [0,0,1,2] vs predictions [0,1,1,2]:
# class 0: P=1, R=1/2 -> 2/3; class 1: P=1/2, R=1 -> 2/3; class 2: 1 -> macro (2/3+2/3+1)/3 = 7/9
MC_PRED, MC_GOLD = [0, 1, 1, 2], [0, 0, 1, 2]

CASES = [
    ("accuracy", [0, 1, 1, 0], [0, 1, 0, 0], 0.75),
    ("accuracy", BIN_PRED, BIN_GOLD, 3 / 5),
    ("f1", BIN_PRED, BIN_GOLD, 2 / 3),
    ("mcc", BIN_PRED, BIN_GOLD, 1 / 6),
    ("mcc", [0, 1, 0, 1], [0, 1, 0, 1], 1.0),
    ("mcc", [1, 0, 1, 0], [0, 1, 0, 1], -1.0),
    ("f1_macro", MC_PRED, MC_GOLD, 7 / 9),
    ("accuracy", MC_PRED, MC_GOLD, 3 / 4),
    ("pearson", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], 1.0),
    ("pearson", [1.0, 2.0, 3.0], [3.0, 2.0, 1.0], -1.0),
    # x=[1,2,3,4], y=[1,3,2,4]: deviations (-1.5,-.5,.5,1.5) and (-1.5,.5,-.5,1.5): 4 / sqrt(5*5) = 0.8
    ("pearson", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], 0.8),
    ("spearman", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0], 0.8),
    ("spearman", [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0], 1.0),  # monotone, not linear
    # degenerate inputs: 0.0, never NaN
    ("pearson", [2.5, 2.5, 2.5], [1.0, 2.0, 3.0], 0.0),
    ("spearman", [1.0, 2.0, 3.0], [4.0, 4.0, 4.0], 0.0),
    ("pearson", [1.0], [2.0], 0.0),
    ("mcc", [1, 1, 1, 1], [0, 1, 0, 1], 0.0),
    ("f1", [0, 0, 0], [0, 0, 0], 0.0),
]


@pytest.mark.parametrize("name, pred, gold, expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_metric_values(name, pred, gold, expected):
    out = compute_metrics([name], pred, gold)
    assert out[name] == pytest.approx(expected, abs=1e-12)
    assert out["main"] == out[name] and not math.isnan(out[name])


def test_card_main_metric_is_the_mean_of_two():
    mrpc = compute_metrics(get_card("mrpc"), BIN_PRED, BIN_GOLD)
    assert mrpc == pytest.approx({"accuracy": 0.6, "f1": 2 / 3, "main": (0.6 + 2 / 3) / 2})
    stsb = compute_metrics(get_card("stsb"), [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert stsb == pytest.approx({"pearson": 0.8, "spearman": 0.8, "main": 0.8})
    cb = compute_metrics(get_card("cb"), MC_PRED, MC_GOLD)
    assert cb["main"] == pytest.approx((3 / 4 + 7 / 9) / 2)
    cola = compute_metrics(get_card("cola"), BIN_PRED, BIN_GOLD)
    assert cola == pytest.approx({"mcc": 1 / 6, "main": 1 / 6})


def test_names_and_overrides():
    out = compute_metrics(["f1", "accuracy"], BIN_PRED, BIN_GOLD)
    assert out["main"] == pytest.approx(2 / 3)  # the first name
    out = compute_metrics(["f1", "accuracy"], BIN_PRED, BIN_GOLD, main="mean")
    assert out["main"] == pytest.approx((2 / 3 + 0.6) / 2)
    assert compute_metrics("accuracy", [1, 1], [1, 0]) == {"accuracy": 0.5, "main": 0.5}


def test_input_forms():
    logits = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert compute_metrics("accuracy", logits, [0, 1, 1])["accuracy"] == pytest.approx(2 / 3)
    assert compute_metrics("accuracy", np.array([1.0, 0.0]), np.array([1, 0]))["accuracy"] == 1.0
    assert compute_metrics("accuracy", [True, False], [1, 0])["accuracy"] == 1.0


@pytest.mark.parametrize("args, message", [
    ((["bleu"], [1], [1]), "unknown metric"),
    ((["accuracy"], [1, 0], [1]), "2 predictions but 1 labels"),
    ((["accuracy"], [], []), "no examples"),
    ((["accuracy"], [0, 1], [0, -1]), "unlabelled"),
    ((["accuracy"], [0.5, 1.0], [0, 1]), "class indices"),
    ((["accuracy"], [0], [0], "f1"), "main metric 'f1'"),
    ((object(), [0], [0]), "expected a task card"),
])
def test_errors(args, message):
    *args, main = args if len(args) == 4 else (*args, None)
    with pytest.raises(TaskError, match=message):
        compute_metrics(*args, main=main)


def test_every_card_scores_perfect_predictions():
    for card in list_tasks():
        assert set(card.metrics) <= set(METRICS)
        gold = [0.5, 1.5, 3.0, 4.5] if card.is_regression else [i % card.num_labels for i in range(6)]
        out = compute_metrics(card, gold, gold)
        assert out["main"] == pytest.approx(1.0), card.name
