"""Transfer to other datasets, as in the paper's Appendix B: fixed VGG descriptors and linear SVMs.

Why one module of about 800 lines: the random splits, the cached descriptors, the SVMs with cross-validation,
the two scores (mean class recall, VOC AP) and the report are one protocol (Appendix B), used only together;
the descriptors themselves are vggjax.features'.

The paper shows its ImageNet nets are generic feature extractors: fc8 is removed, and an image's descriptor
is the 4096-D fc7 activation of the fully convolutional net applied over the whole image rescaled to Q,
averaged over the map and with the horizontally flipped image's (``vggjax.features``), at several scales Q
(256, 384, 512), averaged or stacked over scales, the descriptors of several nets (D and E) stacked, and
L2-normalised. One-vs-rest linear SVMs are trained on them, with no fine-tuning, and scored with

* mean class recall (Caltech-101/256): the mean over classes of the fraction of each class's test images
  classified correctly, averaged over random splits with N training images per class (30 or 60 in the
  paper) and up to M test images per class from the rest;
* mean average precision (PASCAL VOC 2007/2012): one score per class and image; AP per class as VOC
  computes it (precision made monotone, area under the whole curve: 'voc12'; or the 11-point average:
  'voc07'), averaged over classes. Multi-label sources (TFDS datasets whose label feature is a sequence,
  e.g. voc/2007 with --config.data.label_key=labels) are scored this way; single-label ones get it too.

    python -m vggjax.transfer --weights=weights/vgg16_tv --weights=weights/vgg19_tv --config=my_data.py \\
        --workdir=runs/transfer --train_per_class=30 --test_per_class=50 --num_splits=3
    python -m vggjax.transfer --weights=runs/finetuned --config=my_data.py --workdir=runs/ft --classifier=net

The data is the config's ``data`` block, any labelled source (folder, tfds, mnist/fashion_mnist, digits).
With ``--train_per_class=N`` the train and eval splits are pooled (the train split alone when data.eval_split
is empty: Caltech's single folder of classes) and split at random per class; with 0 (the default) the SVMs
train on data.train_split and are tested on data.eval_split once (VOC).

Descriptors are cached: per net, scale, flip setting and split, in chunks written as they are computed, so
an interrupted run resumes where it stopped, and a second run with other SVM or combination options
(average/stack, other splits, C) computes nothing. The cache key holds a hash of the net's parameter values
and normalisation, the scale, the flip setting and a fingerprint of the split (names or contents, labels):
change any of them and the descriptors are computed afresh. The per-scale cache keeps the raw (unnormalised)
pooled fc7, so averaging and stacking are exact from the same files.

``--classifier=net`` scores the weights' own classifier (fc8) on the same test images with the same metrics
and splits: the fine-tuned alternative (``configs/finetune.py``). Its scores are the dense softmax posteriors
averaged over the scales (and flips).

Outputs in WORKDIR: transfer.json (options, per split C, mean class recall, accuracy and mAP, their mean and
std over splits), a table on stdout, and confusion.png (the confusion matrix of the first split, rows
normalised, single-label sources).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger('vggjax')

COMBINE = ('average', 'stack')
CLASSIFIERS = ('svm', 'net')
AP_MODES = ('voc12', 'voc07', 'none')
PAPER_SCALES = (256, 384, 512)
DEFAULT_C = (0.01, 0.1, 1.0, 10.0, 100.0)
CACHE_VERSION = 1
CHUNK = 512  # images per cache file: the unit of resumption


# ----------------------------------------------------------------------------------------------------------
# Metrics.


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


# ----------------------------------------------------------------------------------------------------------
# Splits (the Caltech protocol).


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


# ----------------------------------------------------------------------------------------------------------
# Linear SVMs.


def _map_scorer(estimator, x, y) -> float:
  return mean_average_precision(estimator.decision_function(x), y)[0]


def fit_svm(x: np.ndarray, y: np.ndarray, cs: Sequence[float] = DEFAULT_C, folds: int = 3, seed: int = 0,
            max_iter: int = 10000) -> tuple[Any, float, dict]:
  """One-vs-rest linear SVMs (scikit-learn's LinearSVC, squared hinge loss) on descriptors x; C chosen from
  cs by k-fold cross-validation on the training data (mean class recall for labels y (N,), mAP for binary
  targets y (N, C)), then refit on all of it. Returns (classifier, C, {C: cross-validation score})."""
  from sklearn.model_selection import GridSearchCV, KFold, StratifiedKFold
  from sklearn.multiclass import OneVsRestClassifier
  from sklearn.svm import LinearSVC
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


# ----------------------------------------------------------------------------------------------------------
# Labelled images from a source.


@dataclasses.dataclass
class Examples:
  """The images and labels of one split: ``image(i)`` uint8 RGB, ``labels`` (N,) int or (N, C) bool."""
  source: Any
  labels: np.ndarray
  class_names: list[str]
  name: str
  multilabel: bool = False

  def __len__(self) -> int:
    return len(self.labels)

  def image(self, index: int) -> np.ndarray:
    if self.multilabel:
      from vggjax.data import transforms
      return transforms.load(_tfds_example(self.source, index)[self.source.image_key])
    return self.source[index]['image']

  def describe(self, index: int) -> str:
    return self.source.describe(index) if hasattr(self.source, 'describe') else f'{self.name}[{index}]'


def _tfds_example(source, index: int) -> dict:
  example = source._parse(source._ds[index]) if source._raw else source._ds[index]  # noqa: SLF001
  image = example[source.image_key]
  if isinstance(image, np.ndarray) and image.dtype == object:
    example = {**example, source.image_key: image.item()}
  return example


def _source_labels(source) -> tuple[np.ndarray, bool]:
  """(labels, multilabel): a source's labels without decoding its images where it keeps them apart."""
  from vggjax.data import sources
  if hasattr(source, 'labels') and not isinstance(source, sources.TfdsSource):
    return np.asarray(source.labels, np.int64), False
  if isinstance(source, sources.TfdsSource):
    feature = source._features[source.label_key]  # noqa: SLF001
    if type(feature).__name__ == 'Sequence':  # multi-label (VOC's 'labels')
      num = int(feature.feature.num_classes)
      out = np.zeros((len(source), num), bool)
      for i in range(len(source)):
        out[i, np.asarray(_tfds_example(source, i)[source.label_key], np.int64)] = True
      if not source.class_names and getattr(feature.feature, 'names', None):
        source.class_names = list(feature.feature.names)
      source._num_classes = num  # noqa: SLF001
      return out, True
  return np.asarray([source.record(i)[1] for i in range(len(source))], np.int64), False


def open_examples(data_cfg, split: str) -> Examples:
  """The images and labels of a split of the config's data source."""
  from vggjax.data import pipeline
  source = pipeline.open_source(data_cfg, split)
  labels, multilabel = _source_labels(source)
  if multilabel:
    num = labels.shape[1]
  else:
    num = max(source.num_classes, int(labels.max()) + 1 if len(labels) else 0)
  names = list(source.class_names) if source.class_names else [str(i) for i in range(num)]
  return Examples(source, labels, names, f'{getattr(source, "name", data_cfg.source)}', multilabel)


def examples_fingerprint(examples: Examples) -> str:
  """A hash of what a split holds: its name, labels, and its images' contents (in-memory arrays) or their
  paths, sizes and modification times (folders) or record count (TFDS)."""
  from vggjax.data import sources
  h = hashlib.sha256()
  src = examples.source
  h.update(f'{type(src).__name__}|{examples.name}|{len(examples)}'.encode())
  h.update(np.ascontiguousarray(examples.labels).tobytes())
  if isinstance(src, sources.ArraySource):
    h.update(np.ascontiguousarray(src.images).tobytes())
  elif isinstance(src, sources.FolderSource):
    for i in range(len(src)):
      p = src.path(i)
      st = p.stat()
      h.update(f'{p}|{st.st_size}|{st.st_mtime_ns}\n'.encode('utf-8', 'surrogateescape'))
  else:
    h.update(repr((getattr(src, 'tfds_name', ''), getattr(src, 'split', ''), getattr(src, 'data_dir', ''))
                  ).encode())
  return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------
# Nets and their descriptors, cached.


@dataclasses.dataclass
class Net:
  path: str
  variables: Any
  meta: dict
  fingerprint: str

  @property
  def label(self) -> str:
    return f'{self.meta["model"]["name"]} ({os.path.basename(os.path.normpath(self.path))})'


def variables_fingerprint(variables: Any, meta: Mapping) -> str:
  """A hash of the parameter values (every leaf's path, dtype, shape and bytes), the model and the input
  normalisation: what the descriptors depend on."""
  import jax
  h = hashlib.sha256()
  leaves = [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(variables)]
  for name, leaf in sorted(leaves, key=lambda t: t[0]):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f'{name}|{a.dtype}|{a.shape}'.encode())
    h.update(a.tobytes())
  h.update(json.dumps({'model': meta.get('model'), 'normalization': meta.get('normalization')},
                      sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def load_net(path: str) -> Net:
  from vggjax import checkpoints
  variables, meta = checkpoints.load_weights(path)
  return Net(str(path), variables, meta, variables_fingerprint(variables, meta))


def _cache_key(net: Net, examples_fp: str, q: int, flip: bool) -> str:
  return hashlib.sha256(json.dumps([CACHE_VERSION, net.fingerprint, examples_fp, int(q), bool(flip)]
                                   ).encode()).hexdigest()[:20]


class DescriptorCache:
  """Per net, split, scale and flip setting: the raw pooled fc7 (N, D) float32 in DIR/<key>/, first as chunk
  files (chunk_<start>.npy, written as computed: the resumption points), then as one descriptors.npy."""

  def __init__(self, directory: str | os.PathLike | None):
    self.directory = pathlib.Path(directory) if directory else None
    self.computed_images = 0  # images run through a net by this object (at any scale): cache misses

  def _dir(self, key: str) -> pathlib.Path | None:
    return None if self.directory is None else self.directory / key

  def load(self, key: str) -> np.ndarray | None:
    d = self._dir(key)
    if d is not None and (d / 'descriptors.npy').exists():
      return np.load(d / 'descriptors.npy')
    return None

  def chunk(self, key: str, start: int) -> np.ndarray | None:
    d = self._dir(key)
    path = None if d is None else d / f'chunk_{start:09d}.npy'
    return np.load(path) if path is not None and path.exists() else None

  def save_chunk(self, key: str, start: int, values: np.ndarray, info: Mapping) -> None:
    d = self._dir(key)
    if d is None:
      return
    d.mkdir(parents=True, exist_ok=True)
    if not (d / 'key.json').exists():
      (d / 'key.json').write_text(json.dumps(dict(info), indent=1))
    tmp = d / f'.chunk_{start:09d}.tmp.npy'
    np.save(tmp, values)
    os.replace(tmp, d / f'chunk_{start:09d}.npy')  # atomic: a killed run never leaves half a chunk

  def finish(self, key: str, values: np.ndarray) -> None:
    d = self._dir(key)
    if d is None:
      return
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / '.descriptors.tmp.npy'
    np.save(tmp, values)
    os.replace(tmp, d / 'descriptors.npy')
    for p in d.glob('chunk_*.npy'):
      p.unlink()


_JITTED: dict = {}


def _descriptor_fn(meta: Mapping, flip: bool) -> Callable:
  """The jitted descriptor function (vggjax.evaluation.descriptor_fn, what vggjax.features uses), one per
  architecture, normalisation and flip setting (so the nets, splits and scales of a run share its compiled
  shapes)."""
  from vggjax import checkpoints
  from vggjax.evaluation import descriptor_fn
  key = ('fc7', json.dumps([meta['model'], meta.get('normalization')], sort_keys=True, default=str), flip)
  if key not in _JITTED:
    _JITTED[key] = descriptor_fn(checkpoints.model_from_meta(meta), checkpoints.normalization_from_meta(meta),
                                 flip)
  return _JITTED[key]


def scale_descriptors(net: Net, examples: Examples, scales: Sequence[int], *, flip: bool = True,
                      cache: DescriptorCache | None = None, batch_size: int = 32, progress: bool = False,
                      examples_fp: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
  """Per scale Q, the raw descriptors (N, D) of every image of a split under one net: fc7 averaged over the
  map (and with the flipped image's), unnormalised; rows of unreadable images are NaN. Returns (list over
  scales, valid mask (N,)). Cached chunks and finished scales are reused."""
  import jax
  from vggjax import checkpoints, runlog
  from vggjax.evaluation import ImageEvaluator, ImageSettings
  cache = cache or DescriptorCache(None)
  model = checkpoints.model_from_meta(net.meta)
  scales = [int(q) for q in scales]
  if not scales or min(scales) < model.image_size:
    raise ValueError(f'scales {scales} must be given and at least the training size {model.image_size} of '
                     f'{net.path}')
  fp = examples_fp or examples_fingerprint(examples)
  keys = [_cache_key(net, fp, q, flip) for q in scales]
  done = {q: cache.load(k) for q, k in zip(scales, keys)}
  n = len(examples)
  width = int(np.shape(net.variables['params']['fc7']['kernel'])[-1])
  todo = [q for q in scales if done[q] is None]
  if todo:
    evaluator = ImageEvaluator(_descriptor_fn(net.meta, flip),
                               ImageSettings(scales=tuple(todo), style='torchvision', batch_size=batch_size))
    variables = jax.device_put(net.variables)
    parts: dict[int, list[np.ndarray]] = {q: [] for q in todo}
    bar = runlog.progress_bar(n * len(todo), f'descriptors {net.label} {examples.name}', unit='img',
                              enabled=progress)
    for start in range(0, n, CHUNK):
      stop = min(start + CHUNK, n)
      missing = []
      for q, k in zip(scales, keys):
        if q in parts:
          cached = cache.chunk(k, start)
          if cached is not None:
            parts[q].append(cached)
            bar.update(stop - start)
          else:
            missing.append((q, k))
      if not missing:
        continue
      images, ok = [], []
      for i in range(start, stop):
        try:
          images.append(examples.image(i))
          ok.append(True)
        except Exception as e:  # noqa: BLE001 - a corrupt file is left out, never the end of the run
          log.warning('unreadable image %s (%s: %s): left out', examples.describe(i), type(e).__name__, e)
          images.append(None)
          ok.append(False)
      good = [im for im, readable in zip(images, ok) if readable]
      for q, k in missing:
        values = np.full((stop - start, width), np.nan, np.float32)
        if good:
          values[np.asarray(ok)] = np.stack(evaluator.at_scale(variables, good, q, bar))
        bar.update(len(ok) - int(sum(ok)))
        cache.computed_images += stop - start
        cache.save_chunk(k, start, values, {'net': net.path, 'fingerprint': net.fingerprint,
                                            'split': examples.name, 'scale': q, 'flip': flip, 'images': n})
        parts[q].append(values)
    bar.close()
    for q, k in zip(scales, keys):
      if q in parts:
        done[q] = np.concatenate(parts[q]) if parts[q] else np.zeros((0, width), np.float32)
        cache.finish(k, done[q])
  per_scale = [done[q] for q in scales]
  valid = np.all(np.isfinite(per_scale[0]), axis=1) if n else np.zeros(0, bool)
  return per_scale, valid


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def combine_scales(per_scale: Sequence[np.ndarray], combine: str = 'average') -> np.ndarray:
  """The paper's multi-scale descriptor: the per-scale descriptors averaged (D) or stacked (D x scales),
  then L2-normalised (what vggjax.features.extract returns)."""
  if combine not in COMBINE:
    raise ValueError(f'unknown combine {combine!r}; valid: {", ".join(COMBINE)}')
  stacked = [np.asarray(d, np.float64) for d in per_scale]
  x = np.mean(stacked, axis=0) if combine == 'average' else np.concatenate(stacked, axis=1)
  return l2_normalize(x)


def stack_nets(per_net: Sequence[np.ndarray]) -> np.ndarray:
  """Several nets' descriptors (each L2-normalised) side by side, L2-normalised again (the paper's D & E)."""
  return l2_normalize(np.concatenate([l2_normalize(d) for d in per_net], axis=1))


def descriptors(nets: Sequence[Net], examples: Examples, scales: Sequence[int] = PAPER_SCALES,
                combine: str = 'average', *, flip: bool = True, cache: DescriptorCache | None = None,
                batch_size: int = 32, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(descriptors (N, D), valid (N,)) of a split: per net, scales combined; nets stacked."""
  if combine not in COMBINE:
    raise ValueError(f'unknown combine {combine!r}; valid: {", ".join(COMBINE)}')
  fp = examples_fingerprint(examples)
  per_net, valid = [], np.ones(len(examples), bool)
  for net in nets:
    per_scale, ok = scale_descriptors(net, examples, scales, flip=flip, cache=cache, batch_size=batch_size,
                                      progress=progress, examples_fp=fp)
    valid &= ok
    per_net.append(combine_scales([np.nan_to_num(d) for d in per_scale], combine))
  x = per_net[0] if len(per_net) == 1 else stack_nets(per_net)
  return x, valid


def net_posteriors(net: Net, examples: Examples, indices: Sequence[int], scales: Sequence[int], *,
                   flip: bool = True, batch_size: int = 32, progress: bool = False) -> np.ndarray:
  """The net's own classifier on images of a split: dense softmax posteriors (N, classes) averaged over the
  image and its flip and over scales (paper 3.2)."""
  import jax
  from vggjax import checkpoints, runlog
  from vggjax.evaluation import ImageEvaluator, ImageSettings, posterior_fn
  model = checkpoints.model_from_meta(net.meta)
  key = ('posteriors', json.dumps([net.meta['model'], net.meta.get('normalization')], sort_keys=True,
                                  default=str), flip)
  if key not in _JITTED:
    _JITTED[key] = posterior_fn(model, checkpoints.normalization_from_meta(net.meta), flip)
  evaluator = ImageEvaluator(_JITTED[key], ImageSettings(scales=tuple(int(q) for q in scales),
                                                         style='torchvision', batch_size=batch_size))
  variables = jax.device_put(net.variables)
  indices = list(indices)
  total = np.zeros((len(indices), model.num_classes), np.float64)
  bar = runlog.progress_bar(len(indices) * len(scales), f'classify {net.label}', unit='img', enabled=progress)
  for start in range(0, len(indices), CHUNK):
    chunk = [examples.image(i) for i in indices[start:start + CHUNK]]
    for q in scales:
      total[start:start + len(chunk)] += np.stack(evaluator.at_scale(variables, chunk, int(q), bar))
  bar.close()
  return (total / len(scales)).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# Results.


def format_table(result: Mapping) -> str:
  """A table like the paper's Table 11: one row per method, the dataset's metrics as columns."""
  pct = lambda r, m: (f'{100 * r[m]:.1f} ± {100 * r[m + "_std"]:.1f}' if m in r else '-')  # noqa: E731
  name = result.get('dataset', '')
  lines = [f'| method | {name} mean class recall (%) | {name} accuracy (%) | {name} mAP (%) |',
           '|---|---|---|---|',
           f'| {result["method"]} | {pct(result, "mean_class_recall")} | {pct(result, "accuracy")} | '
           f'{pct(result, "mAP")} |']
  return '\n'.join(lines)


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


def _clean(x):
  if isinstance(x, float) and not np.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return _clean(x.item())
  return x


def transfer(weights: Sequence[str], data_cfg, *, workdir: str, scales: Sequence[int] = PAPER_SCALES,
             combine: str = 'average', flip: bool = True, classifier: str = 'svm', train_per_class: int = 0,
             test_per_class: int = 0, num_splits: int = 3, seed: int = 0, cs: Sequence[float] = DEFAULT_C,
             folds: int = 3, ap_mode: str = 'voc12', cache_dir: str | None = None, batch_size: int = 32,
             progress: bool = True) -> dict:
  """The whole protocol: descriptors of the train and eval splits (cached), SVMs per split, metrics.
  Writes WORKDIR/transfer.json and WORKDIR/confusion.png and returns the result."""
  if classifier not in CLASSIFIERS:
    raise ValueError(f'unknown classifier {classifier!r}; valid: {", ".join(CLASSIFIERS)}')
  if combine not in COMBINE:
    raise ValueError(f'unknown combine {combine!r}; valid: {", ".join(COMBINE)}')
  if ap_mode not in AP_MODES:
    raise ValueError(f'unknown AP mode {ap_mode!r}; valid: {", ".join(AP_MODES)}')
  if not weights:
    raise ValueError('no weights given: pass one or more weights directories or training runs')
  if classifier == 'net' and len(weights) != 1:
    raise ValueError(f'classifier=net scores one net\'s own fc8; got {len(weights)} weights')
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  cache = DescriptorCache(cache_dir or os.path.join(workdir, 'descriptors'))
  nets = [load_net(w) for w in weights]
  from vggjax import settings
  data = settings.DataSettings.from_config(data_cfg)  # read once; every default from configs/default.py
  eval_split = data.eval_split
  if not eval_split and not train_per_class:
    raise ValueError('data.eval_split is empty: the SVMs need test images (set it), or random splits of one '
                     'pool (set --train_per_class)')
  train_ex = open_examples(data, data.train_split)
  eval_ex = open_examples(data, eval_split) if eval_split else None
  if eval_ex is not None and train_ex.multilabel != eval_ex.multilabel:
    raise ValueError(f'{data.train_split} and {eval_split} differ in label kind (single vs multi-label)')
  names = train_ex.class_names
  num_classes = train_ex.labels.shape[1] if train_ex.multilabel else len(names)
  if classifier == 'net' and nets[0].meta['model']['num_classes'] != num_classes:
    raise ValueError(f'{weights[0]} classifies {nets[0].meta["model"]["num_classes"]} classes; the data has '
                     f'{num_classes}: fine-tune it on this data first (configs/finetune.py)')
  parts = []
  for ex in (train_ex, eval_ex) if eval_ex is not None else (train_ex,):
    if classifier == 'svm':
      x, valid = descriptors(nets, ex, scales, combine, flip=flip, cache=cache, batch_size=batch_size,
                             progress=progress)
    else:
      x, valid = np.zeros((len(ex), 0), np.float32), np.ones(len(ex), bool)
    parts.append((x, ex.labels, valid))
  x = np.concatenate([p[0] for p in parts])
  y = np.concatenate([p[1] for p in parts])
  valid = np.concatenate([p[2] for p in parts])
  offset = len(train_ex)
  if train_per_class:
    if train_ex.multilabel:
      raise ValueError('--train_per_class (the Caltech protocol) needs a single-label source')
    pool = np.flatnonzero(valid)
    splits = [(pool[a], pool[b]) for a, b in class_splits(y[pool], train_per_class, test_per_class,
                                                          num_splits, seed, names)]
    protocol = {'kind': 'random splits', 'train_per_class': train_per_class, 'test_per_class': test_per_class,
                'num_splits': num_splits, 'seed': seed,
                'pool': [data.train_split] + ([eval_split] if eval_split else [])}
  else:
    splits = [(np.flatnonzero(valid[:offset]), offset + np.flatnonzero(valid[offset:]))]
    protocol = {'kind': 'fixed split', 'train': data.train_split, 'test': eval_split}

  def classify(indices):
    out = np.zeros((len(indices), num_classes), np.float32)
    indices = np.asarray(indices)
    for part, ex, base in ((indices < offset, train_ex, 0), (indices >= offset, eval_ex, offset)):
      if np.any(part):
        out[part] = net_posteriors(nets[0], ex, indices[part] - base, scales, flip=flip,
                                   batch_size=batch_size, progress=progress)
    return out

  result = run_protocol(x, y, splits, num_classes=num_classes, cs=cs, folds=folds, seed=seed,
                        ap_mode=ap_mode, scores_fn=classify if classifier == 'net' else None,
                        progress=progress)
  arch = ' & '.join(n.meta['model']['name'] for n in nets)
  method = ('fine-tuned net' if classifier == 'net' else
            f'{arch} fc7, {combine} over Q={",".join(map(str, scales))}{"" if flip else ", no flip"}, '
            'linear SVM')
  result.update({
      'method': method, 'dataset': data.name or data.source,
      'data_dir_name': os.path.basename(os.path.normpath(data.data_dir)),
      'nets': [{'path': n.path, 'model': n.meta['model'], 'fingerprint': n.fingerprint} for n in nets],
      'classifier': classifier, 'scales': [int(q) for q in scales], 'combine': combine, 'flip': flip,
      'descriptor_dim': int(x.shape[1]), 'num_classes': num_classes, 'class_names': names,
      'multilabel': train_ex.multilabel, 'protocol': protocol, 'ap_mode': ap_mode,
      'C_grid': [float(c) for c in cs], 'cv_folds': folds,
      'unreadable': int((~valid).sum()), 'images_computed': cache.computed_images,
      'wall_s': round(time.time() - t0, 1)})
  with open(os.path.join(workdir, 'transfer.json'), 'w') as f:
    json.dump(_clean(result), f, indent=1)
  if result.get('confusion') is not None:
    plot_confusion(result['confusion'], names, os.path.join(workdir, 'confusion.png'),
                   f'{method}: split 0, mean class recall {result["splits"][0]["mean_class_recall"]:.3f}')
  return result


# ----------------------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  f = {}
  f['config'] = config_flags.DEFINE_config_file(
      'config', None, 'The config whose data block is the target dataset (configs/*.py[:arg]); its '
      'data.train_split trains the SVMs, data.eval_split tests them. Override with --config.FIELD=VALUE.',
      lock_config=False)
  f['weights'] = flags.DEFINE_multi_string(
      'weights', [], 'A weights directory or training run; repeat to stack several nets\' descriptors.')
  f['workdir'] = flags.DEFINE_string('workdir', None, 'Where transfer.json, confusion.png and (by default) '
                                     'the descriptor cache go.')
  f['scales'] = flags.DEFINE_list('scales', [str(q) for q in PAPER_SCALES], 'Smaller-side sizes Q.')
  f['combine'] = flags.DEFINE_enum('combine', 'average', list(COMBINE), 'Average or stack the scales.')
  f['flip'] = flags.DEFINE_bool('flip', True, 'Average each descriptor with the flipped image\'s.')
  f['classifier'] = flags.DEFINE_enum('classifier', 'svm', list(CLASSIFIERS),
                                      'svm: linear SVMs on the descriptors; net: the net\'s own fc8 '
                                      '(a fine-tuned net), same splits and metrics.')
  f['train_per_class'] = flags.DEFINE_integer(
      'train_per_class', 0, 'N > 0: pool both splits and draw random splits of N training images per class '
      '(Caltech: 30, 60); 0: train on data.train_split, test on data.eval_split.')
  f['test_per_class'] = flags.DEFINE_integer('test_per_class', 0, 'Test images per class in each random '
                                             'split (Caltech-101: 50; 0: all the rest).')
  f['num_splits'] = flags.DEFINE_integer('num_splits', 3, 'Random splits (the paper: 3).')
  f['seed'] = flags.DEFINE_integer('seed', 0, 'Seed of the random splits and cross-validation folds.')
  f['C'] = flags.DEFINE_list('C', [str(c) for c in DEFAULT_C], 'SVM C values; chosen by cross-validation.')
  f['cv_folds'] = flags.DEFINE_integer('cv_folds', 3, 'Cross-validation folds on the training images.')
  f['ap'] = flags.DEFINE_enum('ap', 'voc12', list(AP_MODES), 'AP: voc12 (area under the interpolated '
                              'curve), voc07 (11 points), none (scikit-learn\'s).')
  f['cache_dir'] = flags.DEFINE_string('cache_dir', '', 'Descriptor cache (default WORKDIR/descriptors).')
  f['batch_size'] = flags.DEFINE_integer('batch_size', 32, 'Images of equal size per forward pass.')
  f['num_cpu_devices'] = flags.DEFINE_integer('num_cpu_devices', 0, 'Virtual CPU devices (0: '
                                              'VGGJAX_NUM_CPU_DEVICES or 1).')
  flags.mark_flags_as_required(['workdir', 'config'])
  return f


def main(argv, flag_holders) -> None:
  from absl import app
  from vggjax import cli
  f = cli.start_command(argv, flag_holders)
  logging.getLogger('vggjax').setLevel(logging.INFO)
  try:
    scales = [int(q) for q in f['scales']]
    cs = [float(c) for c in f['C']]
  except ValueError as e:
    raise app.UsageError(f'--scales takes integers and --C numbers: {e}')
  if not cs or min(cs) <= 0:
    raise app.UsageError(f'--C must be positive numbers, got {f["C"]}')
  if not f['weights']:
    raise app.UsageError('--weights=DIR is required (a weights directory or a training run; repeat to stack)')
  try:
    result = transfer(f['weights'], f['config'].data, workdir=f['workdir'], scales=scales,
                      combine=f['combine'], flip=f['flip'], classifier=f['classifier'],
                      train_per_class=f['train_per_class'], test_per_class=f['test_per_class'],
                      num_splits=f['num_splits'], seed=f['seed'], cs=cs, folds=f['cv_folds'], ap_mode=f['ap'],
                      cache_dir=f['cache_dir'] or None, batch_size=f['batch_size'])
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e))
  print(format_table(result))
  print(f'{len(result["splits"])} split(s), {result["descriptor_dim"]}-D descriptors, '
        f'{result["images_computed"]} images computed (the rest from the cache), {result["unreadable"]} '
        f'unreadable; {result["wall_s"]:.1f} s; results in {os.path.join(f["workdir"], "transfer.json")}',
        flush=True)


def run() -> None:
  from vggjax import cli
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
