"""The paper's evaluation protocols (sections 3.2 and 4) over every image of a validation split.

    python -m vggjax.evaluate --workdir=runs/D                        # the run's latest checkpoint and config
    python -m vggjax.evaluate --config=configs/vgg16.py --workdir=runs/D --multiscale
    python -m vggjax.evaluate --config=configs/vgg16.py --workdir=runs/D_E --checkpoint=runs/D \\
        --checkpoint=runs/E --multiscale --protocols=dense,multicrop,dense+multicrop     # fusion of D and E

Protocols. The posterior of an image is the softmax of its class scores; top-1/top-5 errors are counted on
the averaged posteriors.

* ``single``: rescale the image isotropically so that its smaller side is Q, take the central crop at the
  training size (exactly what validation during training does);
* ``dense``: rescale to Q and run the fully convolutional network over the whole image; the class score map
  is averaged over space and the softmax posteriors of the image and of its horizontal flip are averaged;
* ``multicrop``: rescale to Q, a regular 5x5 grid of crops at the training size (offsets
  ``k * (H - size) // 4`` and ``k * (W - size) // 4``, k = 0..4, so the grid's centre is the single crop)
  and the mirror image of each crop (the crops of the flipped image on the mirrored grid): 50 crops per
  scale, posteriors averaged;
* multi-scale: any protocol at several Q, posteriors averaged. Defaults follow the paper:
  {S - 32, S, S + 32} for a fixed training scale S, {Smin, (Smin + Smax) / 2, Smax} for a jittered one;
  the single-scale default is Q = S, or (Smin + Smax) / 2;
* ``dense+multicrop``: the dense and multi-crop posteriors averaged (the paper's best single net);
* fusion: with several checkpoints, every protocol is reported per model and for the average of the models'
  posteriors (each model at its own scales).

The flips are the paper's test-set augmentation; ``flip=False`` (``--flip=false``; the command's default
follows the config's data.flip) leaves them out for data trained without flips whose classes are not
mirror-symmetric (digits, text): dense is then the image alone, multi-crop the 25 grid crops.

Exactness on images of any aspect ratio. Dense evaluation needs the whole image, so images of different
shapes cannot share a batch as they are. Each rescaled image (smaller side exactly Q, the other side L as
``vggjax.data.transforms.rescaled_size`` gives it) is placed at the top-left of a bucket shape: the smaller
side Q and the longer side padded up to ``Q * r`` rounded up to a multiple of 32 for the smallest r in
``aspect_buckets`` (1, 4/3, 3/2, 2, 3 by default; beyond the last, a multiple of Q), in either orientation.
The padding is then made invisible: the input of every convolution (conv1_1 ... conv5_x and fc6) is
multiplied by the mask of the image's valid region at that resolution (floor(h / 2^b) x floor(w / 2^b)
after b poolings), which is the zero padding the unpadded network would see there, and the class score map
is averaged over the cells the unpadded network has ((h // 32 - k + 1) x (w // 32 - k + 1), k = fc6's
extent). The result equals the network run on the unpadded image (to float rounding; tested), with no
change of aspect ratio; the price is the compute spent on the padding (at most the gap to the next bucket).
The number of compiled dense shapes is the number of buckets that occur at a scale (at most twice the
number of aspect buckets, plus rare panoramas), reported in eval.json. Crops (single and multi-crop) are cut
on the device from the same padded images by a small per-bucket gather, and the network then runs on crops
of one shape: one compiled network for all scales.

Sharding. The global batch is split over the 'data' axis of a mesh of all devices of all processes, as in
training. Process p reads a contiguous block of the split; all processes run the same sequence of batch
shapes (the bucket counts are agreed with one all-gather), padded with masked slots, so every image is
evaluated exactly once; per-image posteriors stay on the process that read the image, and the hit counts
are summed over processes at the end. Images that cannot be read are left out, logged and counted
(``unreadable`` in eval.json); ``num_images`` is what each error was computed on. Host memory: per model and
protocol, a float32 posterior per image and class of this process's images at the current scale and
summed over scales (200 MB each for ImageNet's 50,000 x 1,000 on one host). Device memory: per device,
``batch_size / devices`` padded images (dense; the flip runs after the image) or 2 x crops_per_step crops
of each of them (multi-crop); lower --batch_size for large Q.

Output: WORKDIR/eval.json (per model and fused, per protocol, per scale set: top1_err, top5_err,
num_images, img_per_s; compiled shapes and buckets per scale) and a table laid out like the paper's
Tables 3-5 on stdout. The host decodes and rescales in threads; the device does everything else
(docs/design.md, decision 4: uint8 is shipped, the normalisation runs in the jitted functions).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vggjax import cli

if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  cli.add_config_roots(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from vggjax import checkpoints, models, parallel, preprocessing  # noqa: E402
from vggjax.preprocessing import Normalization, normalize  # noqa: E402

log = logging.getLogger('vggjax')

PROTOCOLS = ('single', 'dense', 'multicrop', 'dense+multicrop')
BASE_PROTOCOLS = ('single', 'dense', 'multicrop')
GRID = 5  # the multi-crop grid is GRID x GRID, times 2 flips
ASPECT_BUCKETS = (1.0, 4 / 3, 1.5, 2.0, 3.0)
BUCKET_MULTIPLE = 32
DEFAULT_PER_DEVICE_BATCH = 8
RESULTS_FILE = 'eval.json'


# ----------------------------------------------------------------------------------------------------------
# Scales, grids and buckets (host side, pure).


def single_scale(scale_min: int, scale_max: int) -> int:
  """The paper's single test scale (4.1): Q = S for a fixed S, (Smin + Smax) / 2 for a jittered S."""
  return preprocessing.single_test_scale(scale_min, scale_max)


