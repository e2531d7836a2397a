"""The input pipeline: deterministic, per-process, resumable batches of uint8 crops (docs/design.md, 4 and 5).

    info = pipeline.dataset_info(data)          # data: settings.DataSettings (or a config's data block)
    it = pipeline.train_iterator(data, global_batch_size=256, seed=0, process_index=p, process_count=P)
    batch = next(it)            # {'image': uint8 (256 // P, S, S, 3), 'label': int32 (256 // P,)}
    state = it.get_state()      # a small JSON-able dict; goes into the checkpoint
    it.set_state(state)         # continues with exactly the batch that was next

How the batches are made (training). Let n be the number of records, B the global batch size and
K = n // B the steps per epoch. Step t belongs to epoch e = t // K and takes positions (t % K) * B ... + B - 1
of the epoch's permutation ``np.random.default_rng([seed, e]).permutation(n)``: a global shuffle each epoch,
and the last incomplete global batch of every epoch (n % B records, different ones each epoch) is dropped.
Process p of P gets the p-th contiguous slice of B / P of global batch t, so the global batch at step t
is identical, content and order, for any process count (2 processes x 4 devices reproduce 1 x 8 exactly),
and the processes read disjoint records. Every random choice for a record (S, the crop, the flip) comes from
``transforms.example_rng(seed, e, index)``. A whole local batch is one Grain element, a pure function of t,
so worker processes (``data.num_workers``) each compute whole batches and Grain hands them out in order:
the batches are the same for any number of workers and threads. (Grain's own ShardOptions shard by record,
contiguously or interleaved, which does not give the P-invariant global batch; hence this index mapping.)

The iterator's state is the number of batches it has handed out (plus the seed, batch size and dataset
size, checked on restore): resuming rebuilds the pipeline at that step, with any number of workers, and
even with another process count.

Evaluation. ``eval_iterator`` walks the split in order: global batch t holds records t*B ... t*B + B - 1,
process p the p-th slice of it; every process yields ceil(n / B) batches, positions past the end are padded
(zero images) with ``mask`` False, so over all processes every record appears exactly once with mask True.
The transform is rescale-to-Q and the central crop.

Bad data. A record that cannot be read or decoded is skipped, counted and logged with its path (or TFDS
record number). In training it is replaced deterministically by the next readable record (index + 1,
+ 2, ... modulo n), so the batches stay identical for every run; in evaluation its slot gets mask False.
The records skipped to make a batch travel with it (computed wherever the batch is, a Grain worker process
or this one) and are counted as it is handed out: ``it.skipped`` (records skipped by this iterator),
``it.bad_records`` (description -> times) and ``bad_records()`` (this process); the trainer writes them to
metrics.jsonl. More than ``data.max_consecutive_bad`` unreadable records in a row is an error.

Settings. Every function takes ``vggjax.settings.DataSettings`` (typed, every field present, the defaults
those of configs/default.py); a config's ``data`` block is accepted too and read into them once, at the
entry. color_shift, mean_rgb and std_rgb are the device's (``vggjax.preprocessing``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
from typing import Any, Iterator, Optional

import numpy as np

from vggjax.data import sources as sources_lib
from vggjax.data import transforms
from vggjax.settings import DataSettings, data_settings

log = logging.getLogger(__name__)

STATE_VERSION = 1
_BAD_RECORDS: collections.Counter = collections.Counter()  # description -> times skipped, this process


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_train: int
  num_eval: int
  num_classes: int
  class_names: Optional[tuple[str, ...]]


def open_source(data: DataSettings, split: str) -> sources_lib.Source:
  """A random-access source of a split: len(source), source[i] -> {'image': uint8 (H, W, 3), 'label': int}."""
  return sources_lib.open_source(data, split)


def dataset_info(data: DataSettings) -> DatasetInfo:
  data = data_settings(data)
  train = open_source(data, data.train_split)
  num_eval = len(open_source(data, data.eval_split)) if data.eval_split else 0
  names = tuple(train.class_names) if train.class_names else None
  return DatasetInfo(len(train), num_eval, train.num_classes, names)


def eval_scale(data: DataSettings) -> int:
  """Q for validation: data.eval_scale, or the paper's single test scale (DataSettings.validation_scale)."""
  return data_settings(data).validation_scale


