"""Config validation: every field is checked before anything compiles, and an error names the field, the bad
value and what is allowed. ``resolve`` fills the fields whose default depends on the dataset."""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np

from vggjax import cli, localization_model, models, optim, rundir, settings
from vggjax.warm_start import parse_init_layers

SOURCES = ('tfds', 'folder', 'digits', 'mnist', 'fashion_mnist')
DTYPES = ('float32', 'bfloat16', 'float16')
NAN_POLICIES = ('stop', 'skip')


class ConfigError(cli.CommandError):
  """A config field has a bad value (a command reports it in one line and exits 2)."""


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
  if not ok:
    raise ConfigError(f'config.{field}={value!r} is not valid: {allowed}')


def _choice(cfg, field: str, choices) -> None:
  value = cfg
  for part in field.split('.'):
    value = value[part]
  _check(value in choices, field, value, 'one of ' + ', '.join(map(str, choices)))


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first bad field."""
  for section in ('model', 'data', 'train', 'optimizer'):
    _check(section in config, section, None, f'the config needs a {section} section (see configs/default.py)')
  m, d, t, o = config.model, config.data, config.train, config.optimizer
  _choice(config, 'model.name', models.MODEL_NAMES)
  _choice(config, 'model.init', models.INIT_SCHEMES)
  _choice(config, 'model.dtype', DTYPES)
  _check(m.num_classes >= 0, 'model.num_classes', m.num_classes, '0 (from the dataset) or a positive count')
  _check(0 < m.width <= 4, 'model.width', m.width, 'a multiplier in (0, 4]')
  _check(m.fc_features >= 0, 'model.fc_features', m.fc_features, '0 (4096 * width) or a positive width')
  _check(0 <= m.dropout_rate < 1, 'model.dropout_rate', m.dropout_rate, 'a probability in [0, 1)')
  _check(m.init_std > 0, 'model.init_std', m.init_std, 'a positive standard deviation')
  _choice(config, 'data.source', SOURCES)
  _check(d.source != 'tfds' or bool(d.name), 'data.name', d.name, 'a TFDS dataset name when source=tfds')
  _check(d.image_size >= 32 and d.image_size % 32 == 0, 'data.image_size', d.image_size,
         'a multiple of 32, at least 32 (fc6 spans image_size // 32)')
  _check(d.scale_min >= d.image_size, 'data.scale_min', d.scale_min,
         f'at least data.image_size ({d.image_size}): the crop is taken from the rescaled image')
  _check(d.scale_max >= d.scale_min, 'data.scale_max', d.scale_max,
         f'at least data.scale_min ({d.scale_min}); equal for a fixed scale')
  _check(d.eval_scale == 0 or d.eval_scale >= d.image_size, 'data.eval_scale', d.eval_scale,
         f'0 (the paper\'s default) or at least data.image_size ({d.image_size})')
  _check(d.color_shift >= 0, 'data.color_shift', d.color_shift, 'a non-negative std (0 disables)')
  _check(len(d.mean_rgb) == 3, 'data.mean_rgb', d.mean_rgb, 'three values (R, G, B)')
  _validate_pca(d)
  _check(len(d.std_rgb) == 3 and all(s > 0 for s in d.std_rgb), 'data.std_rgb', d.std_rgb,
         'three positive values')
  _choice(config, 'data.color_order', ('RGB', 'BGR'))
  _check(d.num_workers >= 0, 'data.num_workers', d.num_workers, '0 or more worker processes')
  _check(t.global_batch_size > 0, 'train.global_batch_size', t.global_batch_size, 'a positive batch size')
  _check(t.num_epochs > 0 or t.max_steps > 0, 'train.num_epochs', t.num_epochs,
         'positive (or set train.max_steps)')
  _check(t.max_steps >= 0, 'train.max_steps', t.max_steps, '0 (num_epochs) or a positive step count')
  for field in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints'):
    _check(t[field] > 0, f'train.{field}', t[field], 'a positive integer')
  _check(t.eval_every_steps >= 0, 'train.eval_every_steps', t.eval_every_steps, '0 (each epoch) or positive')
  _choice(config, 'train.nan_policy', NAN_POLICIES)
  _validate_knobs(config)
  _choice(config, 'optimizer.schedule', optim.SCHEDULES)
  _check(o.lr > 0, 'optimizer.lr', o.lr, 'a positive learning rate')
  _check(0 <= o.momentum < 1, 'optimizer.momentum', o.momentum, 'in [0, 1)')
  _check(o.weight_decay >= 0, 'optimizer.weight_decay', o.weight_decay, 'non-negative')
  _check(0 < o.plateau_factor < 1, 'optimizer.plateau_factor', o.plateau_factor, 'in (0, 1)')
  _check(o.plateau_patience >= 1, 'optimizer.plateau_patience', o.plateau_patience, 'at least 1 evaluation')
  _check(o.plateau_max_reductions >= 0, 'optimizer.plateau_max_reductions', o.plateau_max_reductions,
         'non-negative')
  _check(o.warmup_epochs >= 0, 'optimizer.warmup_epochs', o.warmup_epochs, 'non-negative')
  _validate_recipe(config)
  _validate_head(config)


def _validate_pca(d: ml_collections.ConfigDict) -> None:
  """data.pca_eigval (3 non-negative values) and data.pca_eigvec (3 rows of 3: eigenvectors as columns)."""
  defaults = settings.default_config().data
  val, vec = d.get('pca_eigval', defaults.pca_eigval), d.get('pca_eigvec', defaults.pca_eigvec)
  ok = len(val) == 3
  try:
    ok = ok and all(float(v) >= 0 for v in val)
  except (TypeError, ValueError):
    ok = False
  _check(ok, 'data.pca_eigval', val, 'three non-negative eigenvalues (prepare stats prints them)')
  try:
    m = np.asarray(vec, np.float64)
    ok = m.shape == (3, 3) and bool(np.all(np.isfinite(m)))
  except (TypeError, ValueError):
    ok = False
  _check(ok, 'data.pca_eigvec', vec, 'a 3x3 matrix, rows R, G, B, eigenvectors as columns (prepare stats)')


def _validate_recipe(config: ml_collections.ConfigDict) -> None:
  """The paper's recipe fields: warm start (init_layers), freezing (train.trainable), accumulation."""
  m, t = config.model, config.train
  try:
    layers = parse_init_layers(settings.value(config, 'init_layers'))
  except ValueError as e:
    raise ConfigError(f'config.init_layers={config.init_layers!r} is not valid: {e}') from None
  if config.init_from and layers != 'all':
    bad = [n for n in layers if n not in models.layer_names(m.name) and not n.startswith('bn')]
    _check(not bad, 'init_layers', config.init_layers,
           f"'paper', 'all' or layer names of {m.name}: {', '.join(models.layer_names(m.name))}")
  patterns = optim.parse_patterns(t.get('trainable', settings.default_config().train.trainable))
  known = models.layer_names(m.name)
  for p in patterns:  # names of other heads are checked against the built model in train
    _check(any(c in p for c in '*?[') or p in known or not p.startswith(('conv', 'fc', 'bn')),
           'train.trainable', t.trainable,
           f'comma-separated layer-name patterns (fc*, conv5_*, fc8); {p!r} is not a layer of {m.name}: '
           f'{", ".join(known)}')
  k = t.get('accumulate_steps', settings.default_config().train.accumulate_steps)
  _check(isinstance(k, int) and k >= 1 and t.global_batch_size % k == 0, 'train.accumulate_steps', k,
         f'a positive divisor of train.global_batch_size ({t.global_batch_size}): equal micro-batches')


