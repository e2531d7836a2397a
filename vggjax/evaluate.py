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
(``unreadable`` in eval.json); ``num_images`` is what each error was computed on.

Output: WORKDIR/eval.json (per model and fused, per protocol, per scale set: top1_err, top5_err,
num_images, img_per_s; compiled shapes and buckets per scale) and a table laid out like the paper's
Tables 3-5 on stdout. The host decodes and rescales in threads; the device does everything else
(DESIGN.md decision 4: uint8 is shipped, the normalisation runs in the jitted functions).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config_roots(argv) -> None:
  """Config files import their base as `from configs import default`: put each one's root on sys.path."""
  roots = [REPO]
  for arg in argv:
    if arg.startswith('--config=') and (arg.endswith('.py') or '.py:' in arg):
      roots.append(pathlib.Path(arg.split('=', 1)[1].split(':', 1)[0]).resolve().parent.parent)
  for root in roots:
    if (root / 'configs').is_dir() and str(root) not in sys.path:
      sys.path.insert(0, str(root))


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  _config_roots(sys.argv)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vggjax import checkpoints, models, parallel  # noqa: E402
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
  return (int(scale_min) + int(scale_max)) // 2


def default_scales(scale_min: int, scale_max: int, image_size: int, multiscale: bool = False
                   ) -> tuple[int, ...]:
  """The paper's test scales (4.1, 4.2): one Q, or {S-32, S, S+32} (fixed S), {Smin, mid, Smax} (jittered).
  Scales below the training size (S - 32 when S is the training size) are left out."""
  smin, smax = int(scale_min), int(scale_max)
  if not multiscale:
    return (single_scale(smin, smax),)
  qs = (smin - 32, smin, smin + 32) if smin == smax else (smin, single_scale(smin, smax), smax)
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
  return int(math.ceil(x / multiple - 1e-9)) * multiple


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
                     norm: Normalization = Normalization()) -> jax.Array:
  """The dense protocol on padded uint8 images: mean of the softmax of the image and of its flip."""
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
  """(n*n, B, size, size, 3): the grid crops (n = GRID) or the central crop (n = 1) of each image."""
  tops, lefts = crop_offsets(hw.astype(jnp.int32), size, n)

  def one(image, t, l):
    return jax.lax.dynamic_slice(image, (t, l, 0), (size, size, image.shape[-1]))

  crops = jax.vmap(jax.vmap(one, in_axes=(None, 0, 0)))(images, tops, lefts)  # (B, K, size, size, 3)
  return jnp.swapaxes(crops, 0, 1)


def crop_posteriors(model: models.VGG, variables: Any, crops: jax.Array, flips: bool,
                    norm: Normalization = Normalization()) -> jax.Array:
  """Mean softmax over crops (K, B, size, size, 3) (and their mirror images if flips): (B, classes)."""

  def one(c):
    x = normalize(c, norm)
    if flips:
      x = jnp.concatenate([x, x[:, :, ::-1]])
    p = jax.nn.softmax(model.apply(variables, x, train=False))
    return p.reshape(2, -1, p.shape[-1]).sum(0) if flips else p

  return jnp.sum(jax.lax.map(one, crops), axis=0) / (crops.shape[0] * (2 if flips else 1))


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


