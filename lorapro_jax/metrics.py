"""Task metrics of the GLUE / GSM8K protocols, in float64 numpy on host arrays.

* accuracy = mean(pred == label)
* F1 (binary, positive class 1) = 2·TP / (2·TP + FP + FN); ``f1_macro`` averages it over classes
* Matthews correlation (CoLA), multi-class form of Gorodkin (2004) from the confusion matrix C:
  ``MCC = (c·s − Σ_k p_k·t_k) / sqrt((s² − Σ_k p_k²)·(s² − Σ_k t_k²))`` with c = trace(C),
  s = N, p_k predicted and t_k true counts of class k; 0 when a denominator vanishes
* Pearson r (STS-B) and Spearman ρ = Pearson r of the ranks (ties get their average rank)
* exact match (GSM8K, text-to-text) = mean(normalise(pred) == normalise(ref))

Every metric takes an optional ``mask`` (1 for real rows, 0 for the padding rows of the last eval
batch) so padded batches can be scored without slicing.

>>> round(accuracy([1, 0, 1], [1, 1, 1]), 4)
0.6667
>>> round(matthews_corrcoef([1, 0, 1, 0], [1, 0, 0, 0]), 4)     # 1/sqrt(3)
0.5774
>>> accuracy([1, 0, 0], [1, 0, 1], mask=[1, 1, 0])                 # the padding row is ignored
1.0
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _select(mask: Any, *arrays: Any) -> list[np.ndarray]:
  arrays = [np.asarray(a) for a in arrays]
  shapes = {a.shape[:1] for a in arrays}
  if len(shapes) != 1:
    raise ValueError(f"predictions and labels must have the same length, got {[a.shape for a in arrays]}")
  if mask is None:
    return arrays
  keep = np.asarray(mask).astype(bool)
  if keep.shape != arrays[0].shape[:1]:
    raise ValueError(f"mask shape {keep.shape} does not match {arrays[0].shape[:1]}")
  return [a[keep] for a in arrays]


def accuracy(predictions: Any, labels: Any, mask: Any = None) -> float:
  predictions, labels = _select(mask, predictions, labels)
  return float(np.mean(predictions == labels)) if len(labels) else 0.0


def majority_baseline(train_labels: Any, test_labels: Any) -> float:
  """Accuracy on ``test_labels`` of always answering the most frequent class of ``train_labels``
  (ties: the smaller class id), the floor a classifier must beat.

  >>> majority_baseline([0, 1, 1], [1, 0, 1, 1])
  0.75
  """
  majority = np.argmax(np.bincount(np.asarray(train_labels)))
  return float(np.mean(np.asarray(test_labels) == majority))


def f1_binary(predictions: Any, labels: Any, mask: Any = None, positive: int = 1) -> float:
  predictions, labels = _select(mask, predictions, labels)
  tp = np.sum((predictions == positive) & (labels == positive), dtype=np.float64)
  fp = np.sum((predictions == positive) & (labels != positive), dtype=np.float64)
  fn = np.sum((predictions != positive) & (labels == positive), dtype=np.float64)
  denominator = 2 * tp + fp + fn
  return float(2 * tp / denominator) if denominator else 0.0


def f1_macro(predictions: Any, labels: Any, mask: Any = None) -> float:
  predictions, labels = _select(mask, predictions, labels)
  classes = np.union1d(np.unique(predictions), np.unique(labels))
  return float(np.mean([f1_binary(predictions, labels, positive=c) for c in classes]))


def matthews_corrcoef(predictions: Any, labels: Any, mask: Any = None) -> float:
  predictions, labels = _select(mask, predictions, labels)
  classes, encoded = np.unique(np.concatenate([predictions, labels]), return_inverse=True)
  k, n = len(classes), len(labels)
  confusion = np.zeros((k, k), np.float64)
  np.add.at(confusion, (encoded[n:], encoded[:n]), 1.0)  # rows: true, columns: predicted
  true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
  correct, total = np.trace(confusion), confusion.sum()
  covariance = correct * total - predicted_counts @ true_counts
  variance_p = total ** 2 - predicted_counts @ predicted_counts
  variance_t = total ** 2 - true_counts @ true_counts
  if variance_p == 0 or variance_t == 0:
    return 0.0
  return float(covariance / np.sqrt(variance_p * variance_t))


def pearson(predictions: Any, labels: Any, mask: Any = None) -> float:
  predictions, labels = _select(mask, predictions, labels)
  x = predictions.astype(np.float64) - np.mean(predictions, dtype=np.float64)
  y = labels.astype(np.float64) - np.mean(labels, dtype=np.float64)
  denominator = np.sqrt((x @ x) * (y @ y))
  return float(x @ y / denominator) if denominator else 0.0


def average_ranks(values: Any) -> np.ndarray:
  """Ranks 1..N, ties sharing the mean of the ranks they span (float64)."""
  values = np.asarray(values)
  order = np.argsort(values, kind="stable")
  sorted_values = values[order]
  boundaries = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1], True])
  ranks = np.empty(len(values), np.float64)
  for start, stop in zip(boundaries[:-1], boundaries[1:]):
    ranks[order[start:stop]] = (start + stop + 1) / 2.0
  return ranks


def spearman(predictions: Any, labels: Any, mask: Any = None) -> float:
  predictions, labels = _select(mask, predictions, labels)
  return pearson(average_ranks(predictions), average_ranks(labels))


def normalize_answer(text: str) -> str:
  """Lower case, no surrounding space, inner runs of spaces collapsed, trailing period dropped,
  thousands separators removed from numbers ("1,000" -> "1000")."""
  text = re.sub(r"(?<=\d),(?=\d{3})", "", str(text).strip().lower())
  return re.sub(r"\s+", " ", text).rstrip(".").strip()


def exact_match(predictions: Sequence[str], references: Sequence[str], mask: Any = None) -> float:
  predictions, references = _select(mask, np.asarray(predictions, object),
                                    np.asarray(references, object))
  if not len(references):
    return 0.0
  return float(np.mean([normalize_answer(p) == normalize_answer(r)
                        for p, r in zip(predictions, references)]))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1_binary, "f1_macro": f1_macro, "mcc": matthews_corrcoef,
    "pearson": pearson, "spearman": spearman, "exact_match": exact_match,
}


def compute_metrics(names: Sequence[str], predictions: Any, labels: Any,
                    mask: Any = None) -> dict[str, float]:
  """``{name: metric(predictions, labels, mask)}`` for the named metrics of :data:`METRICS`."""
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metric(s) {unknown}; expected names from {sorted(METRICS)}")
  return {name: METRICS[name](predictions, labels, mask) for name in names}
