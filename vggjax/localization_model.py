"""The heads of a VGG: what fc8 predicts, what it is trained against, and how it is scored.

A head is an object with ``targets(batch)``, ``loss(outputs, targets)`` and ``hits(outputs, targets)`` (per
example) and ``eval_sums(outputs, batch, mask)`` (the eval step's sums); ``get_head(config.model.head)``
gives it, and the train and eval steps call it without knowing which head they train. ``classify`` is the
paper's classifier (cross-entropy, top-1/top-5); ``scr`` and ``pcr`` are the localisation nets of the paper's
Appendix A, a VGG whose last layer regresses a bounding box.

The net is the classifier with fc8 replaced by the regressor: the conv body, fc6 and fc7 are the same layers
(same names, same shapes, so a classification run warm-starts them), and fc8 has

* ``scr`` (single-class regression): 4 outputs, one box shared by all classes;
* ``pcr`` (per-class regression): 4 x classes outputs, one box per class, class c in outputs 4c ... 4c + 3.

A box is ``(cx, cy, w, h)`` relative to the net's input window (``vggjax.boxes``: divided by the training
size). Like the classifier the net is fully convolutional: at the training size its output map has one cell,
the box of the crop; on a larger image (the paper's dense application) it is a map of boxes, cell (i, j)
predicting the box of the training-size window whose top-left corner is (32 i, 32 j) (fc6 spans the
training size over pool5, whose stride is 32). ``cell_boxes`` turns such a map into boxes in the pixels of
the image the net saw.

Nothing new is stored: a localisation run's checkpoint is a VGG's, with fc8 of 4 or 4 x classes outputs,
and its weights metadata records the head (``checkpoints.load_weights`` reads it as it reads a classifier;
``box_head`` checks that a run is a localisation run).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vggjax import boxes as boxes_lib
from vggjax import models

HEADS = ('classify', 'scr', 'pcr')
BOX_HEADS = ('scr', 'pcr')
STRIDE = 32  # pool5's stride in input pixels: the step between the windows of neighbouring map cells


def check_head(head: str) -> str:
  if head not in HEADS:
    raise ValueError(f'unknown head {head!r}; valid: {", ".join(HEADS)} (classify: class scores; scr: one '
                     f'box for all classes; pcr: one box per class)')
  return head


def box_outputs(head: str, num_classes: int) -> int:
  """The width of fc8 for a head: classes (classify), 4 (scr) or 4 x classes (pcr)."""
  check_head(head)
  if head == 'classify':
    return num_classes
  if head == 'scr':
    return 4
  if num_classes < 1:
    raise ValueError(f'a pcr head needs the number of classes, got {num_classes}')
  return 4 * num_classes


def get_box_model(name: str, head: str, num_classes: int, **options) -> models.VGG:
  """``models.get_model`` with fc8 sized for the head (``box_outputs``)."""
  return models.get_model(name, num_classes=box_outputs(head, num_classes), **options)


def per_class(outputs, head: str, xp=jnp):
  """Outputs (..., fc8 width) -> boxes (..., K, 4): K = 1 for scr, classes for pcr."""
  check_head(head)
  if head == 'classify':
    raise ValueError('a classify head has no boxes')
  return outputs.reshape(outputs.shape[:-1] + (-1, 4))


def class_box(outputs: jax.Array, labels: jax.Array, head: str) -> jax.Array:
  """The box each example's net predicts for its class: outputs (N, fc8 width), labels (N,) -> (N, 4)."""
  b = per_class(outputs, head)
  if head == 'scr':
    return b[:, 0]
  return jnp.take_along_axis(b, labels[:, None, None].astype(jnp.int32), axis=1)[:, 0]


def euclidean_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
  """The paper's Euclidean loss per example (Caffe's EuclideanLoss: half the squared distance)."""
  return 0.5 * jnp.sum(jnp.square(pred - target), axis=-1)


def box_iou(pred: jax.Array, target: jax.Array) -> jax.Array:
  """IoU of two (N, 4) arrays of (cx, cy, w, h) boxes, elementwise (for the training metrics)."""
  a, b = boxes_lib.from_target(pred, 1.0, jnp), boxes_lib.from_target(target, 1.0, jnp)
  w = jnp.clip(jnp.minimum(a[:, 2], b[:, 2]) - jnp.maximum(a[:, 0], b[:, 0]), 0)
  h = jnp.clip(jnp.minimum(a[:, 3], b[:, 3]) - jnp.maximum(a[:, 1], b[:, 1]), 0)
  inter = w * h
  union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def cell_boxes(box_map: np.ndarray, image_size: int, head: str) -> np.ndarray:
  """A dense box map (h, w, fc8 width) -> boxes (h, w, K, 4) as (x0, y0, x1, y1) in input pixels: cell (i, j)
  predicts within the window at (32 i, 32 j) of side image_size."""
  m = np.asarray(box_map, np.float64)
  b = boxes_lib.from_target(per_class(m, head, np), image_size)
  rows, cols = np.arange(m.shape[0]) * STRIDE, np.arange(m.shape[1]) * STRIDE
  offset = np.zeros(m.shape[:2] + (1, 4))
  offset[..., 0] = offset[..., 2] = cols[None, :, None]
  offset[..., 1] = offset[..., 3] = rows[:, None, None]
  return b + offset


