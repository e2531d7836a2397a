"""The linear probe of the paper's Appendix B: fixed descriptors, one-vs-rest linear SVMs, random splits.

* ``class_splits``: the Caltech protocol's random splits, N training images per class and up to M test
  images per class from the rest;
* ``fit_svm``: one-vs-rest linear SVMs (scikit-learn's LinearSVC) with C chosen by cross-validation on the
  training images (mean class recall for single-label data, mAP for multi-label targets);
* ``run_protocol``: train and test on each split, the metrics of ``vggjax.evaluation.metrics`` per split and
  their mean and standard deviation over splits; ``plot_confusion``: the first split's confusion matrix.

``vggjax.transfer`` is the command that runs it on the descriptors of ``vggjax.descriptors``.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time
from typing import Any, Callable, Sequence

import numpy as np
from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.svm import LinearSVC

from vggjax.evaluation.metrics import confusion_matrix, mean_average_precision, mean_class_recall, one_hot

log = logging.getLogger('vggjax')

DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)


def class_splits(labels: Sequence[int], train_per_class: int, test_per_class: int = 0, num_splits: int = 3,
                 seed: int = 0, class_names: Sequence[str] | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
  """num_splits random (train, test) index pairs: train_per_class images of each class for training, and up
  to test_per_class (0: all) of the rest for testing. Every class needs more than train_per_class images."""
  labels = np.asarray(labels, np.int64)
  if train_per_class < 1:
    raise ValueError(f'train_per_class must be at least 1, got {train_per_class}')
  classes, counts = np.unique(labels, return_counts=True)
  short = [(class_names[c] if class_names else str(c), int(n)) for c, n in zip(classes, counts)
           if n <= train_per_class]
  if short:
    raise ValueError(f'{len(short)} classes have no more than train_per_class={train_per_class} images, so '
                     f'no test image is left: {short[:10]}; lower --train_per_class')
  rng = np.random.default_rng(seed)
  splits = []
  for _ in range(num_splits):
    train, test = [], []
    for c in classes:
      members = rng.permutation(np.flatnonzero(labels == c))
      train.append(members[:train_per_class])
      rest = members[train_per_class:]
      test.append(rest[:test_per_class] if test_per_class else rest)
    splits.append((np.sort(np.concatenate(train)), np.sort(np.concatenate(test))))
  return splits


def _map_scorer(estimator, x, y) -> float:
  return mean_average_precision(estimator.decision_function(x), y)[0]


def fit_svm(x: np.ndarray, y: np.ndarray, cs: Sequence[float] = DEFAULT_C, folds: int = 3, seed: int = 0,
            max_iter: int = 10000) -> tuple[Any, float, dict]:
  """One-vs-rest linear SVMs (scikit-learn's LinearSVC, squared hinge loss) on descriptors x; C chosen from
  cs by k-fold cross-validation on the training data (mean class recall for labels y (N,), mAP for binary
  targets y (N, C)), then refit on all of it. Returns (classifier, C, {C: cross-validation score})."""
  y = np.asarray(y)
  multilabel = y.ndim == 2
  svm = LinearSVC(max_iter=max_iter, random_state=seed)
  cs = [float(c) for c in cs]
  if multilabel:
    estimator, grid, scoring = OneVsRestClassifier(svm), {'estimator__C': cs}, _map_scorer
    splitter = KFold(folds, shuffle=True, random_state=seed)
  else:
    if len(np.unique(y)) < 2:
      raise ValueError('the SVMs need at least two classes in the training data')
    estimator, grid, scoring = svm, {'C': cs}, 'balanced_accuracy'
    folds = min(folds, int(np.min(np.bincount(y)[np.unique(y)])))  # every fold holds every class
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed) if folds >= 2 else None
  if len(cs) == 1 or splitter is None:
    estimator.set_params(**{k: cs[0] for k in grid})
    return estimator.fit(x, y), cs[0], {}
  search = GridSearchCV(estimator, grid, scoring=scoring, cv=splitter, refit=True, n_jobs=1)
  search.fit(x, y)
  key = next(iter(grid))
  cv = {str(c): float(s) for c, s in zip(search.cv_results_[f'param_{key}'],
                                         search.cv_results_['mean_test_score'])}
  return search.best_estimator_, float(search.best_params_[key]), cv


def scores_metrics(scores: np.ndarray, y: np.ndarray, ap_mode: str = 'voc12') -> dict:
  """Mean class recall, accuracy (single-label y (N,)) and mAP (both kinds) of class scores (N, C)."""
  y = np.asarray(y)
  if y.ndim == 2:
    m, aps = mean_average_precision(scores, y, ap_mode)
    return {'mAP': m, 'ap_per_class': aps.tolist()}
  pred = np.argmax(scores, axis=1)
  m, aps = mean_average_precision(scores, one_hot(y, scores.shape[1]), ap_mode)
  return {'mean_class_recall': mean_class_recall(y, pred), 'accuracy': float(np.mean(pred == y)), 'mAP': m,
          'recall_per_class': [float(np.mean(pred[y == c] == c)) if np.any(y == c) else float('nan')
                               for c in range(scores.shape[1])]}


def svm_scores(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
  """Decision values (N, num_classes); a class absent from the SVMs' training data scores below all others."""
  d = np.asarray(clf.decision_function(x), np.float64)
  classes = np.asarray(getattr(clf, 'classes_', np.arange(num_classes)))
  if d.ndim == 1:  # two classes: one decision value, for the second
    d = np.stack([-d, d], axis=1)
  if classes.ndim != 1 or len(classes) != d.shape[1]:  # multi-label: one column per class already
    return d
  out = np.full((len(x), num_classes), (d.min() - 1) if d.size else 0.0)
  out[:, classes.astype(np.int64)] = d
  return out


def run_protocol(x: np.ndarray, labels: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]], *,
                 num_classes: int, cs: Sequence[float] = DEFAULT_C, folds: int = 3, seed: int = 0,
                 ap_mode: str = 'voc12', scores_fn: Callable | None = None, progress: bool = False) -> dict:
  """Trains and tests the SVMs on each (train, test) split of descriptors x (or, with scores_fn, scores
  the test images with scores_fn(test_indices) instead of training anything). Returns per-split results and
  the mean and standard deviation of each metric over splits, plus the first split's confusion matrix."""
  x = np.asarray(x, np.float32)
  labels = np.asarray(labels)
  rows, confusion = [], None
  for k, (train, test) in enumerate(splits):
    t0 = time.time()
    if scores_fn is None:
      clf, c, cv = fit_svm(x[train], labels[train], cs, folds, seed + k)
      scores = svm_scores(clf, x[test], num_classes)
    else:
      c, cv = None, {}
      scores = np.asarray(scores_fn(test))
    row = {'split': k, 'num_train': int(len(train)), 'num_test': int(len(test)), 'C': c, 'cv': cv,
           **scores_metrics(scores, labels[test], ap_mode), 'seconds': round(time.time() - t0, 2)}
    rows.append(row)
    if k == 0 and labels.ndim == 1:
      confusion = confusion_matrix(labels[test], np.argmax(scores, 1), num_classes)
    if progress:
      shown = {m: round(row[m], 4) for m in ('mean_class_recall', 'mAP') if m in row}
      log.info('split %d/%d: C %s, %s (%d train / %d test)', k + 1, len(splits), c, shown, len(train),
               len(test))
  summary = {}
  for metric in ('mean_class_recall', 'accuracy', 'mAP'):
    values = [r[metric] for r in rows if metric in r]
    if values:
      summary[metric] = float(np.mean(values))
      summary[f'{metric}_std'] = float(np.std(values))
  return {'splits': rows, **summary, 'confusion': None if confusion is None else confusion.tolist()}


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | os.PathLike,
                   title: str = '') -> pathlib.Path:
  """The confusion matrix, each row normalised by its class's test images, as a PNG."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  m = np.asarray(confusion, np.float64)
  rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
  n = len(m)
  size = min(4 + 0.3 * n, 40)
  fig, ax = plt.subplots(figsize=(size, size * 0.9))
  im = ax.imshow(rows, cmap='Blues', vmin=0, vmax=1)
  if n <= 40:
    ax.set_xticks(range(n), [str(c)[:16] for c in class_names[:n]], rotation=90, fontsize=8)
    ax.set_yticks(range(n), [str(c)[:16] for c in class_names[:n]], fontsize=8)
    if n <= 15:
      for i in range(n):
        for j in range(n):
          if m[i, j]:
            ax.text(j, i, int(m[i, j]), ha='center', va='center', fontsize=7,
                    color='white' if rows[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title(title, fontsize=9)
  fig.colorbar(im, ax=ax, fraction=0.046, label='fraction of the class')
  fig.tight_layout()
  path = pathlib.Path(path)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path
