"""Test scales, the multi-crop grid and the dense buckets of the paper's evaluation (host side, pure)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from vggjax import preprocessing

log = logging.getLogger('vggjax')

PROTOCOLS = ('single', 'dense', 'multicrop', 'dense+multicrop')
BASE_PROTOCOLS = ('single', 'dense', 'multicrop')
GRID = 5  # the multi-crop grid is GRID x GRID, times 2 flips
ASPECT_BUCKETS = (1.0, 4 / 3, 1.5, 2.0, 3.0)
BUCKET_MULTIPLE = 32


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
