"""Image descriptors from VGG nets, as in the paper's Appendix B, and their cache.

An image is rescaled so that its smaller side is Q and goes through the fully convolutional network; the fc7
activations (4096-D, after ReLU) are averaged over the map, then averaged with those of the horizontally
flipped image (``vggjax.evaluation.descriptor_fn``). Descriptors of several scales Q are averaged
('average') or concatenated ('stack') and L2-normalised (``combine_scales``); the descriptors of several nets
(D and E) are stacked (``stack_nets``).

``Descriptors`` computes them: for images (``vggjax.features.extract``), or for every image of a split under
a ``Net``, cached per net, scale, flip setting and split in chunks written as they are computed
(``DescriptorCache``), so an interrupted run resumes where it stopped and a second run with other SVM or
combination options computes nothing. The cache key holds a hash of the net's parameter values and
normalisation, the scale, the flip setting and a fingerprint of the split (``data.examples.fingerprint``);
the cache keeps the raw (unnormalised) pooled fc7, so averaging and stacking are exact from the same files.
The object also holds the compiled functions, one per architecture, normalisation and flip setting, so the
nets, splits and scales of a run share them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from vggjax import checkpoints, runlog
from vggjax.data.examples import Examples, fingerprint
from vggjax.evaluation import ImageEvaluator, ImageSettings, descriptor_fn, posterior_fn
from vggjax.preprocessing import test_scales

log = logging.getLogger('vggjax')

COMBINE = ('average', 'stack')
PAPER_SCALES = test_scales(256, 512, multiscale=True)  # (256, 384, 512): multi-scale Q for S in [256; 512]
CACHE_VERSION = 1
CHUNK = 512  # images per cache file: the unit of resumption


def check_combine(combine: str) -> None:
  if combine not in COMBINE:
    raise ValueError(f'unknown combine {combine!r}; valid: {", ".join(COMBINE)}')


def l2_normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def combine_scales(per_scale: Sequence[np.ndarray], combine: str = 'average') -> np.ndarray:
  """The paper's multi-scale descriptor: the per-scale descriptors averaged (D) or stacked (D x scales),
  then L2-normalised (what vggjax.features.extract returns)."""
  check_combine(combine)
  stacked = [np.asarray(d, np.float64) for d in per_scale]
  x = np.mean(stacked, axis=0) if combine == 'average' else np.concatenate(stacked, axis=1)
  return l2_normalize(x)


def stack_nets(per_net: Sequence[np.ndarray]) -> np.ndarray:
  """Several nets' descriptors (each L2-normalised) side by side, L2-normalised again (the paper's D & E)."""
  return l2_normalize(np.concatenate([l2_normalize(d) for d in per_net], axis=1))


# ----------------------------------------------------------------------------------------------------------
# Nets and the cache.


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


def _read_chunk(examples: Examples, start: int, stop: int) -> tuple[list, list[bool]]:
  """The decoded images of examples[start:stop] (None where unreadable) and which were readable."""
  images, ok = [], []
  for i in range(start, stop):
    try:
      images.append(examples.image(i))
      ok.append(True)
    except Exception as e:  # noqa: BLE001 - a corrupt file is left out, never the end of the run
      log.warning('unreadable image %s (%s: %s): left out', examples.describe(i), type(e).__name__, e)
      images.append(None)
      ok.append(False)
  return images, ok


def _compute(evaluator: ImageEvaluator, cache: DescriptorCache, net: Net, examples: Examples,
             keys: Mapping[int, str], flip: bool, progress: bool) -> dict:
  """The descriptors at the scales of `keys` (scale -> cache key), chunk by chunk, resuming from the
  cached chunks; each finished scale goes into the cache."""
  n = len(examples)
  width = int(np.shape(net.variables['params']['fc7']['kernel'])[-1])
  variables = jax.device_put(net.variables)
  parts: dict[int, list[np.ndarray]] = {q: [] for q in keys}
  bar = runlog.progress_bar(n * len(keys), f'descriptors {net.label} {examples.name}', unit='img',
                            enabled=progress)
  for start in range(0, n, CHUNK):
    stop = min(start + CHUNK, n)
    missing = []
    for q, k in keys.items():
      cached = cache.chunk(k, start)
      if cached is not None:
        parts[q].append(cached)
        bar.update(stop - start)
      else:
        missing.append((q, k))
    if not missing:
      continue
    images, ok = _read_chunk(examples, start, stop)
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
  done = {}
  for q, k in keys.items():
    done[q] = np.concatenate(parts[q]) if parts[q] else np.zeros((0, width), np.float32)
    cache.finish(k, done[q])
  return done


# ----------------------------------------------------------------------------------------------------------
# The computer.


class Descriptors:
  """Descriptors and the nets' own posteriors, through compiled functions this object keeps (one per
  architecture, normalisation and flip setting), cached per split in ``cache`` (none: nothing is kept)."""

  def __init__(self, cache: DescriptorCache | None = None, *, batch_size: int = 32, progress: bool = False):
    self.cache = cache or DescriptorCache(None)
    self.batch_size, self.progress = int(batch_size), bool(progress)
    self._compiled: dict[tuple, Callable] = {}

  def _fn(self, kind: str, meta: Mapping, flip: bool) -> Callable:
    key = (kind, json.dumps([meta['model'], meta.get('normalization')], sort_keys=True, default=str), flip)
    if key not in self._compiled:
      make = descriptor_fn if kind == 'fc7' else posterior_fn
      self._compiled[key] = make(checkpoints.model_from_meta(meta), checkpoints.normalization_from_meta(meta),
                                 flip)
    return self._compiled[key]

  def _evaluator(self, kind: str, meta: Mapping, scales: Sequence[int], flip: bool,
                 desc: str = '') -> ImageEvaluator:
    settings = ImageSettings(scales=tuple(int(q) for q in scales), style='torchvision',
                             batch_size=self.batch_size, progress=self.progress, desc=desc)
    return ImageEvaluator(self._fn(kind, meta, flip), settings)

  @staticmethod
  def _check_scales(meta: Mapping, scales: Sequence[int], what: str = '') -> list[int]:
    size = checkpoints.model_from_meta(meta).image_size
    scales = [int(q) for q in scales]
    if not scales or min(scales) < size:
      raise ValueError(f'scales {scales} must be given and at least the training size {size}{what}')
    return scales

  def of_images(self, variables: Any, meta: Mapping, images: Sequence[Any], scales: Sequence[int], *,
                flip: bool = True) -> list[np.ndarray]:
    """Per scale, the raw descriptors (N, D) of images (uint8 RGB arrays or paths), decoded a chunk at a
    time (uncached)."""
    scales = self._check_scales(meta, scales)
    per_scale = self._evaluator('fc7', meta, scales, flip, 'features').run(variables, list(images))
    width = int(np.shape(variables['params']['fc7']['kernel'])[-1])
    return [np.zeros((0, width), np.float32) if d is None else d for d in per_scale]

  def per_scale(self, net: Net, examples: Examples, scales: Sequence[int], *, flip: bool = True,
                examples_fp: str | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """Per scale Q, the raw descriptors (N, D) of every image of a split under one net, unnormalised; rows
    of unreadable images are NaN. Returns (list over scales, valid mask (N,)). Cached chunks and finished
    scales are reused."""
    scales = self._check_scales(net.meta, scales, f' of {net.path}')
    fp = examples_fp or fingerprint(examples)
    keys = dict(zip(scales, [_cache_key(net, fp, q, flip) for q in scales]))
    done = {q: self.cache.load(k) for q, k in keys.items()}
    todo = [q for q in scales if done[q] is None]
    if todo:
      evaluator = self._evaluator('fc7', net.meta, todo, flip)
      done.update(_compute(evaluator, self.cache, net, examples, {q: keys[q] for q in todo}, flip,
                           self.progress))
    per_scale = [done[q] for q in scales]
    valid = np.all(np.isfinite(per_scale[0]), axis=1) if len(examples) else np.zeros(0, bool)
    return per_scale, valid

  def __call__(self, nets: Sequence[Net], examples: Examples, scales: Sequence[int] = PAPER_SCALES,
               combine: str = 'average', *, flip: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors (N, D), valid (N,)) of a split: per net, scales combined; nets stacked."""
    check_combine(combine)
    fp = fingerprint(examples)
    per_net, valid = [], np.ones(len(examples), bool)
    for net in nets:
      per_scale, ok = self.per_scale(net, examples, scales, flip=flip, examples_fp=fp)
      valid &= ok
      per_net.append(combine_scales([np.nan_to_num(d) for d in per_scale], combine))
    x = per_net[0] if len(per_net) == 1 else stack_nets(per_net)
    return x, valid

  def posteriors(self, net: Net, examples: Examples, indices: Sequence[int], scales: Sequence[int], *,
                 flip: bool = True) -> np.ndarray:
    """The net's own classifier on images of a split: dense softmax posteriors (N, classes) averaged over
    the image and its flip and over scales (paper 3.2)."""
    num_classes = int(net.meta['model']['num_classes'])
    evaluator = self._evaluator('posteriors', net.meta, scales, flip)
    variables = jax.device_put(net.variables)
    indices = list(indices)
    total = np.zeros((len(indices), num_classes), np.float64)
    bar = runlog.progress_bar(len(indices) * len(scales), f'classify {net.label}', unit='img',
                              enabled=self.progress)
    for start in range(0, len(indices), CHUNK):
      chunk = [examples.image(i) for i in indices[start:start + CHUNK]]
      for q in scales:
        total[start:start + len(chunk)] += np.stack(evaluator.at_scale(variables, chunk, int(q), bar))
    bar.close()
    return (total / len(scales)).astype(np.float32)
