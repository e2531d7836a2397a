"""Runs that stop and go on: resume, preemption (SIGTERM), crashes (SIGKILL, also mid-checkpoint) and two
processes joined with jax.distributed, each against one uninterrupted run on 8 devices. The runs use the
plateau schedule, reducing the learning rate at steps 16 and 24, so a resume that lost its state diverges."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import cli_util
from conftest import SESSION_CACHE
from vggjax import models

pytestmark = pytest.mark.slow
RUN = [*cli_util.TINY, *cli_util.PLATEAU]


@pytest.fixture(scope='module')
def cache():
  """The session's persistent compilation cache (conftest.SESSION_CACHE): single-process runs only."""
  return SESSION_CACHE


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache):
  """One uninterrupted tiny run on 8 devices in one process."""
  workdir = tmp_path_factory.mktemp('reference')
  cli_util.run(workdir, *RUN, env=cli_util.cli_env(cache))
  variables, meta = cli_util.final_params(workdir)
  assert meta['step'] == 24
  # The schedule did what the runs below rely on: reductions at the evaluations of steps 16 and 24.
  assert [r['step'] for r in _evals(workdir, 'lr_reduced') if r['lr_reduced']] == [16, 24]
  lrs = {r['step']: r['lr'] for r in cli_util.metrics(workdir) if 'loss' in r}
  assert lrs[16] == pytest.approx(0.01) and lrs[18] == pytest.approx(0.001)
  return workdir, variables


def _evals(workdir, *extra):
  return [{k: r[k] for k in ('step', 'val_top1', 'val_top5', 'val_loss', *extra)}
          for r in cli_util.metrics(workdir) if 'val_top1' in r]


def test_sigterm_checkpoints_exits_0_and_resumes_identically_with_workers(tmp_path, cache, reference):
  """Preempted as soon as the loop runs (the run cannot finish first), then resumed; data from 2 worker
  processes in both parts, the reference from the main process."""
  ref_dir, ref_vars = reference
  env = cli_util.cli_env(cache)
  workers = '--config.data.num_workers=2'
  proc = cli_util.start(tmp_path / 'run', *RUN, workers, env=env)
  assert cli_util.wait_for(lambda: cli_util.started(proc), proc), cli_util.output(proc)[-3000:]
  proc.send_signal(signal.SIGTERM)
  out = cli_util.finish(proc, timeout=120)
  assert proc.returncode == 0, out[-3000:]
  stopped = cli_util.final_params(tmp_path / 'run')[1]['step']
  assert 1 <= stopped < 24 and 'preempted at step' in out
  # README: with JAX_COMPILATION_CACHE_DIR a restart skips compilation (the train step compiled by the
  # reference run is read from the cache).
  out = cli_util.run(tmp_path / 'run', *RUN, workers, env={**env, 'JAX_LOG_COMPILES': '1'})
  assert 'resumed from' in out and f'at step {stopped}' in out
  assert "Persistent compilation cache hit for 'jit_step_fn'" in out, out[-3000:]
  assert "PERSISTENT COMPILATION CACHE MISS for 'jit_step_fn'" not in out
  variables, meta = cli_util.final_params(tmp_path / 'run')
  assert meta['step'] == 24
  cli_util.assert_identical(variables, ref_vars)
  assert _evals(tmp_path / 'run', 'lr_reduced') == _evals(ref_dir, 'lr_reduced')
  # metrics.jsonl holds each step once, as if the run had never stopped.
  steps = [r['step'] for r in cli_util.metrics(tmp_path / 'run') if 'loss' in r]
  assert steps == sorted(set(steps))


def test_sigkill_anywhere_even_mid_checkpoint_ends_bit_identical(tmp_path, cache, reference):
  _, ref_vars = reference
  env = cli_util.cli_env(cache)
  ckpt_dir = tmp_path / 'checkpoints'

  def temporaries():
    return {p for p in os.listdir(ckpt_dir) if 'tmp' in p} if ckpt_dir.exists() else set()

  def kill_mid_write() -> bool:
    """Kills a run while it writes a checkpoint: an Orbax temporary directory that is new to this run
    (not one left behind by an earlier kill) must exist before and after the kill."""
    before = temporaries()
    proc = cli_util.start(tmp_path, *RUN, env=env)
    if not cli_util.wait_for(lambda: temporaries() - before, proc):
      proc.wait()
      return False
    cli_util.kill(proc)
    return bool(temporaries() - before)

  # 1) killed before the first checkpoint completes; 2) mid-training; 3) after the first reduction (step 16),
  # so the resume needs the schedule's state; 4) while a checkpoint is being written.
  for when in (2, 10, 18):
    proc = cli_util.start(tmp_path, *RUN, env=env)
    cli_util.wait_for(lambda: cli_util.last_step(tmp_path) >= when, proc)
    cli_util.kill(proc)
  for _ in range(6):  # a checkpoint write is short: try again until a kill lands inside one
    if kill_mid_write():
      break
  else:
    pytest.fail('no kill landed inside a checkpoint write')
  complete = sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit())
  out = cli_util.run(tmp_path, *RUN, env=env)
  if complete and complete[-1] < 24:  # the half-written step is ignored: the newest complete one resumes
    assert f'at step {complete[-1]}' in out
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == 24
  cli_util.assert_identical(variables, ref_vars)


