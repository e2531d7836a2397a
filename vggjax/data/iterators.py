"""The batches of the input pipeline and their iterators (``vggjax.data.pipeline`` describes what batch t
holds): the batch functions, pure functions of the step pickled into Grain's worker processes, and the
resumable training and finite evaluation iterators over them. ``pipeline.train_iterator`` and
``pipeline.eval_iterator`` choose the batch functions (``boxes_source``'s for localisation data).
"""

from __future__ import annotations

import collections
import json
import logging
import math
from typing import Any, Iterator, Optional

import grain
import numpy as np
from absl import flags

from vggjax.data import sources as sources_lib
from vggjax.data import transforms
from vggjax.settings import DataSettings, data_settings

log = logging.getLogger(__name__)

STATE_VERSION = 1
_BAD_RECORDS: collections.Counter = collections.Counter()  # description -> times skipped, this process


def bad_records() -> dict[str, int]:
  """Unreadable records skipped in this process so far: description (path, TFDS record) -> times skipped."""
  return dict(_BAD_RECORDS)


# ----------------------------------------------------------------------------------------------------------
# Batch functions: pure functions of the step, pickled into the worker processes.


class BatchFn:
  """Common parts: the source, the local slice of a global batch, and the skip-bad-records loop."""

  def __init__(self, source, global_batch_size: int, process_index: int, process_count: int,
               max_consecutive_bad: int):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'need 0 <= process_index < process_count, got {process_index} and {process_count}')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f'the global batch size {global_batch_size} must be a positive multiple of the '
                       f'process count {process_count}')
    self.source = source
    self.n = len(source)
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.offset = process_index * self.local_batch_size
    self.max_consecutive_bad = max_consecutive_bad

  def _read(self, index: int, transform) -> tuple[np.ndarray, int, list]:
    """transform(record image, index) for `index` or, if unreadable, the next readable record."""
    bad = []
    for attempt in range(self.max_consecutive_bad + 1):
      i = (index + attempt) % self.n
      try:
        image, label = self.source.record(i)
        return transform(image, i), label, bad
      except Exception as e:  # noqa: BLE001 - bad data must not end a run
        bad.append((i, self.source.describe(i), f'{type(e).__name__}: {e}'[:500]))
    raise RuntimeError(f'{len(bad)} consecutive unreadable records in {self.source.name} from record {index} '
                       f'on; first: {bad[0][1]}: {bad[0][2]}')


class TrainBatchFn(BatchFn):

  def __init__(self, source, *, seed: int, image_size: int, scale_min: int, scale_max: int, random_flip: bool,
               dct_scaling: bool, **kwargs):
    super().__init__(source, **kwargs)
    self.seed = int(seed)
    self.steps_per_epoch = self.n // self.global_batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f'{source.name} has {self.n} records, fewer than one global batch of '
                       f'{self.global_batch_size}')
    transforms.validate_scales(image_size, scale_min, scale_max)
    self.kw = dict(image_size=image_size, scale_min=scale_min, scale_max=scale_max, random_flip=random_flip,
                   dct_scaling=dct_scaling)
    self.image_size = image_size
    self._perm_cache: dict[int, np.ndarray] = {}

  def permutation(self, epoch: int) -> np.ndarray:
    perm = self._perm_cache.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed & 0xFFFFFFFFFFFFFFFF, epoch]).permutation(self.n)
      self._perm_cache = {epoch: perm, **{k: v for k, v in self._perm_cache.items() if k == epoch - 1}}
    return perm

  def indices(self, step: int) -> tuple[int, np.ndarray]:
    """(epoch, record indices of this process' slice of global batch `step`)."""
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    start = pos * self.global_batch_size + self.offset
    return epoch, self.permutation(epoch)[start:start + self.local_batch_size]

  def __call__(self, step: int) -> dict:
    epoch, indices = self.indices(step)
    images = np.empty((len(indices), self.image_size, self.image_size, 3), np.uint8)
    labels = np.empty((len(indices),), np.int32)
    bad = []

    def transform(image, i):
      return transforms.train_transform_view(image, transforms.example_rng(self.seed, epoch, i), **self.kw)

    for j, index in enumerate(indices):
      images[j], labels[j], b = self._read(int(index), transform)
      bad += b
    return {'image': images, 'label': labels, '_bad': bad}


class EvalBatchFn(BatchFn):

  def __init__(self, source, *, image_size: int, scale: int, dct_scaling: bool, **kwargs):
    super().__init__(source, **kwargs)
    transforms.validate_scales(image_size, scale, scale)
    self.image_size, self.scale, self.dct_scaling = image_size, scale, dct_scaling
    self.num_batches = math.ceil(self.n / self.global_batch_size)

  def extra_fields(self, lb: int) -> dict:
    """Per-example arrays a subclass's batches carry beside image, label and mask (zeros: padding)."""
    return {}

  def fill(self, batch: dict, j: int, index: int, image) -> None:
    """Example `index` (its encoded image) into row j of the batch's arrays, label and mask aside."""
    batch['image'][j] = transforms.eval_transform(image, image_size=self.image_size, scale=self.scale,
                                                  dct_scaling=self.dct_scaling)

  def __call__(self, step: int) -> dict:
    lb, size = self.local_batch_size, self.image_size
    batch = {'image': np.zeros((lb, size, size, 3), np.uint8), 'label': np.zeros((lb,), np.int32),
             **self.extra_fields(lb), 'mask': np.zeros((lb,), bool)}
    bad = []
    start = int(step) * self.global_batch_size + self.offset
    for j, index in enumerate(range(start, min(start + lb, self.n))):
      try:
        image, label = self.source.record(index)
        self.fill(batch, j, index, image)
        batch['label'][j], batch['mask'][j] = label, True
      except Exception as e:  # noqa: BLE001 - bad data must not end a run
        bad.append((index, self.source.describe(index), f'{type(e).__name__}: {e}'[:500]))
    batch['_bad'] = bad
    return batch


