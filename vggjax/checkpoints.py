"""Orbax checkpoints (docs/design.md, decision 6).

Two kinds of directory hold weights, and ``load_weights`` reads both:

* a training run: WORKDIR/config.json (the resolved config) and WORKDIR/checkpoints/<step>/ with the items
  ``state`` (step, params, batch_stats, optimizer and schedule state, RNG) and ``data`` (the input
  iterator's position). Saved by ``TrainCheckpointer`` (async, keep the last K, atomic: Orbax writes to a
  temporary directory and renames it when complete, so a half-written step is never restored). With
  train.keep_best the step of the best validation top-1 is kept beside the last K (Orbax's best_fn, mode
  max, on the metrics saved with each evaluated step); WORKDIR/best names it;
* a weights directory (made by ``vggjax.convert`` or ``save_weights``): DIR/variables (params and, for _bn
  models, batch_stats) and DIR/vggjax.json, the metadata: the model (name, num_classes, image_size, width,
  fc_features, and head for a localisation net), the normalization its inputs need, where the weights came from, and the labels.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from vggjax import localization_model, models, rundir, settings
from vggjax.preprocessing import Normalization

META_FILE = 'vggjax.json'
CHECKPOINT_DIR = rundir.CHECKPOINT_DIR
MODEL_KEYS = ('name', 'num_classes', 'image_size', 'width', 'fc_features', 'head')
# The items of a training checkpoint step directory (WORKDIR/checkpoints/<step>/<item>).
STATE_ITEM, DATA_ITEM, HOST_ITEM = 'state', 'data', 'host'
BEST = 'best'  # WORKDIR/best: the run's checkpoint of the best val top-1 (train.keep_best)
BEST_METRIC = 'val_top1'


def _best_fn(metrics: Mapping) -> float:
  return float(metrics[BEST_METRIC])


def best_step(workdir: str | os.PathLike) -> int | None:
  """The step of the best val top-1 among a run's kept checkpoints saved with metrics (None if none)."""
  directory = absolute(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, best_fn=_best_fn, best_mode='max'))
  try:
    return manager.best_step()
  finally:
    manager.close()


def absolute(path: str | os.PathLike) -> epath.Path:
  """An absolute epath (local paths made absolute; gs:// and other remote paths as given)."""
  p = epath.Path(path)
  return p if '://' in str(p) else epath.Path(os.path.abspath(os.fspath(p)))


def save_weights(directory: str | os.PathLike, variables: Mapping, meta: Mapping) -> epath.Path:
  """Writes variables ({'params', ['batch_stats']}) and their metadata to a weights directory."""
  directory = absolute(directory)
  missing = [k for k in ('name', 'num_classes', 'image_size') if k not in meta.get('model', {})]
  if missing:
    raise ValueError(f'weights metadata needs model.{missing}; got {dict(meta)}')
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / 'variables'
  if target.exists():
    target.rmtree()
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, jax.tree_util.tree_map(np.asarray, dict(variables)))
  ckptr.wait_until_finished()
  (directory / META_FILE).write_text(json.dumps(dict(meta), indent=2))
  return directory


def meta_from_config(config: Mapping) -> dict:
  """Weights metadata from a training run's resolved config (a dict as in WORKDIR/config.json)."""
  m = settings.ModelSettings.from_config(config['model'])  # an older run's missing fields: the defaults
  d = settings.DataSettings.from_config(config['data'])
  return {
      'model': {'name': m.name, 'num_classes': m.num_classes, 'image_size': d.image_size,
                'width': m.width, 'fc_features': m.fc_features or None, 'head': m.head},
      'normalization': Normalization.from_rgb(d.mean_rgb, d.std_rgb, d.color_order).to_dict(),
      'source': 'vggjax training run',
      'labels': config.get('labels'),
      'data': {'scale_min': d.scale_min, 'scale_max': d.scale_max},
      'train': {'ema_decay': settings.TrainSettings.from_config(config.get('train', {})).ema_decay},
  }