def test_two_processes_equal_one_process(tmp_path, cache, reference):
  """2 processes x 2 CPU devices (a pod host's mix of local and remote devices; the other multi-process tests
  use one per process, docs/design.md decision 35) joined by jax.distributed: train, checkpoint, restore, go
  on."""
  ref_dir, ref_vars = reference

  def both(*extra):
    for attempt in range(3):  # again when joining failed (cli_util.JOINING_FAILED)
      port = cli_util.free_port()
      procs = [cli_util.start(
          tmp_path, *RUN, *extra, f'--coordinator_address=localhost:{port}', '--num_processes=2',
          f'--process_id={i}', env=cli_util.cli_env(None, num_devices=2),  # cli_util.MULTIPROCESS_CACHE
          log=tmp_path / f'log{i}.{attempt}.txt')
          for i in range(2)]
      codes = cli_util.wait_all(procs, timeout=600)
      logs = [cli_util.output(p) for p in procs]
      if codes == [0, 0] or not any(cli_util.joining_failed(x) for x in logs):
        break
    assert codes == [0, 0], '\n'.join(x[-3000:] for x in logs)
    return logs

  # The first half ends at a step the reference evaluates at too (16): a run that ends evaluates there, and
  # the plateau schedule must see the same evaluations as in the uninterrupted reference.
  both('--config.train.max_steps=16')
  assert cli_util.final_params(tmp_path)[1]['step'] == 16
  # Every process wrote its part: one data-iterator state per process in the checkpoint.
  written = sorted(p for p in os.listdir(tmp_path / 'checkpoints' / '16' / 'data') if p.startswith('process'))
  assert written == ['process_0-of-2.json', 'process_1-of-2.json']
  logs = both()
  assert 'at step 16' in logs[0]
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == 24

  diffs = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), variables, ref_vars)
  assert max(jax.tree_util.tree_leaves(diffs)) <= 1e-5
  # Validation as in one process: every image counted once, the same hits, the same reductions.
  got, want = _evals(tmp_path, 'val_count', 'lr_reduced'), _evals(ref_dir, 'val_count', 'lr_reduced')
  assert [(r['step'], r['val_count'], r['lr_reduced']) for r in got] == \
      [(r['step'], r['val_count'], r['lr_reduced']) for r in want]
  for g, w in zip(got, want):
    assert g['val_top1'] == pytest.approx(w['val_top1'], abs=1e-6)
    assert g['val_top5'] == pytest.approx(w['val_top5'], abs=1e-6)
    assert g['val_loss'] == pytest.approx(w['val_loss'], rel=1e-4)
  # Only process 0 logs metrics: each step once.
  steps = [r['step'] for r in cli_util.metrics(tmp_path) if 'loss' in r]
  assert steps == sorted(set(steps))


def test_evaluate_a_run_without_its_config_equals_its_last_validation(cache, reference):
  """`python -m vggjax.evaluate --workdir=RUN` with no --config (the run's config.json): single-crop top-1
  error at the run's scale is 1 - the validation top-1 it logged at its last step, on the same 300 images."""
  ref_dir, _ = reference
  p = subprocess.run([sys.executable, '-m', 'vggjax.evaluate', f'--workdir={ref_dir}', '--protocols=single'],
                     env=cli_util.cli_env(cache), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  result = json.loads((ref_dir / 'eval.json').read_text())
  (scores,) = result['results'].values()
  (single,) = scores['single'].values()
  last = _evals(ref_dir, 'val_count')[-1]
  assert last['step'] == 24 and single['num_images'] == last['val_count'] == 300
  assert single['top1_err'] == pytest.approx(1 - last['val_top1'], abs=1e-6)
  assert single['top5_err'] == pytest.approx(1 - last['val_top5'], abs=1e-6)


def test_warm_start_through_init_from_copies_the_layers_and_warns_about_normalisation(tmp_path, cache,
                                                                                         reference):
  """--config.init_from=RUN: the paper's layers are the run's (one step at a negligible learning rate later),
  the others fresh; a different input normalisation is warned about."""
  ref_dir, ref_vars = reference
  out = cli_util.run(tmp_path, *RUN, f'--config.init_from={ref_dir}', '--config.train.max_steps=1',
                     '--config.optimizer.lr=1e-12', '--config.data.mean_rgb=(0.,0.,0.)',
                     env=cli_util.cli_env(cache))
  assert 'was trained on inputs normalised as' in out and 'copied 7 layers' in out, out[-3000:]
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == 1
  for layer in models.layer_names('vgg11'):
    for k in ('kernel', 'bias'):
      got, want = variables['params'][layer][k], ref_vars['params'][layer][k]
      same = np.allclose(got, want, rtol=1e-6, atol=1e-9)
      assert same == (layer in models.WARM_START_LAYERS), (layer, k)
