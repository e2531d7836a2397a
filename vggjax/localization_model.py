"""The localisation nets of the paper's Appendix A: a VGG whose last layer regresses a bounding box.

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

Nothing new is stored: a localisation run's checkpoint is a VGG's, with fc8 of 4 or 4 x classes outputs;
``load_box_weights`` reads it.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vggjax import boxes as boxes_lib
from vggjax.settings import ModelSettings
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


def load_box_weights(path: str) -> tuple[dict, dict, Any]:
  """(variables, meta, model) of a localisation run (a workdir or one of its checkpoint step directories).
  meta is ``checkpoints.load_meta``'s, plus 'head'."""
  from vggjax import checkpoints
  import orbax.checkpoint as ocp
  kind, directory, step = checkpoints._resolve(path)
  if kind != 'run':
    raise ValueError(f'{path} is a weights directory; a localisation net is read from its training run')
  config = json.loads((directory / 'config.json').read_text())
  head = ModelSettings.from_config(config['model']).head  # older runs' config.json: configs/default.py's
  if head not in BOX_HEADS:
    raise ValueError(f'{path} is a {head!r} run, not a localisation run (model.head scr or pcr)')
  meta = checkpoints.load_meta(path)
  meta['head'] = head
  m = meta['model']
  model = get_box_model(m['name'], head, m['num_classes'], image_size=m['image_size'], width=m['width'],
                        fc_features=m['fc_features'], dropout_rate=0.0)
  shapes = models.variable_shapes(model)
  want = {c: shapes[c] for c in ('params', 'batch_stats') if c in shapes}
  args = jax.tree_util.tree_map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), want)
  source = directory / checkpoints.CHECKPOINT_DIR / str(step) / 'state'
  restored = ocp.PyTreeCheckpointer().restore(source, args=ocp.args.PyTreeRestore(
      item=want, restore_args=args, partial_restore=True))
  return dict(restored), meta, model
