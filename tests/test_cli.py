"""The training command end to end, as a user runs it: `python -m vggjax.main --workdir=DIR [...]`."""

import json
import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import cli_util
from conftest import SESSION_CACHE, subprocess_env


@pytest.mark.slow
def test_default_run_reaches_95_percent(tmp_path):
  """The README's first command: the built-in demo (digits) on one CPU device, no config given."""
  workdir = tmp_path / 'demo'
  env = subprocess_env(num_devices=1)
  env.pop('VGGJAX_NUM_CPU_DEVICES')
  t0 = time.time()
  out = cli_util.run(workdir, env=env, timeout=900)
  elapsed = time.time() - t0
  rows = cli_util.metrics(workdir)
  evals = [r for r in rows if 'val_top1' in r]
  assert evals[-1]['val_top1'] >= 0.95, (evals[-1], elapsed)
  assert evals[-1]['val_count'] == 300  # the whole validation split, every image once
  assert 'val top-1' in out and 'done at step' in out
  # What a person sees: the resolved config, metrics rows, TensorBoard events, the curves, checkpoints.
  config = json.loads((workdir / 'config.json').read_text())
  assert config['model']['num_classes'] == 10 and config['data']['source'] == 'digits'
  train_rows = [r for r in rows if 'loss' in r]
  assert {'step', 'epoch', 'loss', 'lr', 'img_per_s'} <= set(train_rows[0])
  assert {'step', 'epoch', 'val_top1', 'val_top5'} <= set(evals[0])
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir / 'tensorboard'))
  assert (workdir / 'curves.png').stat().st_size > 10_000
  assert os.listdir(workdir / 'checkpoints')
  print(f'default run: val top-1 {evals[-1]["val_top1"]:.4f} in {elapsed:.0f} s')
  # The same command again: nothing to train, and it says where the run stands.
  again = cli_util.run(workdir, env=env, timeout=300)
  step = evals[-1]['step']
  assert (f'done at step {step} ' in again and f'val top-1 {evals[-1]["val_top1"]:.4f}' in again
          and f'(evaluated at step {step})' in again), again[-2000:]


@pytest.mark.parametrize('override,message', [
    ('--config.optimizer.lr=-1', 'config.optimizer.lr=-1.0 is not valid: a positive learning rate'),
    ('--config.model.name=vgg17', "config.model.name='vgg17' is not valid: one of vgg11"),
    ('--config.optimizer.lrr=0.1', 'lrr'),
    ('--config.data.scale_min=16', 'config.data.scale_min=16 is not valid: at least data.image_size (32)'),
])
def test_bad_config_fails_before_anything_compiles(tmp_path, override, message):
  p = subprocess.run([sys.executable, '-m', 'vggjax.main', f'--workdir={tmp_path}', override],
                     env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert p.returncode != 0
  assert message in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / 'checkpoints').exists() and not (tmp_path / 'metrics.jsonl').exists()


@pytest.mark.parametrize('command,args,named', [
    ('train', ['--workdir=W', '--bogus_flag=1'], 'bogus_flag'),
    ('train', ['--workdir=W', '--config.optimizer.lr=-1'], 'config.optimizer.lr=-1.0'),
    ('train', ['--workdir=W', '--config.optimizer.lrr=0.1'], "'lrr'"),
    ('train', ['--workdir=W', '--config.model.width=abc'], "'abc'"),
    ('benchmark', ['--bogus_flag=1'], 'bogus_flag'),
    ('benchmark', ['--dtype=float16'], 'float16'),
    ('benchmark', ['--model=vgg17'], "'vgg17'"),
    ('benchmark', ['--batch=0'], "'0'"),
    ('prepare', ['stats', '--bogus_flag=1'], 'bogus_flag'),
    ('prepare', ['stats', '--config.data.scale_min=8'], 'config.data.scale_min=8'),
    ('prepare', ['frobnicate'], "'frobnicate'"),
])
def test_bad_flag_or_config_is_one_line_and_exit_2(tmp_path, command, args, named):
  """Every command's start: a bad flag or config value is one line on stderr naming it, exit status 2, no
  traceback and nothing written."""
  args = [a.replace('=W', f'={tmp_path / "run"}') for a in args]
  p = subprocess.run([sys.executable, '-m', 'vggjax', command, *args], env=subprocess_env(),
                     capture_output=True, text=True, timeout=120, cwd=tmp_path)
  lines = p.stderr.strip().splitlines()
  assert p.returncode == 2, p.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith(f'vggjax {command}: error: '), p.stderr[-2000:]
  assert named in lines[0], lines
  assert not (tmp_path / 'run').exists()


@pytest.mark.slow
def test_divergence_stops_with_the_step_and_quantity_keeping_good_checkpoints(tmp_path):
  env = cli_util.cli_env(SESSION_CACHE)
  p = subprocess.run([sys.executable, '-m', 'vggjax.main', f'--workdir={tmp_path}', *cli_util.TINY,
                      '--config.optimizer.lr=1e30'], env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 3, p.stderr[-3000:]
  assert 'non-finite loss at step 1' in p.stderr
  saved = [int(s) for s in os.listdir(tmp_path / 'checkpoints') if s.isdigit()]
  assert saved == []  # the fault came before the first checkpoint: nothing bad was written


# The learning rate jumps to 1e28 at epoch 0.2 (step 10 of 46 per epoch): divergence after the checkpoints of
# steps 4 and 8 exist, before the one of step 12.
LATE_DIVERGENCE = ['--config.optimizer.schedule=step', '--config.optimizer.step_epochs=(0.2,)',
                   '--config.optimizer.step_factor=1e30']


@pytest.mark.slow
def test_divergence_after_a_checkpoint_keeps_it_and_skip_counts_the_dropped_steps(tmp_path):
  env = cli_util.cli_env(SESSION_CACHE)
  p = subprocess.run([sys.executable, '-m', 'vggjax.main', f'--workdir={tmp_path / "stop"}', *cli_util.TINY,
                      *LATE_DIVERGENCE], env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 3, p.stderr[-3000:]
  m = re.search(r'non-finite (loss|gradients|update) at step (\d+)', p.stderr)
  assert m, p.stderr[-3000:]
  fault = int(m.group(2))
  assert 10 <= fault < 12, fault
  lrs = {r['step']: r['lr'] for r in cli_util.metrics(tmp_path / 'stop') if 'loss' in r}
  assert lrs[10] == pytest.approx(0.01)  # steps 0-9 at the base rate: the fault is the planned jump
  saved = sorted(int(s) for s in os.listdir(tmp_path / 'stop' / 'checkpoints') if s.isdigit())
  assert saved == [4, 8]  # the last good checkpoint is kept, nothing after the fault is written
  variables, meta = cli_util.final_params(tmp_path / 'stop')
  assert meta['step'] == 8
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))
  # The same run with nan_policy=skip: every step from the fault on is dropped, counted in metrics.jsonl.
  out = cli_util.run(tmp_path / 'skip', *cli_util.TINY, *LATE_DIVERGENCE, '--config.train.nan_policy=skip',
                     env=env)
  assert 'done at step 24' in out
  rows = [r for r in cli_util.metrics(tmp_path / 'skip') if 'loss' in r]
  assert sum(r.get('skipped_steps', 0) for r in rows) == 24 - fault
  assert all('skipped_steps' not in r for r in rows if r['step'] <= fault)
  variables, meta = cli_util.final_params(tmp_path / 'skip')
  assert meta['step'] == 24
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(variables))
