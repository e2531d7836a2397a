"""Typed settings: the config read once, where it enters (docs/design.md, decision 31).

A command validates its ConfigDict (config_lib.validate) and turns its blocks into these frozen dataclasses;
the layers below (the input pipeline, the training loop) take the dataclasses, never the ConfigDict, and
read no field with a default of their own. Each default is defined once, in configs/default.py: a config
that lacks a field (a config.json of an older run, a hand-made partial config) gets that file's value.

    data = settings.DataSettings.from_config(config.data)
    it = pipeline.train_iterator(data, global_batch_size=256, seed=0)

The fields are the dataclasses' own (``DataSettings.field_names()``): nothing else lists them.
The defaults need ml_collections (configs/default.py builds a ConfigDict); without it this module still
imports, for what reads no default (loading a weights directory: predict, features, convert).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

from vggjax.preprocessing import single_test_scale

try:
  from vggjax.configs import default as default_file
except ModuleNotFoundError as e:  # no ml_collections: reading a default fails (_default_config), not this import
  if e.name != 'ml_collections':
    raise
  default_file = None


@functools.cache
def _defaults(block: str) -> dict:
  return _default_config()[block].to_dict()


def _text(v) -> str:
  return '' if v is None else str(v)


def _floats(v) -> tuple[float, ...]:
  return tuple(float(x) for x in v)


def _matrix(v) -> tuple[tuple[float, ...], ...]:
  return tuple(tuple(float(x) for x in row) for row in v)


# How each annotated type is read from a config value (JSON gives lists where the config had tuples).
_READERS = {'str': _text, 'int': int, 'float': float, 'bool': bool, 'tuple[float, ...]': _floats,
            'tuple[tuple[float, ...], ...]': _matrix}


class _Settings:
  """from_config for a frozen dataclass of a config block (BLOCK: its name in configs/default.py)."""

  BLOCK = ''

  @classmethod
  def field_names(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))

  @classmethod
  def from_config(cls, block: Mapping | Any):
    """The settings of a config block (a ConfigDict, or a dict from config.json); an instance is returned
    as it is. A missing field gets configs/default.py's value."""
    if isinstance(block, cls):
      return block
    defaults = _defaults(cls.BLOCK)
    values = {}
    for f in dataclasses.fields(cls):
      value = block[f.name] if f.name in block else defaults[f.name]
      values[f.name] = _READERS[f.type](value)
    return cls(**values)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelSettings(_Settings):
  """The ``model`` block (comments on each field in configs/default.py)."""

  BLOCK = 'model'

  name: str
  num_classes: int
  width: float
  fc_features: int
  dropout_rate: float
  init: str
  init_std: float
  dtype: str
  pool_ceil: bool
  remat: bool
  head: str


@dataclasses.dataclass(frozen=True)
class DataSettings(_Settings):
  """The ``data`` block: what the input pipeline reads, and the device-side colour statistics (comments on
  each field in configs/default.py)."""

  BLOCK = 'data'

  source: str
  name: str
  data_dir: str
  train_split: str
  eval_split: str
  image_size: int
  scale_min: int
  scale_max: int
  eval_scale: int
  flip: bool
  color_shift: float
  pca_eigval: tuple[float, ...]
  pca_eigvec: tuple[tuple[float, ...], ...]
  mean_rgb: tuple[float, ...]
  std_rgb: tuple[float, ...]
  color_order: str
  num_workers: int
  num_threads: int
  prefetch: int
  jpeg_dct_scaling: bool
  max_consecutive_bad: int
  image_key: str
  label_key: str
  boxes_file: str
  bbox_key: str

  @property
  def validation_scale(self) -> int:
    """Q for validation: eval_scale, or the paper's single test scale (S when fixed, (Smin + Smax) / 2 when
    jittered: preprocessing.single_test_scale)."""
    if self.eval_scale:
      return self.eval_scale
    return single_test_scale(self.scale_min, self.scale_max)

  @property
  def has_boxes(self) -> bool:
    """Batches with boxes: a boxes file (source=folder) or a TFDS bounding-box feature (source=tfds)."""
    return bool(self.boxes_file) if self.source == 'folder' else (
        bool(self.bbox_key) if self.source == 'tfds' else False)


@dataclasses.dataclass(frozen=True)
class TrainSettings(_Settings):
  """The ``train`` block: the training loop's settings (comments on each field in configs/default.py)."""

  BLOCK = 'train'

  global_batch_size: int
  num_epochs: float
  max_steps: int
  log_every_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  checkpoint_every_epoch: bool
  keep_checkpoints: int
  keep_best: bool
  nan_policy: str
  plot: bool
  tracker: str
  trainable: str
  accumulate_steps: int
  ema_decay: float
  label_smoothing: float
  profile_steps: int
  loss_scale: float


def value(config, name: str):
  """A top-level config field (seed, init_from, init_layers, init_required), configs/default.py's value if
  the config lacks it."""
  return config[name] if name in config else default_config()[name]


@functools.cache
def _default_config():
  if default_file is None:
    raise ModuleNotFoundError('the defaults of the config (configs/default.py) need ml_collections: pip install '
                              'ml-collections', name='ml_collections')
  return default_file.get_config()


def default_config():
  """configs/default.py's config (a copy: the defaults stay as they are)."""
  return _default_config().copy_and_resolve_references()


def data_settings(data) -> DataSettings:
  """DataSettings of a ``data`` block (or DataSettings themselves)."""
  return DataSettings.from_config(data)
