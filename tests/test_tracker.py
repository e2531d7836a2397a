"""The experiment tracker (train.tracker, vggjax.tracking): a tiny training run's config and metrics, with their
steps, in W&B's offline run files, read back with W&B's own reader (`wandb leet inspect --json`)."""

import json
import subprocess
import sys

import pytest

from configs import default, tiny
from conftest import reference_module
from vggjax import config_lib, train, tracking


@pytest.mark.slow  # compiling the tiny net's steps: ~20 s with the session's compilation cache, more without
def test_a_tiny_run_logs_its_config_and_metrics_to_wandb(tmp_path, monkeypatch):
  reference_module('wandb')
  monkeypatch.setenv('WANDB_MODE', 'offline')  # files only: nothing leaves the machine
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_CONSOLE', 'off')
  config = tiny.get_config('A')
  config.train.tracker = 'wandb'
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  runs = list((workdir / 'wandb').glob('offline-run-*'))
  assert len(runs) == 1, runs
  inspect = subprocess.run([sys.executable, '-m', 'wandb', 'leet', 'inspect', '--json', str(runs[0])],
                           capture_output=True, text=True, timeout=60)
  assert inspect.returncode == 0, inspect.stderr
  records = [json.loads(line) for line in inspect.stdout.splitlines() if line.strip()]
  run = next(r['run'] for r in records if r['type'] == 'run')
  assert run['run_id'] == json.loads((workdir / 'tracker.json').read_text())['id']
  assert run['project'] == 'vggjax'
  hyper = run['config']['update']
  saved = json.loads((workdir / 'config.json').read_text())
  for block in ('model', 'data', 'train', 'optimizer'):  # the resolved config, as config.json has it
    assert {k: hyper[block][k] for k in saved[block]} == saved[block], block
  assert hyper['train']['tracker'] == 'wandb' and hyper['model']['num_classes'] == 10
  history = {}
  for r in records:
    if r['type'] == 'history':
      history.setdefault(int(r['history']['step']['num']), {}).update(r['history']['item'])
  want = {}
  for row in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines()):
    want.setdefault(row['step'], {}).update({k: v for k, v in row.items() if k != 'step'})
  assert sorted(history) == sorted(want) and len(want) >= 2
  for step, values in want.items():
    for k, v in values.items():
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        assert history[step][k] == pytest.approx(v, rel=1e-6), (step, k)
  assert any('val_top1' in v for v in history.values()) and all('loss' in v for v in history.values())


def test_off_by_default_process_zero_only_and_named_choices(tmp_path):
  config = default.get_config()
  assert config.train.tracker == ''
  assert tracking.start(config, str(tmp_path)) is None
  config.train.tracker = 'wandb'
  assert tracking.start(config, str(tmp_path), enabled=False) is None  # another process than 0
  config.train.tracker = 'mlflow'
  with pytest.raises(config_lib.ConfigError, match=r"^config.train.tracker='mlflow' is not valid: one of '' "
                     r"\(none\), wandb$"):
    tracking.start(config, str(tmp_path))
  assert not list(tmp_path.iterdir())