def _validate_knobs(config: ml_collections.ConfigDict) -> None:
  """The recipe knobs beyond the paper (optional fields; configs/default.py's values switch them off)."""
  t = settings.TrainSettings.from_config(config.train)
  _check(0 <= t.ema_decay < 1, 'train.ema_decay', t.ema_decay, '0 (no EMA) or a decay in (0, 1), e.g. 0.9999')
  _check(0 <= t.label_smoothing < 1, 'train.label_smoothing', t.label_smoothing, 'in [0, 1), e.g. 0.1')
  _check(t.profile_steps >= 0, 'train.profile_steps', t.profile_steps, '0 (no trace) or a step count')
  _check(t.loss_scale >= 1, 'train.loss_scale', t.loss_scale, 'an initial loss scale >= 1 (e.g. 32768)')
  clip = config.optimizer.get('clip_norm', settings.default_config().optimizer.clip_norm)
  _check(clip >= 0, 'optimizer.clip_norm', clip, '0 (no clipping) or a positive global norm')


def check_init_required(config: ml_collections.ConfigDict) -> None:
  """A config that continues another run (the :384 and :jitter steps of the paper's chain set init_required)
  needs init_from. Checked when training starts (planning and evaluating with such a config need none)."""
  required = settings.value(config, 'init_required')
  _check(not required or bool(config.init_from), 'init_from', config.init_from,
         f'this config continues {required}: --config.init_from=THAT_RUN (a workdir or weights directory). '
         f'To train from scratch at lr {config.optimizer.lr} anyway, set --config.init_required=\'\'')


def _validate_head(config: ml_collections.ConfigDict) -> None:
  """model.head (optional, default 'classify'): a box head (scr, pcr: paper Appendix A) trains on boxes."""
  head = config.model.get('head', settings.default_config().model.head)
  _check(head in localization_model.HEADS, 'model.head', head, 'one of ' + ', '.join(localization_model.HEADS))
  if head != 'classify':
    _check(settings.data_settings(config.data).has_boxes, 'data.boxes_file', config.data.get('boxes_file'),
           f'a boxes file (data.source=folder) or data.bbox_key (source=tfds): model.head={head} regresses '
           f'boxes')


def eval_scale(data) -> int:
  """Q for validation during training (settings.DataSettings.validation_scale)."""
  return settings.DataSettings.from_config(data).validation_scale


def resolve(config: ml_collections.ConfigDict, num_classes: int) -> ml_collections.ConfigDict:
  """A copy with dataset-dependent defaults filled in: model.num_classes and data.eval_scale."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.model.num_classes:
    config.model.num_classes = num_classes
  elif config.model.num_classes != num_classes:
    raise ConfigError(f'config.model.num_classes={config.model.num_classes} but the dataset has '
                      f'{num_classes} classes')
  config.data.eval_scale = settings.DataSettings.from_config(config.data).validation_scale
  return config


def to_json(config: ml_collections.ConfigDict) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def write(config: ml_collections.ConfigDict, workdir, extra: dict | None = None) -> None:
  """WORKDIR/config.json: the resolved config (plus `extra`), written whole (local or gs://)."""
  d = json.loads(to_json(config))
  d.update(extra or {})
  rundir.write_text(rundir.join(workdir, rundir.CONFIG_FILE), json.dumps(d, indent=2, sort_keys=True))
