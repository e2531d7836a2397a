"""Host side of the evaluation: reading and rescaling the records, planning the batches so that every
process runs the same sequence of shapes (an image evaluated exactly once over all processes)."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from vggjax.data import transforms

log = logging.getLogger('vggjax')

class _Reader:
  """Reads a source's records (encoded bytes or arrays): dimensions first, rescaled images later."""

  def __init__(self, source, dct_scaling: bool = True):
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