# ----------------------------------------------------------------------------------------------------------
# Grain plumbing.


def _worker_init(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  import cv2
  cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _grain_iterator(batch_fn, start: int, stop: int, num_workers: int, prefetch: int, num_threads: int):
  ds = grain.MapDataset.range(start, stop).map(batch_fn)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch)))
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (absl.app.run parses them)
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(1, prefetch)),
                        worker_init_fn=_worker_init)
  return iter(ds)


def _report_bad(bad: list, seen: collections.Counter) -> None:
  for index, description, error in bad:
    if description not in _BAD_RECORDS:
      log.warning('skipping unreadable record %s (index %d): %s', description, index, error)
    _BAD_RECORDS[description] += 1
    seen[description] += 1


def _options(data: DataSettings) -> dict:
  return dict(num_workers=data.num_workers, prefetch=data.prefetch, num_threads=data.num_threads)


class TrainIterator:
  """Infinite iterator of local training batches; see the module docstring for what batch t holds."""

  def __init__(self, data: DataSettings, *, global_batch_size: int, seed: int, process_index: int = 0,
               process_count: int = 1, source: Optional[sources_lib.Source] = None,
               batch_fn: type[TrainBatchFn] = TrainBatchFn):
    data = data_settings(data)
    self.source = source if source is not None else sources_lib.open_source(data, data.train_split)
    self._fn = batch_fn(
        self.source, seed=seed, image_size=data.image_size, scale_min=data.scale_min,
        scale_max=data.scale_max, random_flip=data.flip, dct_scaling=data.jpeg_dct_scaling,
        global_batch_size=int(global_batch_size), process_index=int(process_index),
        process_count=int(process_count), max_consecutive_bad=data.max_consecutive_bad)
    self._opts = _options(data)
    self.bad_records: collections.Counter = collections.Counter()  # description -> times skipped
    self._step = 0
    self._it = None

  @property
  def steps_per_epoch(self) -> int:
    return self._fn.steps_per_epoch

  @property
  def skipped(self) -> int:
    """Unreadable records skipped to make the batches handed out so far (by this iterator)."""
    return sum(self.bad_records.values())

  @property
  def step(self) -> int:
    """The number of batches handed out so far (the index of the next one)."""
    return self._step

  @property
  def epoch(self) -> int:
    """The epoch of the next batch."""
    return self._step // self._fn.steps_per_epoch

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = _grain_iterator(self._fn, self._step, 2**62, **self._opts)
    batch = next(self._it)
    _report_bad(batch.pop('_bad'), self.bad_records)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {'version': STATE_VERSION, 'step': self._step, 'seed': self._fn.seed,
            'global_batch_size': self._fn.global_batch_size, 'num_records': self._fn.n}

  def set_state(self, state) -> None:
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    for key in ('seed', 'global_batch_size', 'num_records'):
      if key in state and int(state[key]) != self.get_state()[key]:
        raise ValueError(f'the data iterator state was saved with {key}={state[key]}, this iterator has '
                         f'{key}={self.get_state()[key]}: the batches would not continue the saved run')
    self.close()
    self._step = int(state['step'])

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, 'close'):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001
      pass


class EvalIterator:
  """Finite iterator of padded, masked local evaluation batches (see the module docstring)."""

  def __init__(self, data: DataSettings, *, global_batch_size: int, process_index: int = 0,
               process_count: int = 1, scale: Optional[int] = None, split: Optional[str] = None,
               source: Optional[sources_lib.Source] = None, batch_fn: type[EvalBatchFn] = EvalBatchFn):
    data = data_settings(data)
    self.source = source if source is not None else sources_lib.open_source(data, split or data.eval_split)
    self.scale = int(scale) if scale else data.validation_scale
    self._fn = batch_fn(
        self.source, image_size=data.image_size, scale=self.scale, dct_scaling=data.jpeg_dct_scaling,
        global_batch_size=int(global_batch_size), process_index=int(process_index),
        process_count=int(process_count), max_consecutive_bad=data.max_consecutive_bad)
    self._opts = _options(data)
    self.bad_records: collections.Counter = collections.Counter()
    self._it = None

  def __len__(self) -> int:
    return self._fn.num_batches

  @property
  def skipped(self) -> int:
    """Unreadable records left out of the batches handed out so far (mask False)."""
    return sum(self.bad_records.values())

  def __iter__(self) -> Iterator[dict]:
    self.close()
    # An unbounded range, stopped after num_batches and closed (steps past the end are all padding):
    # Grain's worker processes leave shared-memory buffers behind when a finite dataset runs out.
    self._it = _grain_iterator(self._fn, 0, 2**62 if self._opts['num_workers'] else self._fn.num_batches,
                               **self._opts)
    try:
      for _ in range(self._fn.num_batches):
        batch = next(self._it)
        _report_bad(batch.pop('_bad'), self.bad_records)
        yield batch
    finally:
      self.close()

  def close(self) -> None:
    it, self._it = self._it, None
    if it is not None and hasattr(it, 'close'):
      it.close()
