"""An experiment tracker beside metrics.jsonl and TensorBoard (train.tracker): Weights & Biases.

    vggjax train --workdir=runs/d --config=vgg16 --config.train.tracker=wandb
    WANDB_MODE=offline vggjax train ...           # files only; `wandb sync runs/d/wandb/offline-run-*` later

Off by default (train.tracker=''); it needs the `track` extra (pip install "vggjax[track]"). Only process 0
starts a W&B run: its config is the run's resolved config (the hyperparameters, as in WORKDIR/config.json)
and every row runlog.MetricWriter writes to metrics.jsonl is logged with its step. W&B's own environment
variables set the rest (WANDB_PROJECT, default 'vggjax'; WANDB_ENTITY, WANDB_MODE, WANDB_API_KEY). Its
files go to WORKDIR/wandb (a local workdir; W&B's default directory for gs:// ones). The W&B run's id is
kept in WORKDIR/tracker.json, so a resumed run goes on in the same W&B run (rows it repeats after a
resume are at steps W&B already has, and W&B drops them).
"""

from __future__ import annotations

import math
import os
import secrets
from typing import Any, Mapping

from vggjax import config_lib, rundir, settings

TRACKERS = ('', 'wandb')
STATE_FILE = 'tracker.json'


def _number(v: Any) -> float | int | None:
  """A metric value W&B can chart (metrics.jsonl writes non-finite floats as strings)."""
  if isinstance(v, bool):
    return None
  if isinstance(v, (int, float)):
    return v
  if isinstance(v, str) and v.lower() in ('nan', 'inf', '-inf'):
    return float(v)
  return None


class WandbTracker:
  """A W&B run fed the rows of metrics.jsonl (``log``), finished by ``close``."""

  def __init__(self, run):
    self.run = run

  def log(self, row: Mapping[str, Any]) -> None:
    values = {k: _number(v) for k, v in row.items() if k != 'step'}
    values = {k: v for k, v in values.items() if v is not None}
    if values:
      self.run.log(values, step=int(row.get('step', 0)))

  def close(self) -> None:
    self.run.finish()


def check(name: str) -> None:
  if name not in TRACKERS:
    raise config_lib.ConfigError(f"config.train.tracker={name!r} is not valid: one of '' (none), "
                                 f"{', '.join(TRACKERS[1:])}")


def start(config, workdir, *, enabled: bool = True) -> WandbTracker | None:
  """The tracker config.train.tracker names, started (None when it is '' or on a process other than 0)."""
  name = settings.TrainSettings.from_config(config.train).tracker
  check(name)
  if not name or not enabled:
    return None
  try:
    import wandb
  except ImportError:
    raise config_lib.ConfigError('config.train.tracker=wandb needs wandb: pip install "vggjax[track]"'
                                 ) from None
  state_path = rundir.path(workdir) / STATE_FILE
  state = rundir.read_json(state_path) or {}
  run_id = state.get('id') or secrets.token_hex(6)  # W&B's ids: letters and digits
  local = not rundir.is_remote(workdir)
  run = wandb.init(project=os.environ.get('WANDB_PROJECT') or 'vggjax', id=run_id, resume='allow',
                   name=os.path.basename(os.fspath(workdir).rstrip('/')), config=_plain(config.to_dict()),
                   dir=os.fspath(workdir) if local else None)
  if state.get('id') != run_id:
    rundir.write_json(state_path, {'tracker': name, 'id': run_id, 'project': run.project})
  return WandbTracker(run)


def _plain(v: Any) -> Any:
  """The config as JSON values (tuples as lists, non-finite floats as strings)."""
  if isinstance(v, Mapping):
    return {k: _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v
