"""Bounding boxes for the localisation task (paper section 4.5 and Appendix A): the geometry of the training
and test transforms applied to boxes, the regression target, IoU, OverFeat's greedy merging, and the ILSVRC
localisation error.

Conventions, everywhere in vggjax:

* A box is ``(x0, y0, x1, y1)`` in continuous pixel coordinates of its image: pixel (row i, column j) covers
  [j, j + 1) x [i, i + 1), so a box of the whole H x W image is (0, 0, W, H) and its area is W * H (no "+1"
  as in the ILSVRC development kit's integer boxes, which are the same boxes with x1, y1 one less).
* The regression target of a crop (what the SCR/PCR heads predict, paper Appendix A: "centre coordinates,
  width and height") is ``(cx, cy, w, h) / crop size``: the box relative to the crop, in [0, 1] when the box
  lies within it. Normalising by the crop keeps the target independent of the training size.

The transforms follow ``vggjax.data.transforms`` exactly: rescale (each axis by its own exact factor, new size
/ old size, since the rescaled size is rounded), crop (translate, then clip to the crop), flip (mirror about
the crop's vertical centre line).

Crops that lose the object. A random crop can cut a box partly or wholly away. A box cut partly is clipped
to the crop (the visible part of the object is what the crop shows). A box with no area left in the crop is
dropped; when a training crop keeps no box at all, its example is masked out of the loss (``valid`` False)
rather than re-drawn: the crop, the flip and every other random choice stay those of the classification
pipeline (same batches, same resumable order) and the masked examples are few (none when the object lies
within the central ``image_size`` region of the rescaled image). When several boxes remain, the target is the
one with the largest visible area (ILSVRC training images mostly have one box per object class).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

IOU_THRESHOLD = 0.5  # ILSVRC: a predicted box is correct if IoU > 0.5 with a ground-truth box of the class


def as_boxes(boxes) -> np.ndarray:
  """Any sequence of (x0, y0, x1, y1) as a float64 array (K, 4); raises for a bad shape or an inverted box."""
  b = np.asarray(boxes, np.float64)
  if b.size == 0:
    return np.zeros((0, 4))
  b = b.reshape(-1, 4) if b.ndim == 1 else b
  if b.ndim != 2 or b.shape[1] != 4:
    raise ValueError(f'boxes must be (K, 4) arrays of (x0, y0, x1, y1), got shape {np.shape(boxes)}')
  if np.any(b[:, 2] < b[:, 0]) or np.any(b[:, 3] < b[:, 1]):
    raise ValueError(f'boxes must have x1 >= x0 and y1 >= y0, got {b.tolist()}')
  return b


def area(boxes: np.ndarray) -> np.ndarray:
  b = np.asarray(boxes, np.float64)
  return np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of every box of ``a`` (..., 4) with every box of ``b`` (M, 4): (..., M)."""
  a = np.asarray(a, np.float64)[..., None, :]
  b = np.asarray(b, np.float64)
  w = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
  h = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = w * h
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# ----------------------------------------------------------------------------------------------------------
# The transforms of vggjax.data.transforms, applied to boxes.


