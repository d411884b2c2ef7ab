"""Tests for transformer_jax.metrics against hand-checked tiny examples and the libraries."""

import math
import os
import pathlib
import random

import pytest
from sklearn import metrics as sk_metrics

from transformer_jax import metrics
from transformer_jax import readers

GERMEVAL = os.path.join(os.environ.get(
    "TRANSFORMER_JAX_SHARED_DATA",
    str(pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data")),
    "germeval2014")


# classification_report.


def test_classification_hand_checked():
  # Class a: 2 gold, predicted 1 right, 1 wrong; class b: 1 gold, 1 right; c: never occurs.
  scalars, text = metrics.classification_report([0, 0, 1], [0, 1, 1], ["a", "b", "c"])
  assert scalars["accuracy"] == pytest.approx(2 / 3)
  assert scalars["micro_f1"] == pytest.approx(2 / 3)
  # F1: a = 2*1*0.5/1.5 = 2/3, b = 2*0.5*1/1.5 = 2/3, c = 0 (zero_division=0).
  assert scalars["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
  assert all(isinstance(v, float) for v in scalars.values())
  lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
  assert lines["a"] == ["1.0000", "0.5000", "0.6667", "2"]
  assert lines["b"] == ["0.5000", "1.0000", "0.6667", "1"]
  assert lines["c"] == ["0.0000", "0.0000", "0.0000", "0"]
  assert "precision" in text and "recall" in text and "f1-score" in text


def test_classification_matches_sklearn_on_random_example():
  rng = random.Random(0)
  y_true = [rng.randrange(4) for _ in range(200)]
  y_pred = [y if rng.random() < 0.6 else rng.randrange(4) for y in y_true]
  names = ["w", "x", "y", "z"]
  scalars, text = metrics.classification_report(y_true, y_pred, names)
  assert scalars == {
      "accuracy": sk_metrics.accuracy_score(y_true, y_pred),
      "macro_f1": sk_metrics.f1_score(y_true, y_pred, average="macro"),
      "micro_f1": sk_metrics.f1_score(y_true, y_pred, average="micro"),
  }
  assert 0.5 < scalars["accuracy"] < 0.9
  assert text == sk_metrics.classification_report(y_true, y_pred, target_names=names, digits=4)


def test_classification_errors():
  with pytest.raises(ValueError, match="y_true has 2 items, y_pred 1"):
    metrics.classification_report([0, 1], [0], ["a", "b"])
  with pytest.raises(ValueError, match="no examples"):
    metrics.classification_report([], [], ["a", "b"])


# regression_report.


def test_regression_hand_checked():
  scalars, text = metrics.regression_report([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 7.0])
  assert scalars["mse"] == pytest.approx((1 + 4 + 9 + 9) / 4)
  assert scalars["spearman"] == pytest.approx(1.0)  # Same order.
  # Pearson by hand: x - 2.5 = (-1.5, -.5, .5, 1.5), y - 4.75 = (-2.75, -.75, 1.25, 2.25).
  sxy = 1.5 * 2.75 + 0.5 * 0.75 + 0.5 * 1.25 + 1.5 * 2.25
  sxx, syy = 5.0, 2.75**2 + 0.75**2 + 1.25**2 + 2.25**2
  assert scalars["pearson"] == pytest.approx(sxy / math.sqrt(sxx * syy))
  assert "mse=5.7500" in text and "n=4" in text


def test_regression_constant_or_single_input_gives_zero_correlation(recwarn):
  for y_true, y_pred in (([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]), ([2.0, 2.0], [1.0, 3.0]),
                         ([1.0], [2.0])):
    scalars, _ = metrics.regression_report(y_true, y_pred)
    assert scalars["pearson"] == scalars["spearman"] == 0.0
    assert all(isinstance(v, float) and not math.isnan(v) for v in scalars.values())
  assert not recwarn.list
  with pytest.raises(ValueError, match="y_true has 1 items, y_pred 2"):
    metrics.regression_report([1.0], [1.0, 2.0])


# entity_report.


def test_entity_report_wrong_boundary():
  # Two gold PER entities; the first is predicted one token short, the second exactly.
  true = [["B-PER", "I-PER", "O", "B-PER"]]
  pred = [["B-PER", "O", "O", "B-PER"]]
  scalars, text = metrics.entity_report(true, pred)
  assert scalars == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "token_accuracy": 0.75}
  per = next(line.split() for line in text.splitlines() if line.strip().startswith("PER"))
  assert per == ["PER", "0.5000", "0.5000", "0.5000", "2"]


def test_entity_report_counts_types_and_misses():
  true = [["B-LOC", "O", "B-ORG", "I-ORG"], ["O", "B-PER"]]
  pred = [["B-LOC", "O", "B-PER", "I-PER"], ["O", "O"]]
  scalars, text = metrics.entity_report(true, pred)
  # Gold: LOC, ORG, PER; predicted: LOC (right), PER (wrong type) -> P = 1/2, R = 1/3.
  assert scalars["precision"] == pytest.approx(0.5)
  assert scalars["recall"] == pytest.approx(1 / 3)
  assert scalars["f1"] == pytest.approx(2 * 0.5 / 3 / (0.5 + 1 / 3))
  assert scalars["token_accuracy"] == pytest.approx(3 / 6)
  assert {line.split()[0] for line in text.splitlines()[2:5]} == {"LOC", "ORG", "PER"}


def test_entity_report_is_strict_iob2():
  # The prediction starts the entity with I-PER: seqeval's default (conlleval) mode accepts
  # it as PER[0:2]; strict IOB2 does not count it as an entity at all.
  from seqeval import metrics as seqeval_metrics  # pylint: disable=g-import-not-at-top
  true, pred = [["B-PER", "I-PER", "O"]], [["I-PER", "I-PER", "O"]]
  assert seqeval_metrics.f1_score(true, pred) == 1.0
  scalars, _ = metrics.entity_report(true, pred)
  assert scalars == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "token_accuracy": 2 / 3}


def test_entity_report_without_entities():
  scalars, text = metrics.entity_report([["O", "O"]], [["O", "O"]])
  assert scalars == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "token_accuracy": 1.0}
  assert text == "no entities in true_tags or pred_tags\n"


