"""Preemption notices (SIGTERM) where they hurt most: during a long evaluation pass (stopped within seconds,
checkpointed, and evaluated again on resume so that the plateau schedule sees it), on one process (a Python
handler) and on 2 processes (JAX's preemption service, not a Python handler, picks the evaluation batch at
which both stop); and Orbax's own queries of that service kept out of its ids (vggjax/preemption.py)."""

import json
import math
import re
import signal
import time

import numpy as np
import pytest

import cli_util
from conftest import SESSION_CACHE

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def cache():
  """The session's persistent compilation cache (conftest.SESSION_CACHE): single-process runs only."""
  return SESSION_CACHE


def _host_state(workdir, step: int) -> dict:
  return json.loads((workdir / 'checkpoints' / str(step) / 'host' / 'metadata').read_text())


def _evals(workdir) -> list[dict]:
  return [{k: r[k] for k in ('step', 'val_top1', 'val_top5', 'val_loss')}
          for r in cli_util.metrics(workdir) if 'val_top1' in r]


def _wait_for_line(log, text: str, proc, timeout: float = 600) -> None:
  """Until the process's log shows `text` (the trainer says what it is doing; no sleeps)."""
  def shown():
    return log.exists() and text in log.read_text()

  assert cli_util.wait_for(shown, proc, timeout=timeout, poll=0.05), \
      f'exited before {text!r}:\n{log.read_text()[-3000:]}'


# Two steps, then a long evaluation pass (every training image at 128x128, 8 a batch: ~190 batches).
LONG_EVAL = ['--config.model.width=0.125', '--config.model.fc_features=32', '--config.train.max_steps=2',
             '--config.train.global_batch_size=8', '--config.train.plot=False',
             '--config.data.eval_split=train',
             '--config.data.image_size=128', '--config.data.scale_min=128', '--config.data.scale_max=128',
             '--config.data.eval_scale=128', '--config.optimizer.schedule=plateau']


def test_sigterm_during_evaluation_stops_the_pass_and_resume_evaluates_again(tmp_path, cache):
  env = cli_util.cli_env(cache, num_devices=1)
  log = tmp_path / 'log.txt'
  proc = cli_util.start(tmp_path / 'run', *LONG_EVAL, env=env, log=log)
  _wait_for_line(log, 'step 2: evaluating on train', proc)
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  code = proc.wait(timeout=120)
  stopped_in = time.time() - t0
  text = log.read_text()
  assert code == 0, text[-3000:]
  assert 'evaluation of step 2 interrupted' in text and 'preempted at step 2' in text, text[-3000:]
  assert stopped_in < 30, f'{stopped_in:.1f} s from SIGTERM to exit'
  run = tmp_path / 'run'
  assert _evals(run) == []  # the pass was dropped, not finished
  host = _host_state(run, 2)
  assert host['pending_eval'] is True and host['evals'] == []

  out = cli_util.run(run, *LONG_EVAL, env=env)
  assert 'resumed from' in out and 'done at step 2' in out, out[-3000:]
  evals = _evals(run)
  assert [e['step'] for e in evals] == [2]  # evaluated once, on resume
  host = _host_state(run, 2)  # the checkpoint now holds it: the plateau schedule has seen it
  assert host['pending_eval'] is False and [e['step'] for e in host['evals']] == [2]
  assert host['schedule']['best'] == pytest.approx(evals[0]['val_top1'])


def test_orbax_saves_do_not_report_training_steps_to_the_preemption_service(tmp_path, monkeypatch):
  """Orbax's CheckpointManager asks JAX's preemption service itself, with the training step (in save(), even
  forced, and when it finalises an async save): on several processes that id would replace the dense one
  StopRequest gave the service last. A manager attached to a StopRequest asks the StopRequest instead."""
  import orbax.checkpoint as ocp
  from jax.experimental import multihost_utils

  from vggjax import preemption

  calls = []
  monkeypatch.setattr(multihost_utils, 'reached_preemption_sync_point', lambda i: calls.append(i) and False)
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=True)

  def save(directory, stop=None):
    with ocp.CheckpointManager(directory, options=options) as manager:
      if stop is not None:
        stop.attach(manager)
      manager.save(7, args=ocp.args.StandardSave({'x': np.arange(3)}), force=True)
      manager.wait_until_finished()

  save(tmp_path / 'plain')
  assert 7 in calls  # what attach is for (if this fails, Orbax no longer asks: attach is not needed)
  calls.clear()
  stop = preemption.StopRequest()
  try:
    save(tmp_path / 'attached', stop)
  finally:
    stop.restore()
  assert calls == []


