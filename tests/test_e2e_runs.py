"""Runs that stop and go on: resume, preemption (SIGTERM), crashes (SIGKILL, also mid-checkpoint) and two
processes joined with jax.distributed, each against one uninterrupted run on 8 devices."""

import os
import signal

import jax
import numpy as np
import pytest

import cli_util

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  """One uninterrupted tiny run on 8 devices in one process."""
  workdir = tmp_path_factory.mktemp('reference')
  cli_util.run(workdir, *cli_util.TINY, env=cli_util.cli_env(cache))
  variables, meta = cli_util.final_params(workdir)
  assert meta['step'] == 24
  return workdir, variables


def _evals(workdir):
  return [{k: r[k] for k in ('step', 'val_top1', 'val_top5', 'val_loss')}
          for r in cli_util.metrics(workdir) if 'val_top1' in r]


def test_sigterm_checkpoints_exits_0_and_resumes_identically(tmp_path, cache, reference):
  ref_dir, ref_vars = reference
  env = cli_util.cli_env(cache)
  proc = cli_util.start(tmp_path, *cli_util.TINY, env=env)
  assert cli_util.wait_for(lambda: cli_util.last_step(tmp_path) >= 6, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out.decode()[-3000:]
  stopped = cli_util.final_params(tmp_path)[1]['step']
  assert 6 <= stopped < 24 and b'preempted at step' in out
  out = cli_util.run(tmp_path, *cli_util.TINY, env=env)
  assert 'resumed from' in out and f'at step {stopped}' in out
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == 24
  cli_util.assert_identical(variables, ref_vars)
  assert _evals(tmp_path) == _evals(ref_dir)
  # metrics.jsonl holds each step once, as if the run had never stopped.
  steps = [r['step'] for r in cli_util.metrics(tmp_path) if 'loss' in r]
  assert steps == sorted(set(steps))


def test_sigkill_anywhere_even_mid_checkpoint_ends_bit_identical(tmp_path, cache, reference):
  _, ref_vars = reference
  env = cli_util.cli_env(cache)
  ckpt_dir = tmp_path / 'checkpoints'

  def writing():
    return ckpt_dir.exists() and any('tmp' in p for p in os.listdir(ckpt_dir))

  # 1) killed before the first checkpoint completes; 2) mid-training; 3) while a checkpoint is being written.
  kills = [lambda: cli_util.last_step(tmp_path) >= 2,
           lambda: cli_util.last_step(tmp_path) >= 10,
           writing]
  killed_mid_write = False
  for when in kills:
    proc = cli_util.start(tmp_path, *cli_util.TINY, env=env)
    reached = cli_util.wait_for(when, proc)
    cli_util.kill(proc)
    if when is writing and reached:
      killed_mid_write = any('tmp' in p for p in os.listdir(ckpt_dir))
  for _ in range(5):  # a checkpoint write is short: try again until a kill lands inside one
    if killed_mid_write:
      break
    proc = cli_util.start(tmp_path, *cli_util.TINY, env=env)
    if cli_util.wait_for(writing, proc):
      cli_util.kill(proc)
      killed_mid_write = any('tmp' in p for p in os.listdir(ckpt_dir))
    else:
      proc.wait()
  assert killed_mid_write, 'no kill landed inside a checkpoint write'
  complete = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())
  out = cli_util.run(tmp_path, *cli_util.TINY, env=env)
  if complete:  # the half-written step is ignored: the run resumes from the newest complete one
    assert f'at step {complete[-1]}' in out
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == 24
  cli_util.assert_identical(variables, ref_vars)


def test_two_processes_equal_one_process(tmp_path, cache, reference):
  """2 processes x 4 CPU devices joined by jax.distributed: train, checkpoint, restore, go on."""
  _, ref_vars = reference
  port = cli_util.free_port()

  def both(*extra):
    procs = []
    for i in range(2):
      env = cli_util.cli_env(cache, num_devices=4)
      procs.append(cli_util.start(
          tmp_path, *cli_util.TINY, *extra, f'--coordinator_address=localhost:{port}', '--num_processes=2',
          f'--process_id={i}', env=env, log=tmp_path / f'log{i}.txt'))
    codes = [p.wait(timeout=600) for p in procs]
    logs = [(tmp_path / f'log{i}.txt').read_text() for i in range(2)]
    assert codes == [0, 0], '\n'.join(x[-3000:] for x in logs)
    return logs

  both('--config.train.max_steps=12')
  assert cli_util.final_params(tmp_path)[1]['step'] == 12
  # Every process wrote its part: one data-iterator state per process in the checkpoint.
  written = sorted(p for p in os.listdir(tmp_path / 'checkpoints' / '12' / 'data') if p.startswith('process'))
  assert written == ['process_0-of-2.json', 'process_1-of-2.json']
  port = cli_util.free_port()
  logs = both()
  assert 'at step 12' in logs[0]
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == 24

  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), variables, ref_vars)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
  # Only process 0 logs metrics: each step once.
  steps = [r['step'] for r in cli_util.metrics(tmp_path) if 'loss' in r]
  assert steps == sorted(set(steps))
