"""The evaluation engine: every model, protocol and scale over every image of a split, sharded over all
devices of all processes (the package docstring says how)."""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vggjax import parallel, runlog
from vggjax.evaluation.inference import crop_posteriors, dense_posteriors, extract_crops
from vggjax.evaluation.loading import EvalModel, _arch_name, _unique_labels
from vggjax.evaluation.metrics import fuse, topk_hits
from vggjax.evaluation.planning import (_Batch, _Reader, _allgather, _local_rows, _prefetched, _read_split,
                                        plan_batches)
from vggjax.evaluation.scales import (ASPECT_BUCKETS, BASE_PROTOCOLS, GRID, PROTOCOLS, bucket_shape,
                                      train_scale_label)

log = logging.getLogger('vggjax')

DEFAULT_PER_DEVICE_BATCH = 8


class EvalResult(dict):
  """What ``evaluate`` returns: eval.json's content (a dict: models, protocols, flip, results, num_images,
  compiled shapes, timings), and, with ``return_posteriors=True``, this process's per-image arrays as
  attributes (never written to eval.json):

  posteriors: {(model label, protocol, scale key): (this process's images, classes) float32};
  labels: (this process's images,) int64, -1 for an unreadable record;
  indices: the split's record index of each of this process's images, in order.
  """
  posteriors: dict[tuple[str, str, str], np.ndarray] | None = None
  labels: np.ndarray | None = None
  indices: np.ndarray | None = None


class _Functions:
  """The jitted functions of every model, compiled ahead of time per input shape, with the device time per
  (model, protocol, scale) and the shapes compiled per scale."""

  def __init__(self, eval_models: Sequence[EvalModel], mesh, crops_per_step: int = 5, flip: bool = True):
    rep, data = parallel.replicated(mesh), NamedSharding(mesh, P(parallel.DATA_AXIS))
    self.models = eval_models
    self.variables = [jax.device_put(m.variables, rep) for m in eval_models]
    self.dense = [jax.jit(functools.partial(dense_posteriors, m.model, norm=m.norm, flip=flip),
                          out_shardings=data) for m in eval_models]
    self.crop_net = {(i, flips): jax.jit(functools.partial(crop_posteriors, m.model, flips=flips, norm=m.norm,
                                                           per_step=crops_per_step), out_shardings=data)
                     for i, m in enumerate(eval_models) for flips in (False, True)}
    self.crops = {(size, n): jax.jit(functools.partial(extract_crops, size=size, n=n), out_shardings=data)
                  for size in {m.model.image_size for m in eval_models} for n in (1, GRID)}
    self.flip = flip
    self.cache: dict[tuple, Any] = {}
    self.compile_s = 0.0
    self.seconds: dict[tuple, float] = collections.defaultdict(float)  # (model, protocol, q) -> device s
    self.shapes: dict[int, dict[str, set]] = collections.defaultdict(
        lambda: {'dense': set(), 'crop_extract': set(), 'crop_net': set()})

  def _call(self, key: tuple, fn, *args):
    compiled = self.cache.get(key)
    if compiled is None:
      t0 = time.perf_counter()
      compiled = fn.lower(*args).compile()
      self.compile_s += time.perf_counter() - t0
      self.cache[key] = compiled
    return compiled(*args)

  def run(self, q: int, shape: tuple[int, int], images: jax.Array, hw: jax.Array,
          model_indices: Sequence[int], protocols: Sequence[str]) -> dict[tuple[int, str], np.ndarray]:
    """Posteriors (this process's rows) of one batch for each (model, base protocol)."""
    out, crops = {}, {}
    used = self.shapes[q]
    for i in model_indices:
      size = self.models[i].model.image_size
      for p in protocols:
        t0, c0 = time.perf_counter(), self.compile_s
        if p == 'dense':
          used['dense'].add(shape)
          y = self._call(('dense', i, shape), self.dense[i], self.variables[i], images, hw)
        else:
          n = GRID if p == 'multicrop' else 1
          if (size, n) not in crops:  # shared by the models of one training size
            used['crop_extract'].add((n, shape))
            crops[(size, n)] = self._call(('crops', size, n, shape), self.crops[(size, n)], images, hw)
          used['crop_net'].add(p)
          y = self._call(('crop_net', i, p), self.crop_net[(i, p == 'multicrop' and self.flip)],
                         self.variables[i], crops[(size, n)])
        out[(i, p)] = _local_rows(y)  # waits for the device
        self.seconds[(i, p, q)] += time.perf_counter() - t0 - (self.compile_s - c0)
    return out

  def device_seconds(self, i: int, scales: Iterable[int], reported: Sequence[str]) -> dict[str, float]:
    t = {p: sum(self.seconds[(i, p, q)] for q in scales) for p in BASE_PROTOCOLS}
    t['dense+multicrop'] = t['dense'] + t['multicrop']
    return {p: t[p] for p in reported}