def _arch_label(model: models.VGG) -> str:
  for name, arch in models.ARCHS.items():
    if arch.stages == model.stages and arch.lrn == model.lrn and arch.batch_norm == model.batch_norm:
      return arch.paper_name or name
  return 'VGG'


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
  return EvalModel(model=model, variables=variables, scales=qs, norm=checkpoints.normalization_from_meta(meta),
                   label=_arch_label(model), train_scale=train_scale, checkpoint=str(path),
                   step=meta.get('step'))


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
                 gather: Callable[[np.ndarray], np.ndarray] = _allgather) -> list[_Batch]:
  """The batches of one scale: per bucket shape (sorted), this process's images in chunks of local_batch,
  padded (position -1) up to the largest number of batches any process has in that bucket."""
  local: dict[tuple[int, int], list[int]] = {}
  for pos in sorted(shapes_by_position):
    local.setdefault(tuple(shapes_by_position[pos]), []).append(pos)
  rows = np.asarray([(h, w, len(v)) for (h, w), v in sorted(local.items())], np.int64).reshape(-1, 3)
  k = int(np.max(gather(np.asarray([len(rows)], np.int64))))
  padded = np.zeros((max(k, 1), 3), np.int64)
  padded[:len(rows)] = rows
  everyone = gather(padded).reshape(-1, 3)
  needed: dict[tuple[int, int], int] = {}
  for h, w, count in everyone:
    if count:
      key = (int(h), int(w))
      needed[key] = max(needed.get(key, 0), -(-int(count) // local_batch))
  batches = []
  for shape in sorted(needed):
    mine = local.get(shape, [])
    for b in range(needed[shape]):
      chunk = np.full((local_batch,), -1, np.int64)
      part = mine[b * local_batch:(b + 1) * local_batch]
      chunk[:len(part)] = part
      batches.append(_Batch(q, shape, chunk))
  return batches


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


class _Compiled:
  """Ahead-of-time compiled functions keyed by (kind, model, shape); counts shapes and compile time."""

  def __init__(self):
    self.cache: dict[tuple, Any] = {}
    self.compile_s = 0.0

  def __call__(self, key: tuple, fn: Callable, *args):
    compiled = self.cache.get(key)
    if compiled is None:
      t0 = time.perf_counter()
      compiled = fn.lower(*args).compile()
      self.compile_s += time.perf_counter() - t0
      self.cache[key] = compiled
    return compiled(*args)


def _scale_key(scales: Iterable[int]) -> str:
  return ','.join(str(q) for q in scales)


def evaluate(eval_models: Sequence[EvalModel], source, *, protocols: Sequence[str] = PROTOCOLS,
             batch_size: int = 0, mesh=None, num_threads: int = 0,
             aspect_buckets: Sequence[float] = ASPECT_BUCKETS, dct_scaling: bool = True,
             progress: bool = True, return_posteriors: bool = False) -> dict:
  """Evaluates one or several models on every image of `source` (len(source); source.record(i) ->
  (uint8 image or encoded bytes, label), or source[i] -> {'image', 'label'}) with the requested protocols,
  at each model's scales and over all of them, per model and fused. Returns the eval.json content; with
  return_posteriors, also '_posteriors' {(model label, protocol, scale key): (this process's images, C)},
  '_labels' and '_positions' (this process's images, in order of the split)."""
  protocols = tuple(dict.fromkeys(protocols))
  bad = [p for p in protocols if p not in PROTOCOLS]
  if bad or not protocols:
    raise ValueError(f'unknown protocol(s) {bad}; valid: {", ".join(PROTOCOLS)}')
  base = [p for p in BASE_PROTOCOLS if p in protocols or (p != 'single' and 'dense+multicrop' in protocols)]
  reported = [p for p in PROTOCOLS if p in base or p in protocols]
  eval_models = list(eval_models)
  if not eval_models:
    raise ValueError('nothing to evaluate: no model given')
  labels_ = _unique_labels([m.label for m in eval_models])
  for m, label in zip(eval_models, labels_):
    m.label = label
  num_classes = {m.model.num_classes for m in eval_models}
  if len(num_classes) != 1:
    raise ValueError(f'fusion needs models with the same classes; got num_classes {sorted(num_classes)}')
  num_classes = num_classes.pop()
  mesh = mesh if mesh is not None else parallel.make_mesh()
  n_dev, n_proc, proc = mesh.devices.size, jax.process_count(), jax.process_index()
  batch_size = batch_size or DEFAULT_PER_DEVICE_BATCH * n_dev
  parallel.check_batch_size(batch_size, mesh)
  local_batch = batch_size // n_proc
  is_main = proc == 0
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  t_start = time.perf_counter()

  # This process's images: a contiguous block of the split. Dimensions and labels first (header reads).
  n = len(source)
  lo, hi = proc * n // n_proc, (proc + 1) * n // n_proc
  reader = _Reader(source, dct_scaling)
  dims = np.zeros((hi - lo, 2), np.int64)
  labels = np.full((hi - lo,), -1, np.int64)
  readable = np.zeros((hi - lo,), bool)
  unreadable: list[str] = []

  def read_dims(pos):
    try:
      return pos, reader.dims(lo + pos), None
    except Exception as e:  # noqa: BLE001 - a bad record must not end the evaluation
      return pos, None, f'{type(e).__name__}: {e}'[:300]

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for pos, d, err in pool.map(read_dims, range(hi - lo)):
      if d is None:
        unreadable.append(reader.describe(lo + pos))
        log.warning('skipping unreadable record %s: %s', reader.describe(lo + pos), err)
      else:
        dims[pos], labels[pos], readable[pos] = d[:2], d[2], True
  bad_labels = int(np.sum(readable & ((labels < 0) | (labels >= num_classes))))
  if int(np.sum(_allgather(np.asarray([bad_labels])))):
    raise ValueError(f'labels outside [0, {num_classes}) in the split: the models have {num_classes} classes')

  all_scales = sorted({q for m in eval_models for q in m.scales})
  plans: dict[int, list[_Batch]] = {}
  bucket_counts: dict[int, dict[str, int]] = {}
  for q in all_scales:
    shapes = {}
    for pos in np.flatnonzero(readable):
      h, w = reader.t.rescaled_size(int(dims[pos, 0]), int(dims[pos, 1]), q)
      shapes[int(pos)] = bucket_shape(h, w, q, aspect_buckets)
    plans[q] = plan_batches(shapes, q, local_batch)
    counts: dict[str, int] = {}
    for s in shapes.values():
      counts[f'{s[0]}x{s[1]}'] = counts.get(f'{s[0]}x{s[1]}', 0) + 1
    bucket_counts[q] = counts

  # Jitted functions (compiled ahead of time per shape).
  rep, data = parallel.replicated(mesh), NamedSharding(mesh, P(parallel.DATA_AXIS))
  crops_sharding = NamedSharding(mesh, P(None, parallel.DATA_AXIS))
  variables = [jax.device_put(m.variables, rep) for m in eval_models]
  dense_fns = [jax.jit(functools.partial(dense_posteriors, m.model, norm=m.norm), out_shardings=data)
               for m in eval_models]
  crop_net_fns = {(i, flips): jax.jit(functools.partial(crop_posteriors, m.model, flips=flips, norm=m.norm),
                                      out_shardings=data)
                  for i, m in enumerate(eval_models) for flips in (False, True)}
  crop_fns = {(size, grid): jax.jit(functools.partial(extract_crops, size=size, n=grid),
                                    out_shardings=crops_sharding)
              for size in {m.model.image_size for m in eval_models} for grid in (1, GRID)}
  compiled = _Compiled()
  # Compiled shapes per scale: dense (one per bucket), crop extraction (a small gather per bucket and crop
  # kind) and the crop network (one per crop protocol, the same for every scale).
  shapes_used: dict[int, dict[str, set]] = {q: {'dense': set(), 'crop_extract': set(), 'crop_net': set()}
                                            for q in all_scales}
  seconds = {(i, p, q): 0.0 for i in range(len(eval_models)) for p in base for q in all_scales}

  # Per-image posteriors of this process's images; sums over scales for the multi-scale rows.
  n_local = hi - lo
  sums: dict[tuple[int, str], np.ndarray] = {}
  done_scales = np.zeros((len(eval_models), n_local), np.int64)
  rows: list[dict] = []  # result rows: local hit counts, summed over processes at the end
  kept: dict[tuple[str, str, str], np.ndarray] = {}

  def add_rows(label: str, posteriors: dict[str, np.ndarray], valid: np.ndarray, scales: tuple,
               time_s: dict[str, float]):
    for p in reported:
      post = posteriors[p]
      idx = np.flatnonzero(valid)
      y = labels[idx]
      top1 = topk_hits(post[idx], y, 1)
      top5 = topk_hits(post[idx], y, min(5, num_classes))
      rows.append({'model': label, 'protocol': p, 'scales': scales, 'top1': int(top1.sum()),
                   'top5': int(top5.sum()), 'count': len(idx), 'seconds': time_s.get(p, 0.0)})
      if return_posteriors:
        kept[(label, p, _scale_key(scales))] = post.copy()

  def with_combination(posteriors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = dict(posteriors)
    if 'dense+multicrop' in reported:
      out['dense+multicrop'] = 0.5 * (posteriors['dense'] + posteriors['multicrop'])
    return out

  def timing(i: int, qs: Iterable[int]) -> dict[str, float]:
    t = {p: sum(seconds[(i, p, q)] for q in qs) for p in base}
    if 'dense+multicrop' in reported:
      t['dense+multicrop'] = t['dense'] + t['multicrop']
    return t

  total_batches = sum(len(b) for b in plans.values())
  bar = None
  if is_main and progress:
    from vggjax import logging as vlog
    bar = vlog.ProgressBar(total_batches)
  done_batches, images_done = 0, 0

  def prepare(batch: _Batch):
    hb, wb = batch.shape
    images = np.zeros((local_batch, hb, wb, 3), np.uint8)
    hw = np.tile(np.asarray([hb, wb], np.int32), (local_batch, 1))
    positions = batch.positions.copy()
    failed = []
    for j, pos in enumerate(batch.positions):
      if pos < 0:
        continue
      try:
        image = reader.rescaled(lo + int(pos), batch.q, int(dims[pos, 0]), int(dims[pos, 1]))
        images[j, :image.shape[0], :image.shape[1]] = image
        hw[j] = image.shape[:2]
      except Exception as e:  # noqa: BLE001
        positions[j] = -1
        failed.append((int(pos), f'{type(e).__name__}: {e}'[:300]))
    return images, hw, positions, failed

  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    for q in all_scales:
      at_q = [i for i, m in enumerate(eval_models) if q in m.scales]
      post = {(i, p): np.zeros((n_local, num_classes), np.float32) for i in at_q for p in base}
      seen = np.zeros((n_local,), bool)
      batches = plans[q]
      pending = [pool.submit(prepare, b) for b in batches[:num_threads + 1]]
      for b_index, batch in enumerate(batches):
        images, hw, positions, failed = pending.pop(0).result()
        if b_index + num_threads + 1 < len(batches):
          pending.append(pool.submit(prepare, batches[b_index + num_threads + 1]))
        for pos, err in failed:
          readable[pos] = False
          unreadable.append(reader.describe(lo + pos))
          log.warning('skipping unreadable record %s: %s', reader.describe(lo + pos), err)
        g = parallel.global_batch({'image': images, 'hw': hw}, mesh)
        valid = positions >= 0
        crops_cache: dict[tuple[int, int], jax.Array] = {}
        for i in at_q:
          m = eval_models[i]
          size = m.model.image_size
          for p in base:
            t0, c0 = time.perf_counter(), compiled.compile_s
            if p == 'dense':
              shapes_used[q]['dense'].add(batch.shape)
              out = compiled(('dense', i, batch.shape), dense_fns[i], variables[i], g['image'], g['hw'])
            else:
              grid = GRID if p == 'multicrop' else 1
              if (size, grid) not in crops_cache:  # shared by the models of the same training size
                shapes_used[q]['crop_extract'].add((grid, batch.shape))
                crops_cache[(size, grid)] = compiled(('crops', size, grid, batch.shape), crop_fns[(size, grid)],
                                                     g['image'], g['hw'])
              shapes_used[q]['crop_net'].add(p)
              out = compiled(('crop_net', i, p), crop_net_fns[(i, p == 'multicrop')], variables[i],
                             crops_cache[(size, grid)])
            rows_out = _local_rows(out)
            seconds[(i, p, q)] += time.perf_counter() - t0 - (compiled.compile_s - c0)
            post[(i, p)][positions[valid]] = rows_out[valid]
        seen[positions[valid]] = True
        done_batches += 1
        images_done += int(valid.sum())
        if bar is not None:
          elapsed = time.perf_counter() - t_start
          bar.update(done_batches, Q=q, shape=f'{batch.shape[0]}x{batch.shape[1]}',
                     **{'img/s': round(images_done * n_proc / max(elapsed, 1e-9), 1)})
      seen &= readable
      # Rows at this scale, per model and fused; then the sums over scales.
      fused: dict[str, list] = {p: [] for p in base}
      for i in at_q:
        per = {p: post[(i, p)] for p in base}
        add_rows(eval_models[i].label, with_combination(per), seen, (q,), timing(i, [q]))
        for p in base:
          fused[p].append(per[p])
          s = sums.get((i, p))
          sums[(i, p)] = per[p] if s is None else s + per[p]
        done_scales[i] += seen
      if len(eval_models) > 1 and len(at_q) == len(eval_models):
        t = [timing(i, [q]) for i in at_q]
        add_rows('fusion', with_combination({p: fuse(fused[p]) for p in base}), seen, (q,),
                 {p: sum(x[p] for x in t) for p in t[0]})
      del post
  if bar is not None:
    bar.close()

  # Multi-scale rows: each model over its scales; the fusion of the models, each over its own scales.
  full: dict[int, dict[str, np.ndarray]] = {}
  for i, m in enumerate(eval_models):
    full[i] = {p: sums[(i, p)] / len(m.scales) for p in base}
    if len(m.scales) > 1:
      add_rows(m.label, with_combination(full[i]), done_scales[i] == len(m.scales), m.scales,
               timing(i, m.scales))
  multi_fusion = len(eval_models) > 1 and not all(len(m.scales) == 1 and m.scales == eval_models[0].scales
                                                  for m in eval_models)
  if multi_fusion:
    valid = np.all([done_scales[i] == len(m.scales) for i, m in enumerate(eval_models)], axis=0)
    key_scales = tuple(sorted({q for m in eval_models for q in m.scales}))
    t = [timing(i, m.scales) for i, m in enumerate(eval_models)]
    add_rows('fusion', with_combination({p: fuse([full[i][p] for i in range(len(eval_models))]) for p in base}),
             valid, key_scales, {p: sum(x[p] for x in t) for p in t[0]})

  # Sum the hit counts over processes.
  local = np.asarray([[r['top1'], r['top5'], r['count']] for r in rows], np.int64).reshape(-1, 3)
  total = _allgather(local).sum(axis=0)
  n_unreadable = int(np.sum(_allgather(np.asarray([len(unreadable)], np.int64))))
  results: dict[str, dict] = {}
  for r, (top1, top5, count) in zip(rows, total):
    entry = {'top1_err': 1.0 - top1 / count if count else float('nan'),
             'top5_err': 1.0 - top5 / count if count else float('nan'), 'num_images': int(count)}
    if r['seconds'] > 0:
      entry['img_per_s'] = count / r['seconds']
    results.setdefault(r['model'], {}).setdefault(r['protocol'], {})[_scale_key(r['scales'])] = entry
  out = {
      'models': [{'label': m.label, 'name': _model_name(m.model), 'checkpoint': m.checkpoint, 'step': m.step,
                  'image_size': m.model.image_size,
                  'train_scale': train_scale_label(*(m.train_scale or (None, None))),
                  'test_scales': list(m.scales)} for m in eval_models],
      'protocols': list(reported),
      'results': results,
      'num_images': int(n - n_unreadable),
      'split_size': n,
      'unreadable': n_unreadable,
      'compiled_shapes': {str(q): {k: len(v) for k, v in shapes_used[q].items()} for q in all_scales},
      'buckets': {str(q): dict(sorted(bucket_counts[q].items())) for q in all_scales} if n_proc == 1 else
                 {str(q): sorted({f'{b.shape[0]}x{b.shape[1]}' for b in plans[q]}) for q in all_scales},
      'batch_size': batch_size,
      'devices': n_dev,
      'processes': n_proc,
      'compile_s': compiled.compile_s,
      'wall_s': time.perf_counter() - t_start,
  }
  if unreadable and n_proc == 1:
    out['unreadable_records'] = unreadable[:100]
  if return_posteriors:
    out['_posteriors'] = kept
    out['_labels'] = labels
    out['_positions'] = np.arange(lo, hi)
  return out


def _model_name(model: models.VGG) -> str:
  for name, arch in models.ARCHS.items():
    if arch.stages == model.stages and arch.lrn == model.lrn and arch.batch_norm == model.batch_norm:
      return name
  return 'vgg'


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
  """WORKDIR/eval.json (atomically); the keys starting with '_' (per-image arrays) are left out."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, RESULTS_FILE)

  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return str(x)
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x

  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(clean({k: v for k, v in result.items() if not k.startswith('_')}), f, indent=2)
  os.replace(tmp, path)
  return path


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
  f['batch_size'] = flags.DEFINE_integer('batch_size', 0, 'Global images per step (0: '
                                         f'{DEFAULT_PER_DEVICE_BATCH} per device).')
  f['num_threads'] = flags.DEFINE_integer('num_threads', 0, 'Host threads decoding and rescaling (0: up to 8).')
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
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no --config given and {path} does not exist: pass the config of the data')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def main(argv, flag_holders) -> None:
  from absl import app, logging as absl_logging
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = {k: v.value for k, v in flag_holders.items()}
  num_cpu = f['num_cpu_devices'] or int(os.environ.get('VGGJAX_NUM_CPU_DEVICES', '0') or 0)
  if num_cpu:
    jax.config.update('jax_num_cpu_devices', num_cpu)
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
                    dct_scaling=bool(data_cfg.get('jpeg_dct_scaling', True)))
  result['split'] = str(data_cfg.eval_split)
  result['dataset'] = str(data_cfg.get('name', '') or data_cfg.source)
  if jax.process_index() == 0:
    path = write_results(result, workdir)
    print(format_table(result))
    shapes = ', '.join(f'Q={q}: {c["dense"]} dense, {c["crop_net"]} crop' for q, c in
                       result['compiled_shapes'].items())
    print(f'{result["num_images"]} of {result["split_size"]} images ({result["unreadable"]} unreadable); '
          f'compiled shapes {shapes}; compile {result["compile_s"]:.1f} s, total {result["wall_s"]:.1f} s; '
          f'results in {path}', flush=True)


def run() -> None:
  from absl import app
  holders = _define_flags()
  app.run(functools.partial(main, flag_holders=holders))


if __name__ == '__main__':
  run()
