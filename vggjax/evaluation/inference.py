"""The inference path, on the device: uint8 images in, posteriors or descriptors out.

Every way vggjax classifies or describes images goes through these functions: validation during training
(``logits_fn``), the paper's protocols of ``vggjax.evaluate`` (``dense_posteriors``, ``crop_posteriors`` on
masked, padded batches), ``vggjax.predict`` (``posterior_fn``) and ``vggjax.features`` / transfer
(``descriptor_fn``). The normalisation runs in the jitted function (docs/design.md, decision 4).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from vggjax import models
from vggjax.preprocessing import Normalization, normalize

# ----------------------------------------------------------------------------------------------------------
# Unpadded batches: images of one shape (validation, predict, features).


def logits(model: models.VGG, variables: Any, images: jax.Array, norm: Normalization = Normalization(),
           method: str = '__call__') -> jax.Array:
  """Class scores (B, classes) of uint8 RGB images (B, H, W, 3) of one shape: the FC net at the training
  size, the averaged class score map above it (method='score_map': the map itself; a box net's outputs
  likewise)."""
  return model.apply(variables, normalize(images, norm), train=False, method=method)


def posterior_fn(model: models.VGG, norm: Normalization = Normalization(), flip: bool = False) -> Callable:
  """The jitted (variables, uint8 images) -> softmax posteriors (B, classes), averaged with those of the
  horizontally flipped images if flip (the paper's dense protocol on unpadded images of one shape)."""
  def posteriors(variables, images):
    x = normalize(images, norm)
    p = jax.nn.softmax(model.apply(variables, x))
    if flip:
      p = (p + jax.nn.softmax(model.apply(variables, x[:, :, ::-1]))) / 2
    return p
  return jax.jit(posteriors)


def descriptor_fn(model: models.VGG, norm: Normalization = Normalization(), flip: bool = True) -> Callable:
  """The jitted (variables, uint8 images) -> fc7 averaged over the map (and with the flipped image's): the
  paper's image descriptor (Appendix B), unnormalised."""
  def descriptor(variables, images):
    x = normalize(images, norm)
    d = jnp.mean(model.apply(variables, x, method='fc7_map'), axis=(1, 2))
    if not flip:
      return d
    flipped = jnp.mean(model.apply(variables, x[:, :, ::-1], method='fc7_map'), axis=(1, 2))
    return (d + flipped) / 2
  return jax.jit(descriptor)


def apply_batched(fn: Callable, variables: Any, images: Sequence[np.ndarray], batch_size: int,
                  progress: Any = None) -> list[np.ndarray]:
  """fn(variables, batch) over images, batching images of equal shape together; results in input order.
  ``progress``: a tqdm bar advanced by one per image, or None."""
  groups: dict[tuple, list[int]] = {}
  for i, im in enumerate(images):
    groups.setdefault(im.shape, []).append(i)
  out: list = [None] * len(images)
  for indices in groups.values():
    for start in range(0, len(indices), batch_size):
      chunk = indices[start:start + batch_size]
      result = np.asarray(fn(variables, np.stack([images[i] for i in chunk])))
      for i, r in zip(chunk, result):
        out[i] = r
      if progress is not None:
        progress.update(len(chunk))
  return out


# ----------------------------------------------------------------------------------------------------------
# Padded batches: the paper's protocols on images of any aspect ratio (vggjax.evaluation, exactness).


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