class _Tally:
  """Result rows: per model (or 'fusion'), protocol and scale set, the hits among this process's images."""

  def __init__(self, labels: np.ndarray, num_classes: int, reported: Sequence[str], keep: bool):
    self.labels, self.k5, self.reported = labels, min(5, num_classes), reported
    self.rows: list[dict] = []
    self.kept: dict[tuple[str, str, str], np.ndarray] | None = {} if keep else None

  def add(self, label: str, posteriors: Mapping[str, np.ndarray], valid: np.ndarray, scales: Sequence[int],
          seconds: Mapping[str, float]) -> None:
    posteriors = dict(posteriors)
    if 'dense+multicrop' in self.reported:
      posteriors['dense+multicrop'] = 0.5 * (posteriors['dense'] + posteriors['multicrop'])
    idx = np.flatnonzero(valid)
    for p in self.reported:
      post, y = posteriors[p][idx], self.labels[idx]
      self.rows.append({'model': label, 'protocol': p, 'scales': tuple(scales), 'count': len(idx),
                        'top1': int(topk_hits(post, y, 1).sum()),
                        'top5': int(topk_hits(post, y, self.k5).sum()), 'seconds': seconds.get(p, 0.0)})
      if self.kept is not None:
        self.kept[(label, p, _scale_key(scales))] = posteriors[p].copy()

  def results(self) -> dict:
    """{model: {protocol: {scale key: {top1_err, top5_err, num_images, img_per_s}}}}, over all processes."""
    local = np.asarray([[r['top1'], r['top5'], r['count']] for r in self.rows], np.int64).reshape(-1, 3)
    total = _allgather(local).sum(axis=0)
    results: dict[str, dict] = {}
    for r, (top1, top5, count) in zip(self.rows, total):
      entry = {'top1_err': 1.0 - top1 / count if count else float('nan'),
               'top5_err': 1.0 - top5 / count if count else float('nan'), 'num_images': int(count)}
      if r['seconds'] > 0:
        entry['img_per_s'] = count / r['seconds']
      results.setdefault(r['model'], {}).setdefault(r['protocol'], {})[_scale_key(r['scales'])] = entry
    return results


def _scale_key(scales: Iterable[int]) -> str:
  return ','.join(str(q) for q in scales)