def model_from_meta(meta: Mapping, **overrides) -> models.VGG:
  """The VGG that weights metadata describes, a localisation net's fc8 sized for its head (dropout and dtype
  may be overridden)."""
  m = {k: v for k, v in meta['model'].items() if k in MODEL_KEYS and v is not None}
  name, head = m.pop('name'), m.pop('head', 'classify')
  if 'num_classes' in m:
    m['num_classes'] = localization_model.box_outputs(head, m['num_classes'])
  return models.get_model(name, **{**m, **overrides})


def normalization_from_meta(meta: Mapping) -> Normalization:
  return Normalization.from_dict(meta.get('normalization') or {})


def latest_step(workdir: str | os.PathLike) -> int | None:
  """The newest complete checkpoint step of a training run (None if there is none)."""
  directory = absolute(workdir) / CHECKPOINT_DIR
  if not directory.exists():
    return None
  steps = ocp.utils.checkpoint_steps(directory) if hasattr(ocp, 'utils') else []
  if not steps:
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()]
  return max(steps) if steps else None


def _resolve(path: str | os.PathLike) -> tuple[str, epath.Path, int | None]:
  """('weights', dir, None) or ('run', workdir, step) for a weights dir, a workdir, or a step directory."""
  p = absolute(path)
  if (p / META_FILE).exists():
    return 'weights', p, None
  if (p / rundir.CONFIG_FILE).exists():
    step = latest_step(p)
    if step is None:
      raise FileNotFoundError(f'{p} is a training run with no complete checkpoint in {p / CHECKPOINT_DIR}')
    return 'run', p, step
  if p.name.isdigit() and p.parent.name == CHECKPOINT_DIR and (p.parent.parent / rundir.CONFIG_FILE).exists():
    return 'run', p.parent.parent, int(p.name)
  if p.name == BEST and (p.parent / rundir.CONFIG_FILE).exists():
    step = best_step(p.parent)
    if step is None:
      raise FileNotFoundError(f'{p}: the run kept no checkpoint with validation metrics (train it with '
                              f'train.keep_best=True), or read {p.parent} (its latest checkpoint)')
    return 'run', p.parent, step
  raise FileNotFoundError(
      f'{p} is neither a weights directory (with {META_FILE}), a training workdir (with config.json and '
      f'{CHECKPOINT_DIR}/), WORKDIR/{BEST} nor a checkpoint step directory (WORKDIR/{CHECKPOINT_DIR}/<step>)')


def load_meta(path: str | os.PathLike) -> dict:
  """The weights metadata of a weights directory, a workdir or a checkpoint step directory."""
  kind, directory, step = _resolve(path)
  if kind == 'weights':
    return json.loads((directory / META_FILE).read_text())
  meta = meta_from_config(rundir.require_config(directory))
  meta['step'] = step
  return meta


WEIGHTS = ('trained', 'ema')


def load_weights(path: str | os.PathLike, *, collections: tuple[str, ...] = ('params', 'batch_stats'),
                 weights: str = 'trained') -> tuple[dict, dict]:
  """(variables, meta) from a weights directory, a training workdir (its latest checkpoint) or a checkpoint
  step directory. Only the model's variables are read (a partial restore: no optimizer state).
  ``weights='ema'``: a training run's EMA parameters (train.ema_decay) in place of the trained ones.
  Arrays come back as host numpy arrays; place them with jax.device_put."""
  if weights not in WEIGHTS:
    raise ValueError(f'weights={weights!r}; valid: {", ".join(WEIGHTS)}')
  kind, directory, step = _resolve(path)
  meta = load_meta(path)
  model = model_from_meta(meta)
  shapes = models.variable_shapes(model)
  want = {c: shapes[c] for c in collections if c in shapes}
  if weights == 'ema':
    if kind != 'run' or not ((meta.get('train') or {}).get('ema_decay')):
      raise ValueError(f'{path} has no EMA weights: train a run with train.ema_decay > 0 (or read '
                       f'weights=trained)')
    want['ema_params'] = want.pop('params')
  as_numpy = lambda t: jax.tree_util.tree_map(  # noqa: E731
      lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), t)
  source = (directory / 'variables' if kind == 'weights' else
            directory / CHECKPOINT_DIR / str(step) / STATE_ITEM)
  restored = ocp.PyTreeCheckpointer().restore(source, args=ocp.args.PyTreeRestore(
      item=want, restore_args=as_numpy(want), partial_restore=True))
  restored = dict(restored)
  if weights == 'ema':
    restored['params'] = restored.pop('ema_params')
    meta['weights'] = 'ema'
  which = {'weights': 'weights directory', 'run': 'latest checkpoint'}[kind]
  if kind == 'run' and (absolute(path).name == BEST or absolute(path).name.isdigit()):
    which = 'best val top-1 checkpoint' if absolute(path).name == BEST else 'checkpoint'
  logging.info('loaded %s from %s (%s, step %s)', '/'.join(restored), directory, which, step)
  return restored, meta


