"""Evaluation reports for classification, regression and sequence tagging.

Thin wrappers around well-kept libraries, so the numbers match what papers report:
scikit-learn (Pedregosa et al., 2011) for classification and MSE, SciPy for correlations, and
seqeval (Nakayama, 2018) for entity-level scores, which in strict IOB2 mode count an entity
only when its type and both boundaries match, as the CoNLL and GermEval shared tasks do.
Each function returns (scalars, text): a dict of Python floats and a printable report.
"""

import math
import warnings

from scipy import stats as scipy_stats
from seqeval import metrics as seqeval_metrics
from seqeval.scheme import IOB2, Entities
from sklearn import metrics as sk_metrics


def _check_pairs(y_true: list, y_pred: list) -> None:
  if len(y_true) != len(y_pred):
    raise ValueError(f"y_true has {len(y_true)} items, y_pred {len(y_pred)}")
  if not y_true:
    raise ValueError("no examples (y_true is empty)")


def classification_report(
    y_true: list[int], y_pred: list[int], label_names: list[str]
) -> tuple[dict, str]:
  """Accuracy, macro and micro F1, and a per-class report, from scikit-learn.

  F1 averages run over all `len(label_names)` classes, so a class that never occurs in
  `y_true` or `y_pred` counts with F1 0 in the macro average.

  Args:
    y_true: gold class indices in [0, len(label_names)).
    y_pred: predicted class indices, same length.
    label_names: class names, indexed by class.

  Returns:
    ({'accuracy', 'macro_f1', 'micro_f1'} as floats in [0, 1], the text of
    `sklearn.metrics.classification_report` with precision, recall, F1 and support per class,
    4 digits).

  Raises:
    ValueError: the lists are empty or differ in length.
  """
  _check_pairs(y_true, y_pred)
  labels = list(range(len(label_names)))
  scalars = {
      "accuracy": float(sk_metrics.accuracy_score(y_true, y_pred)),
      "macro_f1": float(sk_metrics.f1_score(
          y_true, y_pred, labels=labels, average="macro", zero_division=0)),
      "micro_f1": float(sk_metrics.f1_score(
          y_true, y_pred, labels=labels, average="micro", zero_division=0)),
  }
  text = sk_metrics.classification_report(
      y_true, y_pred, labels=labels, target_names=list(label_names), digits=4,
      zero_division=0)
  return scalars, text


def _correlation(fn, x: list[float], y: list[float]) -> float:
  """fn(x, y).statistic, or 0.0 where it is undefined (constant input, fewer than 2 items)."""
  if len(x) < 2:
    return 0.0
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # scipy's ConstantInputWarning; we return 0.0 instead.
    value = float(fn(x, y).statistic)
  return 0.0 if math.isnan(value) else value


def regression_report(y_true: list[float], y_pred: list[float]) -> tuple[dict, str]:
  """Mean squared error (scikit-learn) and Pearson and Spearman correlations (SciPy).

  Args:
    y_true: gold values.
    y_pred: predicted values, same length.

  Returns:
    ({'mse', 'pearson', 'spearman'} as floats, a one-line text). A correlation that is
    undefined (either list constant, or a single example) is reported as 0.0.

  Raises:
    ValueError: the lists are empty or differ in length.
  """
  _check_pairs(y_true, y_pred)
  y_true, y_pred = [float(v) for v in y_true], [float(v) for v in y_pred]
  scalars = {
      "mse": float(sk_metrics.mean_squared_error(y_true, y_pred)),
      "pearson": _correlation(scipy_stats.pearsonr, y_true, y_pred),
      "spearman": _correlation(scipy_stats.spearmanr, y_true, y_pred),
  }
  text = (f"n={len(y_true)}  mse={scalars['mse']:.4f}  pearson={scalars['pearson']:.4f}  "
          f"spearman={scalars['spearman']:.4f}")
  return scalars, text


def entity_report(
    true_tags: list[list[str]], pred_tags: list[list[str]]
) -> tuple[dict, str]:
  """Entity-level precision, recall and F1 (seqeval, strict IOB2) and token accuracy.

  Strict mode counts an entity only if it is well-formed IOB2 (starts with B-) and matches a
  gold entity in type, start and end; an `I-X` that starts a predicted entity is not counted,
  unlike seqeval's default (conlleval-compatible) mode.

  Args:
    true_tags: gold IOB2 tag strings per sentence.
    pred_tags: predicted tag strings per sentence, same shape.

  Returns:
    ({'precision', 'recall', 'f1'} micro-averaged over entities and 'token_accuracy', as
    floats; 0.0 where undefined), and seqeval's classification report text (4 digits; a
    one-line note instead when neither side has an entity).

  Raises:
    ValueError: the lists differ in sentence count or in any sentence's length (the first such
      sentence is named), or a tag is not 'O', 'B-X' or 'I-X' (sentence and token named).
  """
  if len(true_tags) != len(pred_tags):
    raise ValueError(f"true_tags has {len(true_tags)} sentences, pred_tags {len(pred_tags)}")
  for i, (t, p) in enumerate(zip(true_tags, pred_tags)):
    if len(t) != len(p):
      raise ValueError(f"sentence {i}: true_tags has {len(t)} tags, pred_tags {len(p)}")
    for name, sentence in (("true_tags", t), ("pred_tags", p)):
      for j, tag in enumerate(sentence):
        if tag != "O" and (tag[:2] not in ("B-", "I-") or len(tag) < 3):
          raise ValueError(f"{name}: sentence {i}, token {j}: {tag!r} is not an IOB2 tag "
                           "(O, B-X or I-X)")
  true_tags, pred_tags = [list(s) for s in true_tags], [list(s) for s in pred_tags]
  strict = dict(mode="strict", scheme=IOB2, zero_division=0)
  scalars = {
      "precision": float(seqeval_metrics.precision_score(true_tags, pred_tags, **strict)),
      "recall": float(seqeval_metrics.recall_score(true_tags, pred_tags, **strict)),
      "f1": float(seqeval_metrics.f1_score(true_tags, pred_tags, **strict)),
      "token_accuracy": (float(seqeval_metrics.accuracy_score(true_tags, pred_tags))
                         if any(true_tags) else 0.0),
  }
  if Entities(true_tags, IOB2).unique_tags | Entities(pred_tags, IOB2).unique_tags:
    text = seqeval_metrics.classification_report(true_tags, pred_tags, digits=4, **strict)
  else:  # seqeval 1.2.2's report fails (max() of an empty sequence) without any entity.
    text = "no entities in true_tags or pred_tags\n"
  return scalars, text
