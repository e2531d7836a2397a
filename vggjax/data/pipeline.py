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

import dataclasses
from typing import Optional

from vggjax.data import boxes_source
from vggjax.data import sources as sources_lib
from vggjax.data.iterators import (STATE_VERSION, BatchFn, EvalBatchFn, EvalIterator, TrainBatchFn,
                                   TrainIterator, bad_records)
from vggjax.settings import DataSettings, data_settings

__all__ = ['STATE_VERSION', 'BatchFn', 'DatasetInfo', 'EvalBatchFn', 'EvalIterator', 'TrainBatchFn',
           'TrainIterator', 'bad_records', 'dataset_info', 'eval_iterator', 'open_source', 'train_iterator']


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


def train_iterator(data: DataSettings, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> TrainIterator:
  """An infinite, resumable iterator of this process' training batches (module docstring: the layout)."""
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
  data = data_settings(data)
  if data.has_boxes:  # localisation: the same batches plus each crop's box
    return boxes_source.eval_iterator(data, global_batch_size=global_batch_size,
                                      process_index=process_index, process_count=process_count, scale=scale,
                                      split=split)
  return EvalIterator(data, global_batch_size=global_batch_size, process_index=process_index,
                      process_count=process_count, scale=scale, split=split)