def box_head(meta: Mapping, path: str = '') -> str:
  """The box head (scr or pcr) that weights metadata records; ValueError for a classifier's."""
  head = (meta.get('model') or {}).get('head') or 'classify'
  if head not in BOX_HEADS:
    raise ValueError(f'{path or "these weights"} is a {head!r} net, not a localisation net (model.head scr or '
                     f'pcr: a localisation run)')
  return head


# ----------------------------------------------------------------------------------------------------------
# The objectives. A box example's targets travel through the train step as one float row
# [label, cx, cy, w, h, valid], so micro-batches split them as they split labels.


class Classify:
  """Class scores: cross-entropy (against labels smoothed by ``label_smoothing``, train.label_smoothing: the
  one-hot target mixed with the uniform, optax.smooth_labels; 0, the paper's, uses the integer labels as
  they are); a hit is a top-1 correct; evaluation counts top-1 and top-5 hits and the unsmoothed loss."""

  name = 'classify'

  def __init__(self, label_smoothing: float = 0.0):
    self.label_smoothing = float(label_smoothing)

  def targets(self, batch: Mapping) -> jax.Array:
    return batch['label']

  def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    if not self.label_smoothing:
      return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
    soft = optax.smooth_labels(jax.nn.one_hot(targets, outputs.shape[-1]), self.label_smoothing)
    return optax.softmax_cross_entropy(outputs, soft)

  def hits(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.argmax(outputs, -1) == targets

  def eval_sums(self, outputs: jax.Array, batch: Mapping, mask: jax.Array) -> dict:
    """Sums over the masked batch: top-1 and top-5 hits and the loss."""
    labels = batch['label']
    hits = jax.lax.top_k(outputs, min(5, outputs.shape[-1]))[1] == labels[:, None]
    return {'top1': jnp.sum(hits[:, 0] * mask), 'top5': jnp.sum(jnp.any(hits, -1) * mask),
            'loss': jnp.sum(optax.softmax_cross_entropy_with_integer_labels(outputs, labels) * mask)}


class BoxRegression:
  """A box per crop (scr: one for all classes; pcr: one per class, the true class's is scored): the
  Euclidean loss, half the squared distance to the target (0 where the crop kept no box: such examples are
  masked out); a hit is an IoU > 0.5 with the target, the class given."""

  def __init__(self, name: str):
    if name not in BOX_HEADS:
      raise ValueError(f'unknown box head {name!r}; valid: {", ".join(BOX_HEADS)}')
    self.name = name

  def targets(self, batch: Mapping) -> jax.Array:
    return jnp.concatenate([batch['label'][:, None].astype(jnp.float32), batch['box'].astype(jnp.float32),
                            batch['box_valid'][:, None].astype(jnp.float32)], axis=1)

  def loss(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    pred = class_box(outputs, targets[:, 0].astype(jnp.int32), self.name)
    return euclidean_loss(pred, targets[:, 1:5]) * targets[:, 5]

  def hits(self, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    pred = class_box(outputs, targets[:, 0].astype(jnp.int32), self.name)
    return (box_iou(pred, targets[:, 1:5]) > 0.5) & (targets[:, 5] > 0)

  def eval_sums(self, outputs: jax.Array, batch: Mapping, mask: jax.Array) -> dict:
    """Sums over the masked central crops: 'top1' (and 'top5', the same: the class is given) counts the
    crops whose box for the true class has IoU > 0.5 with the true box; 'iou' sums the IoUs; 'loss' the
    Euclidean loss."""
    targets = self.targets(batch)
    hits = jnp.sum(self.hits(outputs, targets).astype(jnp.float32) * mask)
    iou = box_iou(class_box(outputs, batch['label'], self.name), batch['box']) * targets[:, 5] * mask
    return {'top1': hits, 'top5': hits, 'iou': jnp.sum(iou),
            'loss': jnp.sum(self.loss(outputs, targets) * mask)}


def get_head(name: str, label_smoothing: float = 0.0) -> Classify | BoxRegression:
  """The objective of config.model.head (label smoothing: the classifier's; a box head has none)."""
  check_head(name)
  if name == 'classify':
    return Classify(label_smoothing)
  if label_smoothing:
    raise ValueError(f'train.label_smoothing={label_smoothing} applies to class scores; model.head={name} '
                     f'regresses boxes (set it to 0)')
  return BoxRegression(name)