def _two_processes(workdir, *extra, signal_on: str | None = None) -> tuple[list[str], float]:
  """Runs TWO_PROCESS as 2 processes x 1 CPU device; with signal_on, SIGTERM to both once process 0 has
  logged that line. Returns their logs and the seconds from the signal to the last exit. Without the
  persistent compilation cache: 2 processes restoring the executables the reference run cached stall in the
  CPU collectives' set-up (Gloo's 30 s rendezvous times out). One device per process
  (cli_util.DEVICES_PER_PROCESS): with 4, then 2 virtual devices per process, the uninterrupted run hung in
  the evaluation step's all-gather on a 2-core machine (once each, in full test runs)."""
  port = cli_util.free_port()
  procs, logs = [], [workdir / f'log{i}.txt' for i in range(2)]
  for i in range(2):
    procs.append(cli_util.start(
        workdir, *TWO_PROCESS, *extra, f'--coordinator_address=localhost:{port}', '--num_processes=2',
        f'--process_id={i}', env=cli_util.cli_env(None, num_devices=cli_util.DEVICES_PER_PROCESS),
        log=logs[i]))
  t0 = None
  try:
    if signal_on is not None:
      _wait_for_line(logs[0], signal_on, procs[0])
      t0 = time.time()
      for p in procs:
        p.send_signal(signal.SIGTERM)
    codes = cli_util.wait_all(procs, timeout=600)
  finally:  # a failed run must not outlive its test (a hung one: cli_util.wait_all)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  elapsed = time.time() - t0 if t0 is not None else 0.0
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], '\n'.join(t[-3000:] for t in texts)
  for log in logs:
    log.unlink()
  return texts, elapsed


# The tiny run on 2 processes, 8 images a step, evaluated on every training image (188 batches, each one a
# collective over both processes, each preceded by a look at the preemption service) at step 8 and at its
# end, step 12. The pass must outlast the test's reaction to its first line: 400 images (50 batches, under a
# second) once ended before the SIGTERM of a loaded CI machine reached the processes.
TWO_PROCESS = ['--config.model.width=0.125', '--config.model.fc_features=32', '--config.train.max_steps=12',
               '--config.train.log_every_steps=2', '--config.train.checkpoint_every_steps=4',
               '--config.train.eval_every_steps=8', '--config.optimizer.schedule=constant',
               '--config.train.global_batch_size=8', '--config.train.plot=False',
               '--config.data.eval_split=train']


def test_sigterm_to_both_processes_during_evaluation_resumes_identically(tmp_path):
  """JAX's preemption service picks the point where both processes stop: here inside the evaluation pass of
  step 8 (the processes poll it before every evaluation batch), not after it. (A stop during training on 2
  processes: tests/test_slurm.py, SIGTERM through SLURM.)"""
  reference, run = tmp_path / 'reference', tmp_path / 'run'
  reference.mkdir()
  run.mkdir()
  _two_processes(reference)
  ref_vars, ref_meta = cli_util.final_params(reference)
  assert ref_meta['step'] == 12 and [e['step'] for e in _evals(reference)] == [8, 12]

  texts, stopped_in = _two_processes(run, signal_on='step 8: evaluating on train')
  assert 'received signal' not in texts[0]  # JAX's notifier handled it, not a Python handler
  for text in texts:
    assert 'evaluation of step 8 interrupted' in text, text[-3000:]
  assert 'preempted at step 8' in texts[0], texts[0][-3000:]
  # Both processes stopped at the same sync point, and it lies inside the pass: the ids are 1-8 after the 8
  # training steps, then one before each evaluation batch.
  points = [re.findall(r'every process stops at this point \(sync point (\d+)\)', text) for text in texts]
  assert points[0] == points[1] and len(points[0]) == 1, points
  batches = math.ceil(next(r['val_count'] for r in cli_util.metrics(reference) if 'val_count' in r) / 8)
  assert 8 < int(points[0][0]) <= 8 + batches, (points, batches)
  assert _evals(run) == []  # the pass did not complete
  host = _host_state(run, 8)
  assert host['pending_eval'] is True and host['evals'] == []
  assert cli_util.final_params(run)[1]['step'] == 8
  print(f'2 processes: stopped before evaluation batch {int(points[0][0]) - 8} of {batches}, '
        f'{stopped_in:.1f} s from SIGTERM to exit, a checkpoint included')

  texts, _ = _two_processes(run)
  assert 'resumed from' in texts[0] and 'done at step 12' in texts[0], texts[0][-3000:]
  variables, meta = cli_util.final_params(run)
  assert meta['step'] == 12
  cli_util.assert_identical(variables, ref_vars)
  assert _evals(run) == _evals(reference)  # step 8 evaluated once, on resume, to the same figures
  assert _host_state(run, 8)['pending_eval'] is False
  steps = [r['step'] for r in cli_util.metrics(run) if 'loss' in r]
  assert steps == sorted(set(steps))
