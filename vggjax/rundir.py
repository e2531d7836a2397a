"""A run directory's layout and its step count, for the trainer and for launch/ (which must not import JAX).

    WORKDIR/config.json      the resolved config, plus the dataset's size (config_lib.write)
    WORKDIR/metrics.jsonl    one JSON row per log step and per evaluation (runlog.MetricWriter)
    WORKDIR/checkpoints/     Orbax step directories (checkpoints.TrainCheckpointer)
    WORKDIR/eval.json        the evaluation protocols' results (vggjax.evaluate)

Every reader of a run's config.json goes through ``read_config``, and every whole-file write of a run
directory (config.json, eval.json, transfer.json, a sweep's manifest) through ``write_text``/``write_json``.

Standard library only (gs:// paths are read through etils.epath, imported when one is used).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

CONFIG_FILE = 'config.json'
METRICS_FILE = 'metrics.jsonl'
CHECKPOINT_DIR = 'checkpoints'
EVAL_FILE = 'eval.json'


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def path(p):
  """A pathlib.Path, or an etils.epath.Path for gs:// and other remote paths."""
  if is_remote(p):
    from etils import epath  # reads gs:// where a backend (gcsfs or TensorFlow) is installed
    return epath.Path(p)
  return pathlib.Path(p)


def join(root, name: str) -> str:
  root = os.fspath(root)
  return root.rstrip('/') + '/' + name if is_remote(root) else os.path.join(root, name)


def read_json(p) -> Any:
  """The JSON file's content, None if there is no such file."""
  p = path(p)
  if not p.exists():
    return None
  return json.loads(p.read_text())


def read_config(workdir) -> dict | None:
  """WORKDIR/config.json (local or gs://), None if there is none: the one reader of a run's config."""
  return read_json(join(workdir, CONFIG_FILE))


def require_config(workdir, why: str = '') -> dict:
  """WORKDIR/config.json; FileNotFoundError naming the file (and what needs it) if there is none."""
  config = read_config(workdir)
  if config is None:
    raise FileNotFoundError(f'{join(workdir, CONFIG_FILE)} does not exist{": " + why if why else ""}')
  return config


def write_text(p, text: str):
  """Writes a whole file (its directory created): locally under a temporary name renamed when complete (a
  reader never sees half a file); on an object store (gs://) in one upload, which is atomic there. Returns
  the path (rundir.path)."""
  p = path(p)
  p.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    p.write_text(text)
    return p
  tmp = p.with_name(p.name + '.tmp')
  tmp.write_text(text)
  os.replace(tmp, p)
  return p


def write_json(p, data: Any, *, indent: int = 2, sort_keys: bool = False):
  """``data`` as a JSON file, written whole (write_text)."""
  return write_text(p, json.dumps(data, indent=indent, sort_keys=sort_keys) + '\n')


def read_rows(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (none if it does not exist; a row being written is left out)."""
  p = path(join(workdir, METRICS_FILE))
  if not p.exists():
    return []
  rows = []
  for line in p.read_text().splitlines():
    line = line.strip()
    if line:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return rows


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
  """Full global batches per epoch (the last incomplete one is dropped: vggjax.data.pipeline)."""
  return int(num_train) // int(global_batch_size)


def total_steps(max_steps: int, num_epochs: float, per_epoch: int) -> int:
  """The run's last step: max_steps, else num_epochs x steps per epoch."""
  return int(max_steps) if max_steps else int(num_epochs * per_epoch)


def run_total_steps(config: Mapping | None) -> int | None:
  """The last step of the run whose WORKDIR/config.json is `config` (None if it cannot say)."""
  try:
    t = config['train']
    return total_steps(t.get('max_steps', 0), t['num_epochs'],
                       steps_per_epoch(config['dataset']['num_train'], t['global_batch_size']))
  except (KeyError, TypeError, ValueError, ZeroDivisionError):
    return None
