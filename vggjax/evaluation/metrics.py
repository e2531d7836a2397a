"""Scores of class posteriors (host side): top-k errors, the fusion of several models' posteriors, and the
scores of the transfer protocol (Appendix B): confusion matrix, mean class recall, VOC average precision."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AP_MODES = ('voc12', 'voc07', 'none')


def topk_hits(posteriors: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Whether each label is among the k highest posteriors. Classes are ranked by decreasing posterior, ties
  by increasing class index (as jax.lax.top_k, which validation during training uses)."""
  posteriors = np.asarray(posteriors)
  labels = np.asarray(labels, np.int64)
  if len(labels) == 0:
    return np.zeros((0,), bool)
  true = posteriors[np.arange(len(labels)), labels][:, None]
  before = np.arange(posteriors.shape[1])[None, :] < labels[:, None]
  rank = np.sum(posteriors > true, axis=1) + np.sum((posteriors == true) & before, axis=1)
  return rank < k


def topk_error(posteriors: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The fraction of images whose label is not among the k highest posteriors."""
  hits = topk_hits(posteriors, labels, k)
  return float(1.0 - hits.mean()) if len(hits) else float('nan')


def fuse(posteriors: Sequence[np.ndarray]) -> np.ndarray:
  """Fusion of several models (4.4): the average of their softmax posteriors."""
  if not posteriors:
    raise ValueError('fusion needs at least one model')
  return np.mean(np.stack([np.asarray(p, np.float32) for p in posteriors]), axis=0)


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
  """(num_classes, num_classes) counts: row = true class, column = predicted class."""
  y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
  m = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(m, (y_true, y_pred), 1)
  return m


def mean_class_recall(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
  """The mean over the classes present in y_true of the fraction of their images predicted correctly (the
  Caltech protocol's measure; scikit-learn's balanced accuracy)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if not len(y_true):
    raise ValueError('mean class recall of no images')
  classes = np.unique(y_true)
  return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def average_precision(scores: Sequence[float], targets: Sequence[bool], mode: str = 'voc12') -> float:
  """The average precision of one class: images ranked by decreasing score, targets True for positives.

  mode 'voc12' (VOC 2010-2012): the area under the precision-recall curve with precision made monotone
  (the best precision at any higher recall); 'voc07': the mean of that precision at recall 0, 0.1, ..., 1
  (the 11-point AP of VOC 2007); 'none': sum over positives' ranks of (recall step) x precision, without
  interpolation (scikit-learn's average_precision_score). Tied scores are one threshold (as scikit-learn).
  """
  if mode not in AP_MODES:
    raise ValueError(f'unknown AP mode {mode!r}; valid: {", ".join(AP_MODES)}')
  scores, targets = np.asarray(scores, np.float64), np.asarray(targets, bool)
  if scores.shape != targets.shape or scores.ndim != 1:
    raise ValueError(f'scores {scores.shape} and targets {targets.shape} must be equal 1-D shapes')
  positives = int(targets.sum())
  if positives == 0:
    return float('nan')
  order = np.argsort(-scores, kind='stable')
  s, t = scores[order], targets[order]
  tp, fp = np.cumsum(t), np.cumsum(~t)
  last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last image of each tied group
  recall = tp[last] / positives
  precision = tp[last] / (tp[last] + fp[last])
  if mode == 'none':
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
  best = np.maximum.accumulate(precision[::-1])[::-1]  # the best precision at this or any higher recall
  if mode == 'voc07':
    return float(np.mean([best[recall >= r].max() if np.any(recall >= r) else 0.0
                          for r in np.linspace(0, 1, 11)]))
  return float(np.sum(np.diff(np.r_[0.0, recall]) * best))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray, mode: str = 'voc12'
                           ) -> tuple[float, np.ndarray]:
  """(mAP, per-class APs) for scores and binary targets (N, C); classes with no positive are left out of the
  mean (their AP is NaN)."""
  scores, targets = np.asarray(scores), np.asarray(targets, bool)
  if scores.shape != targets.shape or scores.ndim != 2:
    raise ValueError(f'scores {scores.shape} and targets {targets.shape} must be equal (N, C) shapes')
  aps = np.array([average_precision(scores[:, c], targets[:, c], mode) for c in range(scores.shape[1])])
  if np.all(np.isnan(aps)):
    raise ValueError('no class has a positive image: mAP is undefined')
  return float(np.nanmean(aps)), aps


def one_hot(labels: Sequence[int], num_classes: int) -> np.ndarray:
  labels = np.asarray(labels, np.int64)
  out = np.zeros((len(labels), num_classes), bool)
  out[np.arange(len(labels)), labels] = True
  return out