def bad_records() -> dict[str, int]:
  """Unreadable records skipped in this process so far: description (path, TFDS record) -> times skipped."""
  return dict(_BAD_RECORDS)


# ----------------------------------------------------------------------------------------------------------
# Batch functions: pure functions of the step, pickled into the worker processes.


class _BatchFn:
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


class _TrainBatchFn(_BatchFn):

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


class _EvalBatchFn(_BatchFn):

  def __init__(self, source, *, image_size: int, scale: int, dct_scaling: bool, **kwargs):
    super().__init__(source, **kwargs)
    transforms.validate_scales(image_size, scale, scale)
    self.image_size, self.scale, self.dct_scaling = image_size, scale, dct_scaling
    self.num_batches = math.ceil(self.n / self.global_batch_size)

  def __call__(self, step: int) -> dict:
    lb, size = self.local_batch_size, self.image_size
    images = np.zeros((lb, size, size, 3), np.uint8)
    labels = np.zeros((lb,), np.int32)
    mask = np.zeros((lb,), bool)
    bad = []
    start = int(step) * self.global_batch_size + self.offset
    for j, index in enumerate(range(start, min(start + lb, self.n))):
      try:
        image, label = self.source.record(index)
        images[j] = transforms.eval_transform(image, image_size=size, scale=self.scale,
                                              dct_scaling=self.dct_scaling)
        labels[j], mask[j] = label, True
      except Exception as e:  # noqa: BLE001 - bad data must not end a run
        bad.append((index, self.source.describe(index), f'{type(e).__name__}: {e}'[:500]))
    return {'image': images, 'label': labels, 'mask': mask, '_bad': bad}


# ----------------------------------------------------------------------------------------------------------
# Grain plumbing.


def _worker_init(worker_index: int, worker_count: int) -> None:
  del worker_index, worker_count
  import cv2
  cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe


def _grain_iterator(batch_fn, start: int, stop: int, num_workers: int, prefetch: int, num_threads: int):
  import grain
  ds = grain.MapDataset.range(start, stop).map(batch_fn)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(1, prefetch)))
  if num_workers > 0:
    from absl import flags
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
               process_count: int = 1, source: Optional[sources_lib.Source] = None):
    data = data_settings(data)
    self.source = source if source is not None else open_source(data, data.train_split)
    self._fn = _TrainBatchFn(
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
               source: Optional[sources_lib.Source] = None):
    data = data_settings(data)
    self.source = source if source is not None else open_source(data, split or data.eval_split)
    self.scale = int(scale) if scale else data.validation_scale
    self._fn = _EvalBatchFn(
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


def train_iterator(data: DataSettings, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
  """An infinite, resumable iterator of this process' training batches (module docstring: the layout)."""
  from vggjax.data import boxes_source
  data = data_settings(data)
  if data.has_boxes:  # localisation: the same batches plus each crop's box
    return boxes_source.train_iterator(data, global_batch_size=global_batch_size, seed=seed,
                                       process_index=process_index, process_count=process_count)
  return TrainIterator(data, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
                       process_count=process_count)


def eval_iterator(data: DataSettings, *, global_batch_size: int, process_index: int = 0,
                  process_count: int = 1, scale: Optional[int] = None, split: Optional[str] = None
                  ) -> EvalIterator:
  """Padded, masked evaluation batches of data.eval_split (or `split`) at scale Q (None: validation_scale)."""
  from vggjax.data import boxes_source
  data = data_settings(data)
  if data.has_boxes:  # localisation: the same batches plus each crop's box
    return boxes_source.eval_iterator(data, global_batch_size=global_batch_size,
                                      process_index=process_index, process_count=process_count, scale=scale,
                                      split=split)
  return EvalIterator(data, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, scale=scale, split=split)
