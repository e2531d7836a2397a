"""Preemption notices (SIGTERM) where they hurt most: during a long evaluation pass (stopped within seconds,
checkpointed, and evaluated again on resume so that the plateau schedule sees it), and on a 2-process run,
where JAX's preemption service (not a Python handler) picks the step at which every process stops."""

import json
import signal
import time

import pytest

import cli_util

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


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


def _two_processes(workdir, *extra, signal_at: int | None = None) -> list[str]:
  """Runs the tiny run as 2 processes x 4 CPU devices; with signal_at, SIGTERM to both once process 0 has
  logged that step. Without the persistent compilation cache: 2 processes restoring the executables the
  reference run cached stall in the CPU collectives' set-up (Gloo's 30 s rendezvous times out)."""
  port = cli_util.free_port()
  procs, logs = [], [workdir / f'log{i}.txt' for i in range(2)]
  for i in range(2):
    procs.append(cli_util.start(
        workdir, *cli_util.TINY, *extra, f'--coordinator_address=localhost:{port}', '--num_processes=2',
        f'--process_id={i}', env=cli_util.cli_env(None, num_devices=4), log=logs[i]))
  if signal_at is not None:
    assert cli_util.wait_for(lambda: cli_util.last_step(workdir) >= signal_at, procs[0], timeout=600), \
        logs[0].read_text()[-3000:]
    for p in procs:
      p.send_signal(signal.SIGTERM)
  codes = [p.wait(timeout=600) for p in procs]
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], '\n'.join(t[-3000:] for t in texts)
  for log in logs:
    log.unlink()
  return texts


def test_sigterm_to_both_processes_resumes_identically(tmp_path):
  reference, run = tmp_path / 'reference', tmp_path / 'run'
  reference.mkdir()
  run.mkdir()
  _two_processes(reference)
  ref_vars, ref_meta = cli_util.final_params(reference)
  assert ref_meta['step'] == 24

  texts = _two_processes(run, signal_at=4)
  assert 'preempted at step' in texts[0], texts[0][-3000:]
  assert all('preemption notice: every process stops' in t for t in texts), texts[1][-3000:]
  assert 'received signal' not in texts[0]  # JAX's notifier handled it, not a Python handler
  stopped = cli_util.final_params(run)[1]['step']
  assert 4 <= stopped < 24
  texts = _two_processes(run)
  assert f'at step {stopped}' in texts[0] and 'resumed from' in texts[0]
  variables, meta = cli_util.final_params(run)
  assert meta['step'] == 24
  cli_util.assert_identical(variables, ref_vars)
  assert _evals(run) == _evals(reference)
  steps = [r['step'] for r in cli_util.metrics(run) if 'loss' in r]
  assert steps == sorted(set(steps))