def evaluate(eval_models: Sequence[EvalModel], source, *, protocols: Sequence[str] = PROTOCOLS,
             batch_size: int = 0, mesh=None, num_threads: int = 0,
             aspect_buckets: Sequence[float] = ASPECT_BUCKETS, dct_scaling: bool = True,
             flip: bool = True, crops_per_step: int = 5, progress: bool = True,
             return_posteriors: bool = False) -> EvalResult:
  """Evaluates one or several models on every image of `source` with the requested protocols, at each
  model's scales and over all of them, per model and fused (several models). Returns an EvalResult:
  eval.json's content, and the per-image posteriors if asked for.

  source: len(source), and source.record(i) -> (uint8 image or encoded bytes, label) or
    source[i] -> {'image', 'label'} (vggjax.data.pipeline.open_source gives one).
  batch_size: global images per step (a multiple of the device count); 0: DEFAULT_PER_DEVICE_BATCH per device.
  flip: the paper's flips (dense: the image and its mirror image; multi-crop: 25 crops x 2). Turn them off for
    data whose classes are not mirror-symmetric (digits, text), trained without flips.
  crops_per_step: grid positions of every image the network runs on at once (x 2 with the flips).
  return_posteriors: also fill the result's posteriors, labels and indices (see EvalResult).
  """
  base, reported = _protocol_sets(protocols)
  eval_models = list(eval_models)
  labels_of, num_classes = _model_labels(eval_models)
  mesh = mesh if mesh is not None else parallel.make_mesh()
  batch_size = batch_size or DEFAULT_PER_DEVICE_BATCH * mesh.devices.size
  parallel.check_batch_size(batch_size, mesh)
  num_threads = num_threads or min(16, os.cpu_count() or 1)
  t_start = time.perf_counter()

  split = _Split(source, dct_scaling, num_threads, t_start)
  split.check_labels(num_classes)
  all_scales = sorted({q for m in eval_models for q in m.scales})
  split.plan(all_scales, batch_size // jax.process_count(), aspect_buckets)

  fns = _Functions(eval_models, mesh, crops_per_step, flip)
  tally = _Tally(split.labels, num_classes, reported, keep=return_posteriors)
  run = _Pass(eval_models, labels_of, all_scales, split, fns, tally, mesh, base, reported, t_start)
  run.every_scale(num_threads, progress)
  run.add_multiscale()
  return _result(run, flip=flip, batch_size=batch_size, return_posteriors=return_posteriors)


def _protocol_sets(protocols: Sequence[str]) -> tuple[list[str], list[str]]:
  """The base protocols to run (dense+multicrop runs both of its parts) and the protocols reported."""
  protocols = tuple(dict.fromkeys(protocols))
  bad = [p for p in protocols if p not in PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f'unknown protocol(s) {bad}; valid: {", ".join(PROTOCOLS)}')
  base = [p for p in BASE_PROTOCOLS if p in protocols or (p != 'single' and 'dense+multicrop' in protocols)]
  reported = [p for p in PROTOCOLS if p in base or p in protocols]
  return base, reported


def _model_labels(eval_models: Sequence[EvalModel]) -> tuple[list[str], int]:
  """The models' (unique) labels and their number of classes, the same for all of them."""
  if not eval_models:
    raise ValueError('nothing to evaluate: no model given')
  labels_of = _unique_labels([m.label for m in eval_models])
  classes = {m.model.num_classes for m in eval_models}
  if len(classes) != 1:
    raise ValueError(f'fusion needs models with the same classes; got num_classes {sorted(classes)}')
  return labels_of, classes.pop()


class _Split:
  """This process's images: a contiguous block of the split, their dimensions and labels (read first), the
  records found unreadable, and the batches of every scale."""

  def __init__(self, source, dct_scaling: bool, num_threads: int, t_start: float):
    n_proc, proc = jax.process_count(), jax.process_index()
    self.n = n = len(source)
    self.lo, self.hi = proc * n // n_proc, (proc + 1) * n // n_proc
    self.reader = _Reader(source, dct_scaling)
    log.info('reading the sizes of %d images (of %d) in %d threads', self.hi - self.lo, n, num_threads)
    self.dims, self.labels, self.readable, self.unreadable = _read_split(self.reader, self.lo, self.hi,
                                                                         num_threads)
    log.info('read the sizes in %.1f s', time.perf_counter() - t_start)
    self.local_batch = 0
    self.plans: dict[int, list[_Batch]] = {}
    self.buckets: dict[int, dict[str, int]] = {}

  def check_labels(self, num_classes: int) -> None:
    labels = self.labels
    bad_labels = int(np.sum(self.readable & ((labels < 0) | (labels >= num_classes))))
    if int(np.sum(_allgather(np.asarray([bad_labels])))):
      raise ValueError(f'labels outside [0, {num_classes}) in the split: '
                       f'the models have {num_classes} classes')

  def plan(self, scales: Sequence[int], local_batch: int, aspect_buckets: Sequence[float]) -> None:
    """The batches of every scale: per bucket shape, the same sequence on every process."""
    self.local_batch = local_batch
    dims, reader = self.dims, self.reader
    for q in scales:
      shapes = {int(pos): bucket_shape(*reader.t.rescaled_size(int(dims[pos, 0]), int(dims[pos, 1]), q), q,
                                       aspect_buckets) for pos in np.flatnonzero(self.readable)}
      self.plans[q], counts = plan_batches(shapes, q, local_batch)
      self.buckets[q] = {f'{h}x{w}': c for (h, w), c in sorted(counts.items())}

  def prepare(self, batch: _Batch):
    """(images, hw, positions, failed) of one batch: position -1 and an entry in failed for a bad record."""
    hb, wb = batch.shape
    local_batch, dims = self.local_batch, self.dims
    images = np.zeros((local_batch, hb, wb, 3), np.uint8)
    hw = np.tile(np.asarray([hb, wb], np.int32), (local_batch, 1))  # padding slots: a valid, masked shape
    positions, failed = batch.positions.copy(), []
    for j, pos in enumerate(batch.positions):
      if pos >= 0:
        try:
          image = self.reader.rescaled(self.lo + int(pos), batch.q, int(dims[pos, 0]), int(dims[pos, 1]))
          images[j, :image.shape[0], :image.shape[1]] = image
          hw[j] = image.shape[:2]
        except Exception as e:  # noqa: BLE001 - a bad record must not end the evaluation
          positions[j] = -1
          failed.append((int(pos), f'{type(e).__name__}: {e}'[:300]))
    return images, hw, positions, failed

  def skip(self, failed: Sequence[tuple[int, str]]) -> None:
    for pos, err in failed:
      self.readable[pos] = False
      self.unreadable.append(self.reader.describe(self.lo + pos))
      log.warning('skipping unreadable record %s: %s', self.reader.describe(self.lo + pos), err)


class _Pass:
  """The pass over every scale: per batch, the posteriors of the models at that scale; per scale, its result
  rows, per model and fused, and the sums over the scales; then the multi-scale rows."""

  def __init__(self, eval_models: Sequence[EvalModel], labels_of: Sequence[str], scales: Sequence[int],
               split: _Split, fns: _Functions, tally: _Tally, mesh, base: Sequence[str],
               reported: Sequence[str], t_start: float):
    self.models, self.labels_of, self.scales = eval_models, labels_of, scales
    self.split, self.fns, self.tally, self.mesh = split, fns, tally, mesh
    self.base, self.reported, self.t_start = base, reported, t_start
    self.num_classes = eval_models[0].model.num_classes  # the same for every model
    self.n_local = split.hi - split.lo
    self.sums: dict[tuple[int, str], np.ndarray] = {}  # (model, protocol) -> posteriors summed over scales
    self.scales_done = np.zeros((len(eval_models), self.n_local), np.int64)  # per image, scales evaluated at
    self.steps, self.images_done = 0, 0

  def every_scale(self, num_threads: int, progress: bool) -> None:
    bar = runlog.ProgressBar(sum(len(b) for b in self.split.plans.values()),
                             enabled=jax.process_index() == 0 and progress, desc='evaluate', unit='batch')
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      for q in self.scales:
        self._scale(pool, q, num_threads, bar)
    bar.close()

  def _scale(self, pool, q: int, num_threads: int, bar) -> None:
    at_q = [i for i, m in enumerate(self.models) if q in m.scales]
    post = {(i, p): np.zeros((self.n_local, self.num_classes), np.float32) for i in at_q for p in self.base}
    seen = np.zeros((self.n_local,), bool)
    for batch, (images, hw, positions, failed) in _prefetched(pool, self.split.prepare, self.split.plans[q],
                                                              num_threads):
      self.split.skip(failed)
      g = parallel.global_batch({'image': images, 'hw': hw}, self.mesh)
      valid = positions >= 0
      for key, rows in self.fns.run(q, batch.shape, g['image'], g['hw'], at_q, self.base).items():
        post[key][positions[valid]] = rows[valid]
      seen[positions[valid]] = True
      self._advance(bar, q, batch, valid)
    seen &= self.split.readable
    self._add_scale(q, at_q, post, seen)

  def _advance(self, bar, q: int, batch: _Batch, valid: np.ndarray) -> None:
    self.steps += 1
    self.images_done += int(valid.sum())
    if bar.enabled:
      rate = self.images_done * jax.process_count() / max(time.perf_counter() - self.t_start, 1e-9)
      bar.update(self.steps, Q=q, shape=f'{batch.shape[0]}x{batch.shape[1]}', **{'img/s': round(rate, 1)})

  def _add_scale(self, q: int, at_q: Sequence[int], post: Mapping[tuple[int, str], np.ndarray],
                 seen: np.ndarray) -> None:
    """Rows at this scale, per model and fused; the sums over scales."""
    for i in at_q:
      per = {p: post[(i, p)] for p in self.base}
      self.tally.add(self.labels_of[i], per, seen, (q,), self.fns.device_seconds(i, [q], self.reported))
      for p in self.base:
        self.sums[(i, p)] = per[p] if (i, p) not in self.sums else self.sums[(i, p)] + per[p]
      self.scales_done[i] += seen
    if len(self.models) > 1 and len(at_q) == len(self.models):
      self.tally.add('fusion', {p: fuse([post[(i, p)] for i in at_q]) for p in self.base}, seen, (q,),
                     _total([self.fns.device_seconds(i, [q], self.reported) for i in at_q]))

  def add_multiscale(self) -> None:
    """Multi-scale: each model over its scales; the fusion of the models, each over its own scales."""
    models, base, fns = self.models, self.base, self.fns
    full = {i: {p: self.sums[(i, p)] / len(m.scales) for p in base} for i, m in enumerate(models)}
    complete = [self.scales_done[i] == len(m.scales) for i, m in enumerate(models)]
    for i, m in enumerate(models):
      if len(m.scales) > 1:
        self.tally.add(self.labels_of[i], full[i], complete[i], m.scales,
                       fns.device_seconds(i, m.scales, self.reported))
    if len(models) > 1 and any(m.scales != models[0].scales or len(m.scales) > 1 for m in models):
      seconds = _total([fns.device_seconds(i, m.scales, self.reported) for i, m in enumerate(models)])
      self.tally.add('fusion', {p: fuse([full[i][p] for i in full]) for p in base}, np.all(complete, axis=0),
                     self.scales, seconds)


def _result(run: _Pass, *, flip: bool, batch_size: int, return_posteriors: bool) -> EvalResult:
  """eval.json's content (and this process's posteriors, if asked for) after the pass."""
  split, fns = run.split, run.fns
  n_unreadable = int(np.sum(_allgather(np.asarray([len(split.unreadable)], np.int64))))
  out = EvalResult({
      'models': [{'label': label, 'name': _arch_name(m.model), 'checkpoint': m.checkpoint, 'step': m.step,
                  'image_size': m.model.image_size,
                  'train_scale': train_scale_label(*(m.train_scale or (None, None))),
                  'test_scales': list(m.scales)} for label, m in zip(run.labels_of, run.models)],
      'protocols': list(run.reported),
      'flip': bool(flip),
      'results': run.tally.results(),
      'num_images': split.n - n_unreadable,
      'split_size': split.n,
      'unreadable': n_unreadable,
      # Per scale: dense shapes (one per bucket), crop extraction (a small gather per bucket and crop kind),
      # the crop network (one shape per crop protocol, the same at every scale).
      'compiled_shapes': {str(q): {k: len(v) for k, v in fns.shapes[q].items()} for q in run.scales},
      'buckets': {str(q): split.buckets[q] for q in run.scales},  # images per bucket shape
      'batch_size': batch_size,
      'devices': run.mesh.devices.size,
      'processes': jax.process_count(),
      'compile_s': fns.compile_s,
      'wall_s': time.perf_counter() - run.t_start,
  })
  if split.unreadable:
    out['unreadable_records'] = split.unreadable[:100]  # this process's
  if return_posteriors:
    out.posteriors, out.labels, out.indices = run.tally.kept, split.labels, np.arange(split.lo, split.hi)
  return out


def _total(seconds: Sequence[Mapping[str, float]]) -> dict[str, float]:
  return {p: sum(s[p] for s in seconds) for p in seconds[0]}