def test_entity_report_shape_errors():
  with pytest.raises(ValueError, match="true_tags has 2 sentences, pred_tags 1"):
    metrics.entity_report([["O"], ["O"]], [["O"]])
  with pytest.raises(ValueError, match="sentence 1: true_tags has 2 tags, pred_tags 1"):
    metrics.entity_report([["O"], ["O", "B-PER"]], [["O"], ["O"]])
  with pytest.raises(ValueError, match="true_tags: sentence 0, token 1: 'PER' is not an IOB2"):
    metrics.entity_report([["O", "PER"]], [["O", "O"]])
  with pytest.raises(ValueError, match="pred_tags: sentence 1, token 0: 'E-X' is not an IOB2"):
    metrics.entity_report([["O"], ["O"]], [["O"], ["E-X"]])


def test_entity_report_on_real_germeval_validation():
  words, tags, _ = readers.read_conll(
      os.path.join(GERMEVAL, "validation.conll.gz"), 1, readers.GERMEVAL_LABELS)
  gold = [[readers.GERMEVAL_LABELS[i] for i in s] for s in tags]
  scalars, text = metrics.entity_report(gold, gold)
  assert scalars == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "token_accuracy": 1.0}
  micro = next(line.split() for line in text.splitlines() if "micro avg" in line)
  assert micro[-1] == "2674"  # Outer entities in the data README.
  # Predicting only 'O' everywhere: no entity found, token accuracy = share of 'O' tokens.
  all_o = [["O"] * len(s) for s in words]
  scalars, _ = metrics.entity_report(gold, all_o)
  n_o = sum(t == "O" for s in gold for t in s)
  assert (scalars["precision"], scalars["recall"], scalars["f1"]) == (0.0, 0.0, 0.0)
  assert scalars["token_accuracy"] == pytest.approx(n_o / 41_653)