def _keep_best_options(keep: int) -> dict:
  """CheckpointManagerOptions keeping the last ``keep`` steps and the best val top-1 one (Orbax's best_fn,
  mode max; steps saved without metrics count for the last K only). Orbax takes a preservation policy
  instead of max_to_keep for the union of the two; best_fn is still set, for manager.best_step()."""
  policies = ocp.checkpoint_managers
  return dict(best_fn=_best_fn, best_mode='max', keep_checkpoints_without_metrics=True,
              preservation_policy=policies.AnyPreservationPolicy([
                  policies.LatestN(n=keep),
                  policies.BestN(get_metric_fn=_best_fn, reverse=False, n=1,
                                 keep_checkpoints_without_metrics=False)]))


class _IteratorState:
  """Adapts the input iterator to Grain's Orbax handler (one JSON file per process in each checkpoint)."""

  def __init__(self, iterator):
    self.iterator = iterator

  def get_state(self) -> bytes:
    state = self.iterator.get_state()
    return state if isinstance(state, bytes) else json.dumps(state).encode()

  def set_state(self, state: bytes) -> None:
    try:
      self.iterator.set_state(state)
    except (TypeError, ValueError, AttributeError):
      self.iterator.set_state(json.loads(state.decode()))

  def start_prefetch(self) -> None:
    pass


class TrainCheckpointer:
  """WORKDIR/checkpoints: async Orbax saves of (train state, data iterator position, host state), keep K
  (``keep_best``: and the step of the best val top-1 among those saved with metrics)."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True, keep_best: bool = False):
    import grain.checkpoint  # training only: loading weights (predict, features, convert) needs no Grain
    self._ocp, self._grain = ocp, grain.checkpoint
    directory = absolute(workdir) / CHECKPOINT_DIR
    self.manager = ocp.CheckpointManager(
        directory,
        # A step directory is written under a temporary name and renamed when complete: a run killed
        # mid-write leaves only a temporary directory, which is never restored and is cleaned up here.
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=async_save, create=True,
                                             cleanup_tmp_directories=True,
                                             **(_keep_best_options(keep) if keep_best else
                                                {'max_to_keep': keep})),
        item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                       DATA_ITEM: grain.checkpoint.CheckpointHandler(),
                       HOST_ITEM: ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, iterator, host: dict, metrics: Mapping | None = None) -> None:
    """``metrics``: the step's validation row, if it was evaluated (keep_best ranks by its val top-1)."""
    ocp = self._ocp
    if step in self.manager.all_steps():
      return
    numbers = {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, (int, float, np.number))}
    self.manager.save(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardSave(state),
        DATA_ITEM: self._grain.CheckpointSave(_IteratorState(iterator)), HOST_ITEM: ocp.args.JsonSave(host)}),
        metrics=numbers if BEST_METRIC in numbers else None, force=True)

  def restore(self, step: int, abstract_state, iterator) -> tuple[Any, dict]:
    ocp = self._ocp
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract_state),
        DATA_ITEM: self._grain.CheckpointRestore(_IteratorState(iterator)),
        HOST_ITEM: ocp.args.JsonRestore()}))
    return restored[STATE_ITEM], dict(restored[HOST_ITEM])

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def resave(self, step: int, state, iterator, host: dict, metrics: Mapping | None = None) -> None:
    """Replaces step's checkpoint (its host state changed: an interrupted evaluation has now run)."""
    self.manager.wait_until_finished()
    if step in self.manager.all_steps():
      self.manager.delete(step)
    self.save(step, state, iterator, host, metrics)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