def rescale_boxes(boxes, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> np.ndarray:
  """Boxes of an image of size from_hw in the same image resized to to_hw (x by W'/W, y by H'/H)."""
  b = as_boxes(boxes).copy()
  sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
  b[:, [0, 2]] *= sx
  b[:, [1, 3]] *= sy
  return b


def crop_boxes(boxes, top: int, left: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(boxes in the size x size crop at (top, left), clipped to it; visible: True where area is left)."""
  b = as_boxes(boxes) - np.array([left, top, left, top], np.float64)
  b = np.clip(b, 0, size)
  visible = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
  return b, visible


def flip_boxes(boxes, width: int) -> np.ndarray:
  """Boxes of an image of this width after a horizontal flip."""
  b = as_boxes(boxes)
  return np.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], axis=1)


def train_boxes(boxes, image_hw: tuple[int, int], rescaled_hw: tuple[int, int], top: int, left: int,
                size: int, flipped: bool) -> tuple[np.ndarray, np.ndarray]:
  """Boxes of the original image in the training crop: rescale, crop (clipped), flip. Returns (boxes,
  visible) for all K boxes; boxes that are not visible have zero area."""
  b = rescale_boxes(boxes, image_hw, rescaled_hw)
  b, visible = crop_boxes(b, top, left, size)
  if flipped:
    b = flip_boxes(b, size)
  return b, visible


def center_crop_offsets(rescaled_hw: tuple[int, int], size: int) -> tuple[int, int]:
  """(top, left) of the central crop, as ``transforms.center_crop`` takes it."""
  return (rescaled_hw[0] - size) // 2, (rescaled_hw[1] - size) // 2


def target_box(boxes: np.ndarray, visible: np.ndarray) -> tuple[np.ndarray, bool]:
  """The box a crop is trained to predict: the visible one with the largest area (see the module docstring).
  Returns (box (4,), valid); (zeros, False) when no box is visible."""
  if not np.any(visible):
    return np.zeros(4), False
  a = np.where(visible, area(boxes), -1.0)
  return np.asarray(boxes[int(np.argmax(a))], np.float64), True


def to_target(boxes, size: float) -> np.ndarray:
  """(x0, y0, x1, y1) in a crop of this size -> the regression target (cx, cy, w, h) / size."""
  b = np.asarray(boxes, np.float64)
  return np.stack([(b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2, b[..., 2] - b[..., 0],
                   b[..., 3] - b[..., 1]], axis=-1) / size


def from_target(target, size: float, xp=np):
  """The inverse of ``to_target``: (cx, cy, w, h) / size -> (x0, y0, x1, y1). Works on numpy or jax
  arrays (``xp``); negative predicted widths and heights are taken as zero."""
  t = target * size
  w, h = xp.maximum(t[..., 2], 0), xp.maximum(t[..., 3], 0)
  return xp.stack([t[..., 0] - w / 2, t[..., 1] - h / 2, t[..., 0] + w / 2, t[..., 1] + h / 2], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Greedy merging (Sermanet et al., 2014, OverFeat, section 4.3).


def greedy_merge(boxes, scores, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """OverFeat's greedy merging of the many boxes of a dense application.

  Every box starts as its own group. Repeatedly, the two groups whose boxes are closest are merged (their
  box: the mean of all member boxes' coordinates; their score: the sum of the members' class scores), until
  no two groups match. Two groups match when their boxes overlap by IoU >= ``threshold`` (OverFeat's
  match_score combines the centres' distance and the intersection area; IoU is the same idea as one
  scale-free number). The paper (Appendix A) merges "spatially close predictions (by averaging their
  coordinates), and then rates them based on the class scores".

  Returns (boxes (G, 4), scores (G,), member counts (G,)), sorted by score, best first.
  """
  b = as_boxes(boxes)
  s = np.asarray(scores, np.float64).reshape(-1)
  if len(b) != len(s):
    raise ValueError(f'{len(b)} boxes but {len(s)} scores')
  if not 0 < threshold <= 1:
    raise ValueError(f'threshold must be in (0, 1], got {threshold}')
  sums, counts, totals = b.copy(), np.ones(len(b)), s.copy()
  alive = np.ones(len(b), bool)
  means = b.copy()
  overlap = iou(means, means)
  np.fill_diagonal(overlap, -1.0)
  while alive.sum() > 1:
    i, j = np.unravel_index(int(np.argmax(overlap)), overlap.shape)
    if overlap[i, j] < threshold:
      break
    i, j = min(i, j), max(i, j)
    sums[i] += sums[j]
    counts[i] += counts[j]
    totals[i] += totals[j]
    means[i] = sums[i] / counts[i]
    alive[j] = False
    overlap[j, :] = overlap[:, j] = -1.0
    row = np.where(alive, iou(means[i], means), -1.0)
    row[i] = -1.0
    overlap[i, :] = overlap[:, i] = row
  keep = np.flatnonzero(alive)
  order = keep[np.argsort(-totals[keep], kind='stable')]
  return means[order], totals[order], counts[order].astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# The ILSVRC localisation error.


def correct(pred_class: int, pred_box, label: int, gt_boxes, threshold: float = IOU_THRESHOLD) -> bool:
  """A guess is right if its class is the image's class and its box overlaps one of the ground-truth boxes
  of that class by IoU > threshold."""
  gt = as_boxes(gt_boxes)
  if int(pred_class) != int(label) or len(gt) == 0:
    return False
  return bool(np.max(iou(np.asarray(pred_box, np.float64), gt)) > threshold)


def localization_error(pred_classes: np.ndarray, pred_boxes: np.ndarray, labels: Sequence[int],
                       gt_boxes: Sequence, k: int = 5, threshold: float = IOU_THRESHOLD) -> float:
  """The top-k localisation error: the fraction of images for which none of the first k (class, box) guesses
  is right (``correct``). pred_classes (N, >=k), pred_boxes (N, >=k, 4); gt_boxes: per image, the (M, 4)
  ground-truth boxes of its class."""
  pred_classes = np.asarray(pred_classes)
  pred_boxes = np.asarray(pred_boxes, np.float64)
  n = len(labels)
  if n == 0:
    raise ValueError('no images to score')
  if pred_classes.shape[0] != n or pred_boxes.shape[:2] != pred_classes.shape[:2]:
    raise ValueError(f'need pred_classes (N, K) and pred_boxes (N, K, 4) for N={n} images, got '
                     f'{pred_classes.shape} and {pred_boxes.shape}')
  if not 1 <= k <= pred_classes.shape[1]:
    raise ValueError(f'k={k} must be between 1 and the {pred_classes.shape[1]} guesses per image')
  wrong = 0
  for i in range(n):
    if not any(correct(pred_classes[i, j], pred_boxes[i, j], labels[i], gt_boxes[i], threshold)
               for j in range(k)):
      wrong += 1
  return wrong / n