def default_scales(scale_min: int, scale_max: int, image_size: int, multiscale: bool = False
                   ) -> tuple[int, ...]:
  """The paper's test scales (4.1, 4.2): one Q, or {S-32, S, S+32} (fixed S), {Smin, mid, Smax} (jittered).
  Scales below the training size (S - 32 when S is the training size) are left out."""
  qs = preprocessing.test_scales(scale_min, scale_max, multiscale)
  kept = tuple(q for q in qs if q >= image_size)
  if len(kept) < len(qs):
    log.warning('test scales %s: dropped %s, below the training size %d', qs,
                [q for q in qs if q < image_size], image_size)
  return kept


def train_scale_label(scale_min: int | None, scale_max: int | None) -> str:
  """'256' for a fixed S, '[256;512]' for a jittered one (the paper's notation), '-' if unknown."""
  if scale_min is None:
    return '-'
  return str(scale_min) if scale_min == scale_max else f'[{scale_min};{scale_max}]'


def grid_offsets(height: int, width: int, size: int, n: int = GRID) -> list[tuple[int, int]]:
  """(top, left) of the n x n regular grid of size x size crops of a height x width image, row-major:
  top = k * (height - size) // (n - 1), k = 0..n-1 (and likewise left). n = 1: the central crop."""
  if min(height, width) < size:
    raise ValueError(f'a {size}x{size} crop does not fit a {height}x{width} image')
  if n == 1:
    return [((height - size) // 2, (width - size) // 2)]
  tops = [k * (height - size) // (n - 1) for k in range(n)]
  lefts = [k * (width - size) // (n - 1) for k in range(n)]
  return [(t, l) for t in tops for l in lefts]


def _round_up(x: float, multiple: int) -> int:
  return math.ceil(x / multiple - 1e-9) * multiple


def bucket_side(long_side: int, q: int, aspects: Sequence[float] = ASPECT_BUCKETS) -> int:
  """The padded longer side for an image rescaled to smaller side q and longer side `long_side`."""
  if long_side < q:
    raise ValueError(f'the longer side {long_side} is below the smaller side {q}')
  for r in sorted(aspects):
    side = q if r == 1 else max(q, _round_up(q * r, BUCKET_MULTIPLE))
    if long_side <= side:
      return side
  return _round_up(long_side, max(BUCKET_MULTIPLE, _round_up(q, BUCKET_MULTIPLE)))


def bucket_shape(height: int, width: int, q: int, aspects: Sequence[float] = ASPECT_BUCKETS
                 ) -> tuple[int, int]:
  """The padded (height, width) of a rescaled image whose smaller side is q."""
  if min(height, width) != q:
    raise ValueError(f'a rescaled image has its smaller side at q={q}, got {height}x{width}')
  if height <= width:
    return q, bucket_side(width, q, aspects)
  return bucket_side(height, q, aspects), q


# ----------------------------------------------------------------------------------------------------------
# On the device: masked dense evaluation, crops, posteriors.


_CONV_NAME = re.compile(r'^conv(\d+)_\d+$')


def _conv_input_level(context, num_pools: int) -> int | None:
  """How many poolings precede the convolution being called (None if the call is not a convolution)."""
  if context.method_name != '__call__' or not isinstance(context.module, nn.Conv):
    return None
  name = context.module.name or ''
  m = _CONV_NAME.match(name)
  if m:
    return int(m.group(1)) - 1
  return num_pools if name == 'fc6' else None


def _valid_mask(hw: jax.Array, level: int, shape: Sequence[int]) -> jax.Array:
  """(B, h, w, 1) bool: the cells of an (B, h, w, C) map inside each image's valid region after `level`
  poolings (floor(height / 2^level) x floor(width / 2^level))."""
  rows = jnp.arange(shape[1])[None, :] < (hw[:, 0] >> level)[:, None]
  cols = jnp.arange(shape[2])[None, :] < (hw[:, 1] >> level)[:, None]
  return (rows[:, :, None] & cols[:, None, :])[..., None]


def dense_logits(model: models.VGG, variables: Any, x: jax.Array, hw: jax.Array) -> jax.Array:
  """Dense evaluation of normalised images (B, H, W, 3) padded at the bottom and right: (B, classes), the
  class score map averaged over the cells of each image's valid region hw (B, 2) = (height, width). Equal
  to ``model.apply(variables, x[i, :h, :w])`` for each image i (see the module docstring)."""
  num_pools = len(model.stages)
  hw = hw.astype(jnp.int32)

  def mask_conv_inputs(next_fun, args, kwargs, context):
    level = _conv_input_level(context, num_pools)
    if level is not None:
      inputs = args[0]
      inputs = inputs * _valid_mask(hw, level, inputs.shape).astype(inputs.dtype)
      args = (inputs,) + tuple(args[1:])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(mask_conv_inputs):
    score_map = model.apply(variables, x, train=False, method='score_map')
  cells = (hw >> num_pools) - model.fc6_kernel + 1  # (B, 2): the unpadded network's score map
  mask = _valid_mask(cells, 0, score_map.shape).astype(score_map.dtype)
  count = (cells[:, 0] * cells[:, 1]).astype(score_map.dtype)
  return jnp.sum(score_map * mask, axis=(1, 2)) / count[:, None]


def flip_valid(images: jax.Array, widths: jax.Array) -> jax.Array:
  """Horizontal flip of each image's valid region (the first `width` columns), which stays at the left."""
  cols = jnp.arange(images.shape[2])

  def one(image, w):
    return jnp.take(image, jnp.where(cols < w, w - 1 - cols, cols), axis=1)

  return jax.vmap(one)(images, widths)


def dense_posteriors(model: models.VGG, variables: Any, images: jax.Array, hw: jax.Array,
                     norm: Normalization = Normalization(), flip: bool = True) -> jax.Array:
  """The dense protocol on padded uint8 images: the softmax of the averaged class score map, averaged
  with that of the horizontally flipped image (if flip)."""
  if not flip:
    return jax.nn.softmax(dense_logits(model, variables, normalize(images, norm), hw))
  both = jnp.stack([images, flip_valid(images, hw[:, 1])])
  probs = jax.lax.map(lambda im: jax.nn.softmax(dense_logits(model, variables, normalize(im, norm), hw)),
                      both)
  return jnp.mean(probs, axis=0)


def crop_offsets(hw: jax.Array, size: int, n: int) -> tuple[jax.Array, jax.Array]:
  """(tops, lefts), each (B, n*n), of grid_offsets for every image's valid region on the device."""
  h, w = hw[:, 0], hw[:, 1]
  if n == 1:
    return ((h - size) // 2)[:, None], ((w - size) // 2)[:, None]
  k = jnp.arange(n)
  tops = (k[None, :] * (h[:, None] - size)) // (n - 1)
  lefts = (k[None, :] * (w[:, None] - size)) // (n - 1)
  return jnp.repeat(tops, n, axis=1), jnp.tile(lefts, (1, n))


def extract_crops(images: jax.Array, hw: jax.Array, size: int, n: int) -> jax.Array:
  """(B, n*n, size, size, 3): the grid crops (n = GRID, row-major) or the central crop (n = 1) of each
  image's valid region."""
  tops, lefts = crop_offsets(hw.astype(jnp.int32), size, n)

  def one(image, t, l):
    return jax.lax.dynamic_slice(image, (t, l, 0), (size, size, image.shape[-1]))

  return jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)))(images, tops, lefts)


def crop_posteriors(model: models.VGG, variables: Any, crops: jax.Array, flips: bool,
                    norm: Normalization = Normalization(), per_step: int = 5) -> jax.Array:
  """Mean softmax over each image's crops (B, K, size, size, 3) and, if flips, their mirror images:
  (B, classes). The network runs on `per_step` crop positions (x 2 with flips) of every image at a time."""
  b, k = crops.shape[:2]
  g = math.gcd(k, per_step)
  # (K/g, B, g, ...): the batch axis stays the major one of each step's crops (no resharding).
  groups = jnp.swapaxes(crops.reshape(b, k // g, g, *crops.shape[2:]), 0, 1)

  def step(c):  # c: (B, g, size, size, 3)
    if flips:  # each crop next to its mirror image: the batch axis stays major (no resharding)
      c = jnp.stack([c, c[:, :, :, ::-1]], axis=2)
    x = normalize(c.reshape(-1, *c.shape[-3:]), norm)
    p = jax.nn.softmax(model.apply(variables, x, train=False))
    return p.reshape(b, -1, p.shape[-1]).sum(axis=1)

  return jnp.sum(jax.lax.map(step, groups), axis=0) / (k * (2 if flips else 1))


# ----------------------------------------------------------------------------------------------------------
# Errors and fusion (host side).


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


# ----------------------------------------------------------------------------------------------------------
# Models.


@dataclasses.dataclass
class EvalModel:
  """One network to evaluate: the module, its variables, its test scales and how its inputs are made."""
  model: models.VGG
  variables: Any
  scales: tuple[int, ...]
  norm: Normalization = Normalization()
  label: str = ''
  train_scale: tuple[int, int] | None = None  # (Smin, Smax) of training, if known
  checkpoint: str = ''
  step: int | None = None

  def __post_init__(self):
    self.scales = tuple(sorted({int(q) for q in self.scales}))
    if not self.scales:
      raise ValueError('a model needs at least one test scale')
    size = self.model.image_size
    if self.scales[0] < size:
      raise ValueError(f'test scale Q={self.scales[0]} is below the training size {size}: the crop and the '
                       f'dense evaluation need Q >= {size}')
    self.label = self.label or _arch_label(self.model)


def _arch_name(model: models.VGG) -> str:
  """The configuration's vggjax name (vgg16, ...) from the module's layer table."""
  for name, arch in models.ARCHS.items():
    if arch.stages == model.stages and arch.lrn == model.lrn and arch.batch_norm == model.batch_norm:
      return name
  return 'vgg'


def _arch_label(model: models.VGG) -> str:
  """The paper's letter (A, A-LRN, B, C, D, E) where there is one, else the vggjax name."""
  arch = models.ARCHS.get(_arch_name(model))
  return (arch.paper_name if arch else None) or _arch_name(model)


def load_model(path: str, *, scales: Sequence[int] | None = None, multiscale: bool = False,
               fallback_train_scale: tuple[int, int] | None = None, dtype: str | None = None) -> EvalModel:
  """An EvalModel from a training workdir (latest checkpoint), a checkpoint step directory or a weights
  directory. Test scales: `scales`, else the paper's defaults for the training scale S recorded with the
  weights (or `fallback_train_scale` when they record none, e.g. imported weights)."""
  variables, meta = checkpoints.load_weights(path)
  overrides = {'dtype': dtype} if dtype else {}
  model = checkpoints.model_from_meta(meta, dropout_rate=0.0, **overrides)
  data = meta.get('data') or {}
  train_scale = ((int(data['scale_min']), int(data['scale_max'])) if 'scale_min' in data else None)
  if scales:
    qs = tuple(int(q) for q in scales)
  else:
    s = train_scale or fallback_train_scale
    if s is None:
      raise ValueError(f'{path} records no training scale: pass --scales (or a config with data.scale_min)')
    qs = default_scales(s[0], s[1], model.image_size, multiscale)
  return EvalModel(model=model, variables=variables, scales=qs,
                   norm=checkpoints.normalization_from_meta(meta), label=_arch_label(model),
                   train_scale=train_scale, checkpoint=str(path), step=meta.get('step'))


def _unique_labels(labels: Sequence[str]) -> list[str]:
  out = []
  for i, label in enumerate(labels):
    n = labels[:i].count(label)
    out.append(label if labels.count(label) == 1 else f'{label}#{n + 1}')
  return out


# ----------------------------------------------------------------------------------------------------------
# Host side: reading, rescaling, planning the batches.


class _Reader:
  """Reads a source's records (encoded bytes or arrays): dimensions first, rescaled images later."""

  def __init__(self, source, dct_scaling: bool = True):
    from vggjax.data import transforms
    self.source, self.dct_scaling, self.t = source, dct_scaling, transforms

  def _record(self, index: int):
    if hasattr(self.source, 'record'):
      return self.source.record(index)
    item = self.source[index]
    return item['image'], item['label']

  def describe(self, index: int) -> str:
    return self.source.describe(index) if hasattr(self.source, 'describe') else f'record {index}'

  def dims(self, index: int) -> tuple[int, int, int]:
    """(height, width, label), or raises for an unreadable record."""
    raw, label = self._record(index)
    h, w = self.t.dimensions(raw)
    return int(h), int(w), int(label)

  def rescaled(self, index: int, q: int, height: int, width: int) -> np.ndarray:
    raw, _ = self._record(index)
    h, w = self.t.rescaled_size(height, width, q)
    image = self.t.resize(self.t.load(raw, q, self.dct_scaling), h, w)
    if image.shape[:2] != (h, w):
      raise ValueError(f'decoded to {image.shape[:2]}, expected {(h, w)}')
    return image


def _allgather(x: np.ndarray) -> np.ndarray:
  """(process_count, ...) of every process's x (x[None] in a single process)."""
  if jax.process_count() == 1:
    return np.asarray(x)[None]
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(x)))


@dataclasses.dataclass
class _Batch:
  q: int
  shape: tuple[int, int]
  positions: np.ndarray  # local image positions, -1 for padding


def plan_batches(shapes_by_position: Mapping[int, tuple[int, int]], q: int, local_batch: int,
                 gather: Callable[[np.ndarray], np.ndarray] = _allgather
                 ) -> tuple[list[_Batch], dict[tuple[int, int], int]]:
  """The batches of one scale: per bucket shape (sorted), this process's images in chunks of local_batch,
  padded (position -1) up to the largest number of batches any process has in that bucket; and the number
  of images of every process in each bucket shape."""
  local: dict[tuple[int, int], list[int]] = {}
  for pos in sorted(shapes_by_position):
    local.setdefault(tuple(shapes_by_position[pos]), []).append(pos)
  rows = np.asarray([(h, w, len(v)) for (h, w), v in sorted(local.items())], np.int64).reshape(-1, 3)
  k = int(np.max(gather(np.asarray([len(rows)], np.int64))))
  padded = np.zeros((max(k, 1), 3), np.int64)
  padded[:len(rows)] = rows
  everyone = gather(padded).reshape(-1, 3)
  needed: dict[tuple[int, int], int] = {}
  counts: dict[tuple[int, int], int] = {}
  for h, w, count in everyone:
    if count:
      key = (int(h), int(w))
      needed[key] = max(needed.get(key, 0), -(-int(count) // local_batch))
      counts[key] = counts.get(key, 0) + int(count)
  batches = []
  for shape in sorted(needed):
    mine = local.get(shape, [])
    for b in range(needed[shape]):
      chunk = np.full((local_batch,), -1, np.int64)
      part = mine[b * local_batch:(b + 1) * local_batch]
      chunk[:len(part)] = part
      batches.append(_Batch(q, shape, chunk))
  return batches, counts


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array sharded on its first axis, in order."""
  if jax.process_count() == 1:
    return np.asarray(x)
  parts: dict[int, np.ndarray] = {}
  for shard in x.addressable_shards:
    parts.setdefault(shard.index[0].start or 0, np.asarray(shard.data))
  return np.concatenate([parts[k] for k in sorted(parts)])


# ----------------------------------------------------------------------------------------------------------
# The evaluation.


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


def _read_split(reader: _Reader, lo: int, hi: int, num_threads: int):
  """Dimensions and labels of records lo..hi-1 (header reads in threads); unreadable ones are left out."""
  dims = np.zeros((hi - lo, 2), np.int64)
  labels = np.full((hi - lo,), -1, np.int64)
  readable = np.zeros((hi - lo,), bool)
  unreadable = []

  def read(pos):
    try:
      return pos, reader.dims(lo + pos), None
    except Exception as e:  # noqa: BLE001 - a bad record must not end the evaluation
      return pos, None, f'{type(e).__name__}: {e}'[:300]

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for pos, d, err in pool.map(read, range(hi - lo)):
      if d is None:
        unreadable.append(reader.describe(lo + pos))
        log.warning('skipping unreadable record %s: %s', reader.describe(lo + pos), err)
      else:
        dims[pos], labels[pos], readable[pos] = d[:2], d[2], True
  return dims, labels, readable, unreadable


def _prefetched(pool, fn, items: Sequence, depth: int):
  """Yields (item, fn(item)) in order, with up to `depth` calls running ahead in the pool."""
  pending = collections.deque()
  for k, item in enumerate(items):
    while len(pending) <= depth and k + len(pending) < len(items):
      nxt = items[k + len(pending)]
      pending.append((nxt, pool.submit(fn, nxt)))
    done, future = pending.popleft()
    yield done, future.result()


def evaluate(eval_models: Sequence[EvalModel], source, *, protocols: Sequence[str] = PROTOCOLS,
             batch_size: int = 0, mesh=None, num_threads: int = 0,
             aspect_buckets: Sequence[float] = ASPECT_BUCKETS, dct_scaling: bool = True,
             flip: bool = True, crops_per_step: int = 5, progress: bool = True,
             return_posteriors: bool = False) -> dict:
  """Evaluates one or several models on every image of `source` with the requested protocols, at each
  model's scales and over all of them, per model and fused (several models). Returns eval.json's content.

  source: len(source), and source.record(i) -> (uint8 image or encoded bytes, label) or
    source[i] -> {'image', 'label'} (vggjax.data.pipeline.open_source gives one).
  batch_size: global images per step (a multiple of the device count); 0: DEFAULT_PER_DEVICE_BATCH per device.
  flip: the paper's flips (dense: the image and its mirror image; multi-crop: 25 crops x 2). Turn them off for
    data whose classes are not mirror-symmetric (digits, text), trained without flips.
  crops_per_step: grid positions of every image the network runs on at once (x 2 with the flips).
  return_posteriors: also '_posteriors' {(model label, protocol, scale key): (this process's images, C)},
    '_labels' and '_indices' (this process's records, in order).
  """
  protocols = tuple(dict.fromkeys(protocols))
  bad = [p for p in protocols if p not in PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f'unknown protocol(s) {bad}; valid: {", ".join(PROTOCOLS)}')
  base = [p for p in BASE_PROTOCOLS if p in protocols or (p != 'single' and 'dense+multicrop' in protocols)]
  reported = [p for p in PROTOCOLS if p in base or p in protocols]
  eval_models = list(eval_models)
  if not eval_models:
    raise ValueError('nothing to evaluate: no model given')
  labels_of = _unique_labels([m.label for m in eval_models])
  classes = {m.model.num_classes for m in eval_models}
  if len(classes) != 1:
    raise ValueError(f'fusion needs models with the same classes; got num_classes {sorted(classes)}')
  num_classes = classes.pop()
  mesh = mesh if mesh is not None else parallel.make_mesh()
  n_dev, n_proc, proc = mesh.devices.size, jax.process_count(), jax.process_index()
  batch_size = batch_size or DEFAULT_PER_DEVICE_BATCH * n_dev
  parallel.check_batch_size(batch_size, mesh)
  local_batch = batch_size // n_proc
  num_threads = num_threads or min(16, os.cpu_count() or 1)
  t_start = time.perf_counter()

  # This process's images: a contiguous block of the split. Their dimensions and labels first.
  n = len(source)
  lo, hi = proc * n // n_proc, (proc + 1) * n // n_proc
  reader = _Reader(source, dct_scaling)
  log.info('reading the sizes of %d images (of %d) in %d threads', hi - lo, n, num_threads)
  dims, labels, readable, unreadable = _read_split(reader, lo, hi, num_threads)
  log.info('read the sizes in %.1f s', time.perf_counter() - t_start)
  bad_labels = int(np.sum(readable & ((labels < 0) | (labels >= num_classes))))
  if int(np.sum(_allgather(np.asarray([bad_labels])))):
    raise ValueError(f'labels outside [0, {num_classes}) in the split: the models have {num_classes} classes')

  # The batches of every scale: per bucket shape, the same sequence on every process.
  all_scales = sorted({q for m in eval_models for q in m.scales})
  plans, buckets = {}, {}
  for q in all_scales:
    shapes = {int(pos): bucket_shape(*reader.t.rescaled_size(int(dims[pos, 0]), int(dims[pos, 1]), q), q,
                                     aspect_buckets) for pos in np.flatnonzero(readable)}
    plans[q], counts = plan_batches(shapes, q, local_batch)
    buckets[q] = {f'{h}x{w}': c for (h, w), c in sorted(counts.items())}

  def prepare(batch: _Batch):
    hb, wb = batch.shape
    images = np.zeros((local_batch, hb, wb, 3), np.uint8)
    hw = np.tile(np.asarray([hb, wb], np.int32), (local_batch, 1))  # padding slots: a valid, masked shape
    positions, failed = batch.positions.copy(), []
    for j, pos in enumerate(batch.positions):
      if pos >= 0:
        try:
          image = reader.rescaled(lo + int(pos), batch.q, int(dims[pos, 0]), int(dims[pos, 1]))
          images[j, :image.shape[0], :image.shape[1]] = image
          hw[j] = image.shape[:2]
        except Exception as e:  # noqa: BLE001 - a bad record must not end the evaluation
          positions[j] = -1
          failed.append((int(pos), f'{type(e).__name__}: {e}'[:300]))
    return images, hw, positions, failed

  fns = _Functions(eval_models, mesh, crops_per_step, flip)
  tally = _Tally(labels, num_classes, reported, keep=return_posteriors)
  n_local = hi - lo
  sums: dict[tuple[int, str], np.ndarray] = {}  # (model, protocol) -> posteriors summed over its scales
  scales_done = np.zeros((len(eval_models), n_local), np.int64)  # per image, scales it was evaluated at
  bar = None
  if proc == 0 and progress:
    from vggjax import runlog as vlog
    bar = vlog.ProgressBar(sum(len(b) for b in plans.values()))
  steps, images_done = 0, 0
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for q in all_scales:
      at_q = [i for i, m in enumerate(eval_models) if q in m.scales]
      post = {(i, p): np.zeros((n_local, num_classes), np.float32) for i in at_q for p in base}
      seen = np.zeros((n_local,), bool)
      for batch, (images, hw, positions, failed) in _prefetched(pool, prepare, plans[q], num_threads):
        for pos, err in failed:
          readable[pos] = False
          unreadable.append(reader.describe(lo + pos))
          log.warning('skipping unreadable record %s: %s', reader.describe(lo + pos), err)
        g = parallel.global_batch({'image': images, 'hw': hw}, mesh)
        valid = positions >= 0
        for key, rows in fns.run(q, batch.shape, g['image'], g['hw'], at_q, base).items():
          post[key][positions[valid]] = rows[valid]
        seen[positions[valid]] = True
        steps += 1
        images_done += int(valid.sum())
        if bar is not None:
          rate = images_done * n_proc / max(time.perf_counter() - t_start, 1e-9)
          bar.update(steps, Q=q, shape=f'{batch.shape[0]}x{batch.shape[1]}', **{'img/s': round(rate, 1)})
      seen &= readable
      # Rows at this scale, per model and fused; the sums over scales.
      for i in at_q:
        per = {p: post[(i, p)] for p in base}
        tally.add(labels_of[i], per, seen, (q,), fns.device_seconds(i, [q], reported))
        for p in base:
          sums[(i, p)] = per[p] if (i, p) not in sums else sums[(i, p)] + per[p]
        scales_done[i] += seen
      if len(eval_models) > 1 and len(at_q) == len(eval_models):
        tally.add('fusion', {p: fuse([post[(i, p)] for i in at_q]) for p in base}, seen, (q,),
                  _total([fns.device_seconds(i, [q], reported) for i in at_q]))
      del post
  if bar is not None:
    bar.close()

  # Multi-scale: each model over its scales; the fusion of the models, each over its own scales.
  full = {i: {p: sums[(i, p)] / len(m.scales) for p in base} for i, m in enumerate(eval_models)}
  complete = [scales_done[i] == len(m.scales) for i, m in enumerate(eval_models)]
  for i, m in enumerate(eval_models):
    if len(m.scales) > 1:
      tally.add(labels_of[i], full[i], complete[i], m.scales, fns.device_seconds(i, m.scales, reported))
  if len(eval_models) > 1 and any(m.scales != eval_models[0].scales or len(m.scales) > 1
                                 for m in eval_models):
    seconds = _total([fns.device_seconds(i, m.scales, reported) for i, m in enumerate(eval_models)])
    tally.add('fusion', {p: fuse([full[i][p] for i in full]) for p in base}, np.all(complete, axis=0),
              all_scales, seconds)

  n_unreadable = int(np.sum(_allgather(np.asarray([len(unreadable)], np.int64))))
  out = {
      'models': [{'label': label, 'name': _arch_name(m.model), 'checkpoint': m.checkpoint, 'step': m.step,
                  'image_size': m.model.image_size,
                  'train_scale': train_scale_label(*(m.train_scale or (None, None))),
                  'test_scales': list(m.scales)} for label, m in zip(labels_of, eval_models)],
      'protocols': list(reported),
      'flip': bool(flip),
      'results': tally.results(),
      'num_images': n - n_unreadable,
      'split_size': n,
      'unreadable': n_unreadable,
      # Per scale: dense shapes (one per bucket), crop extraction (a small gather per bucket and crop kind),
      # the crop network (one shape per crop protocol, the same at every scale).
      'compiled_shapes': {str(q): {k: len(v) for k, v in fns.shapes[q].items()} for q in all_scales},
      'buckets': {str(q): buckets[q] for q in all_scales},  # images per bucket shape
      'batch_size': batch_size,
      'devices': n_dev,
      'processes': n_proc,
      'compile_s': fns.compile_s,
      'wall_s': time.perf_counter() - t_start,
  }
  if unreadable:
    out['unreadable_records'] = unreadable[:100]  # this process's
  if return_posteriors:
    out.update(_posteriors=tally.kept, _labels=labels, _indices=np.arange(lo, hi))
  return out


def _total(seconds: Sequence[Mapping[str, float]]) -> dict[str, float]:
  return {p: sum(s[p] for s in seconds) for p in seconds[0]}


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def format_table(result: Mapping) -> str:
  """The results laid out like the paper's Tables 3-5: ConvNet config, evaluation method, train S, test Q,
  top-1 and top-5 validation error (%), and the number of images."""
  by_label = {m['label']: m for m in result['models']}
  header = ('ConvNet config', 'evaluation method', 'train S', 'test Q', 'top-1 err (%)', 'top-5 err (%)',
            'images')
  lines = []
  labels = [m['label'] for m in result['models']] + (['fusion'] if 'fusion' in result['results'] else [])
  for label in labels:
    per = result['results'].get(label, {})
    if label == 'fusion':
      config = ' + '.join(f'{m["label"]}' for m in result['models'])
      train = ', '.join(m['train_scale'] for m in result['models'])
    else:
      config, train = label, by_label[label]['train_scale']
    for protocol in result['protocols']:
      for key, entry in per.get(protocol, {}).items():
        lines.append((config, protocol, train, key, f'{100 * entry["top1_err"]:.1f}',
                      f'{100 * entry["top5_err"]:.1f}', str(entry['num_images'])))
  widths = [max(len(row[c]) for row in [header] + lines) for c in range(len(header))]
  fmt = lambda row: ' | '.join(cell.ljust(w) for cell, w in zip(row, widths))  # noqa: E731
  rule = '-+-'.join('-' * w for w in widths)
  return '\n'.join([fmt(header), rule] + [fmt(row) for row in lines])


def write_results(result: Mapping, workdir: str) -> str:
  """WORKDIR/eval.json (atomically; local or gs://); the keys starting with '_' (per-image arrays) are left
  out."""
  from vggjax import runlog as vlog
  directory = checkpoints.absolute(workdir)
  directory.mkdir(parents=True, exist_ok=True)

  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return str(x)
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x

  text = json.dumps(clean({k: v for k, v in result.items() if not k.startswith('_')}), indent=2)
  return str(vlog.write_text(directory / RESULTS_FILE, text))


# ----------------------------------------------------------------------------------------------------------
# The command.


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  f = {}
  f['config'] = config_flags.DEFINE_config_file(
      'config', None, 'The config of the data to evaluate on (configs/*.py[:arg]); default: the workdir\'s '
      'config.json. Override fields with --config.FIELD=VALUE (e.g. --config.data.eval_split=...).',
      lock_config=False)
  f['workdir'] = flags.DEFINE_string('workdir', None, 'Where eval.json goes; also the checkpoint to evaluate '
                                     '(its latest) when no --checkpoint is given.')
  f['checkpoint'] = flags.DEFINE_multi_string(
      'checkpoint', [], 'A training workdir, checkpoint step directory or weights directory; repeat the flag '
      'to fuse several models.')
  f['protocols'] = flags.DEFINE_list('protocols', list(PROTOCOLS), f'Any of {", ".join(PROTOCOLS)}.')
  f['scales'] = flags.DEFINE_list('scales', [], 'Test scales Q for every model (default: the paper\'s, from '
                                  'each model\'s training S).')
  f['multiscale'] = flags.DEFINE_bool('multiscale', False, 'The paper\'s 3 test scales per model: {S-32, S, '
                                      'S+32} (fixed S) or {Smin, (Smin+Smax)/2, Smax} (jittered S).')
  f['flip'] = flags.DEFINE_bool('flip', None, 'Average with the horizontal flips (dense) and use the '
                                'mirrored crops (multi-crop), as the paper. Default: the config\'s data.flip '
                                '(True).')
  f['batch_size'] = flags.DEFINE_integer('batch_size', 0, 'Global images per step (0: '
                                         f'{DEFAULT_PER_DEVICE_BATCH} per device).')
  f['num_threads'] = flags.DEFINE_integer('num_threads', 0,
                                          'Host threads decoding and rescaling (0: up to 16).')
  f['aspect_buckets'] = flags.DEFINE_list('aspect_buckets', [f'{a:.4g}' for a in ASPECT_BUCKETS],
                                          'Aspect ratios of the dense buckets (fewer: fewer compiled shapes, '
                                          'more padding).')
  f['dtype'] = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype (default: float32).')
  f['coordinator_address'] = flags.DEFINE_string('coordinator_address', '', 'HOST:PORT of process 0.')
  f['num_processes'] = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process runs).')
  f['process_id'] = flags.DEFINE_integer('process_id', -1, 'This process\'s index (multi-process runs).')
  f['num_cpu_devices'] = flags.DEFINE_integer('num_cpu_devices', 0, 'Virtual CPU devices for CPU runs '
                                              '(0: VGGJAX_NUM_CPU_DEVICES or 1).')
  flags.mark_flags_as_required(['workdir'])
  return f


def _load_config(config, workdir: str):
  import ml_collections
  if config is not None:
    return config
  path = checkpoints.absolute(workdir) / 'config.json'  # local or gs://
  if not path.exists():
    raise FileNotFoundError(f'no --config given and {path} does not exist: pass the config of the data')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def main(argv, flag_holders) -> None:
  from absl import app
  from absl import logging as absl_logging
  f = cli.start_command(argv, flag_holders)
  parallel.initialize(f['coordinator_address'], f['num_processes'], f['process_id'])
  if jax.process_index() != 0:
    absl_logging.set_verbosity(absl_logging.WARNING)
  workdir = f['workdir']
  config = _load_config(f['config'], workdir)
  data_cfg = config.data
  try:
    scales = [int(q) for q in f['scales']]
    aspects = [float(a) for a in f['aspect_buckets']]
  except ValueError as e:
    raise app.UsageError(f'--scales takes integers and --aspect_buckets numbers: {e}')
  if not aspects or min(aspects) < 1:
    raise app.UsageError(f'--aspect_buckets must be ratios >= 1, got {aspects}')
  unknown = [p for p in f['protocols'] if p not in PROTOCOLS]
  if unknown or not f['protocols']:
    raise app.UsageError(f'--protocols: unknown {unknown}; valid: {", ".join(PROTOCOLS)}')
  paths = f['checkpoint'] or [workdir]
  fallback = (int(data_cfg.scale_min), int(data_cfg.scale_max))
  eval_models = [load_model(p, scales=scales, multiscale=f['multiscale'], fallback_train_scale=fallback,
                            dtype=f['dtype']) for p in paths]
  from vggjax.data import pipeline
  source = pipeline.open_source(data_cfg, data_cfg.eval_split)
  absl_logging.info('evaluating %s on %s (%d images): protocols %s, scales %s; %d devices over %d processes',
                    ', '.join(f'{m.label} ({m.checkpoint})' for m in eval_models), data_cfg.eval_split,
                    len(source), ','.join(f['protocols']), [list(m.scales) for m in eval_models],
                    jax.device_count(), jax.process_count())
  result = evaluate(eval_models, source, protocols=f['protocols'], batch_size=f['batch_size'],
                    num_threads=f['num_threads'], aspect_buckets=aspects,
                    flip=bool(data_cfg.get('flip', True)) if f['flip'] is None else f['flip'],
                    dct_scaling=bool(data_cfg.get('jpeg_dct_scaling', True)))
  result['split'] = str(data_cfg.eval_split)
  result['dataset'] = str(data_cfg.get('name', '') or data_cfg.source)
  if jax.process_index() == 0:
    path = write_results(result, workdir)
    print(format_table(result))
    shapes = ', '.join(f'Q={q}: {c["dense"]}/{c["crop_net"]}' for q, c in result['compiled_shapes'].items())
    print(f'{result["num_images"]} of {result["split_size"]} images ({result["unreadable"]} unreadable), '
          f'flips {"on" if result["flip"] else "off"}; '
          f'compiled shapes (dense/crop network) {shapes}; compilation {result["compile_s"]:.1f} s of '
          f'{result["wall_s"]:.1f} s; results in {path}', flush=True)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
