"""Running the real training CLI in subprocesses, as a user (or a cluster scheduler) would."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from conftest import subprocess_env

# A tiny run of the demo config (digits): narrow VGG-A, constant lr, frequent checkpoints and logs.
TINY = ['--config.model.width=0.125', '--config.model.fc_features=32', '--config.train.max_steps=24',
        '--config.train.log_every_steps=2', '--config.train.checkpoint_every_steps=4',
        '--config.train.eval_every_steps=8', '--config.optimizer.schedule=constant',
        '--config.train.global_batch_size=32', '--config.train.plot=False']


# MULTIPROCESS_CACHE: multi-process CPU runs in these tests run without the persistent compilation cache. A
# 2-process run that loaded its executables from the cache written by an earlier 2-process run failed at its
# first collective (Gloo's 30 s join timeout) three times out of three here, and ran without the cache.
def cli_env(tmp_cache: str | None, num_devices: int = 8, **extra) -> dict:
  """A CLI subprocess's environment: with its own persistent compilation cache `tmp_cache`, or with none
  (None: a multi-process run's process, or a run that must compile)."""
  env = subprocess_env(num_devices, cache=False, **extra)
  if tmp_cache:  # the persistent compilation cache makes restarts cheap (cached executables are identical)
    env.update(JAX_COMPILATION_CACHE_DIR=tmp_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


# DEVICES_PER_PROCESS: multi-process CPU tests run one virtual device per process. With 2 or 4 per process
# on a 2-core machine, a 2-process run hung now and then inside a collective (a process's device threads
# waiting for one another in XLA's CPU collectives; openxla/xla#16430 reports crashes of the same mix). One
# test keeps 2 devices per process, the mesh of a pod host (tests/test_e2e_runs.py, few collectives).
DEVICES_PER_PROCESS = 1


# The plateau schedule of the paper made to reduce at every evaluation after the first (an improvement must
# exceed 1.0 top-1), so that runs which stop and go on also test that its state is restored.
PLATEAU = ['--config.optimizer.schedule=plateau', '--config.optimizer.plateau_patience=1',
           '--config.optimizer.plateau_min_delta=1.0']
# The line the trainer logs once its loop runs (the SIGTERM handler is installed by then).
STARTED = 'training started at step'


def start(workdir, *args, env: dict, log=None) -> subprocess.Popen:
  """Starts the CLI with its output in a file (`log`, or one beside the workdir): never an undrained pipe.
  The file's path is `proc.log`; `output(proc)` reads it."""
  cmd = [sys.executable, '-m', 'vggjax.main', f'--workdir={workdir}', *args]
  if log is None:
    log = f'{os.fspath(workdir).rstrip(os.sep)}.{time.time_ns()}.log'
  with open(log, 'ab') as out:
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
  proc.log = os.fspath(log)
  return proc


def output(proc: subprocess.Popen) -> str:
  with open(proc.log, errors='replace') as f:
    return f.read()


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
  """Waits for the process and returns its output."""
  proc.wait(timeout=timeout)
  return output(proc)


def run(workdir, *args, env: dict, timeout: float = 600) -> str:
  p = subprocess.run([sys.executable, '-m', 'vggjax.main', f'--workdir={workdir}', *args], env=env,
                     capture_output=True, text=True, timeout=timeout)
  if p.returncode:
    raise AssertionError(f'exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}')
  return p.stdout + p.stderr


def metrics(workdir) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_step(workdir) -> int:
  rows = metrics(workdir)
  return max((r['step'] for r in rows), default=0)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.002) -> bool:
  t0 = time.time()
  while time.time() - t0 < timeout:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  raise TimeoutError('condition not reached')


def final_params(workdir) -> dict:
  from vggjax import checkpoints
  variables, meta = checkpoints.load_weights(workdir)
  return variables, meta


def assert_identical(a: dict, b: dict) -> None:
  flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    assert np.array_equal(x, y), f'{jax.tree_util.keystr(path)} differs: max {np.abs(x - y).max()}'


def started(proc: subprocess.Popen) -> bool:
  return STARTED in output(proc)


def free_port() -> int:
  """A free port below Linux's ephemeral range (32768-60999), which the kernel never hands to another
  socket by itself (bind to port 0, outgoing connections): free now stays free unless someone asks for it by
  number. Callers retry with a new port when a process reports a bind failure (`joining_failed`)."""
  for _ in range(200):
    port = random.randint(20000, 32000)
    with socket.socket() as s:
      try:
        s.bind(('localhost', port))
      except OSError:
        continue
      return port
  raise RuntimeError('no free port in 20000-32000')


# Failures of processes joining one another, not of what is tested: the port taken by someone else, or (on
# an overloaded machine) one process reaching the first collective more than Gloo's fixed 30 s after the
# other. Multi-process tests start both processes again (a new port; runs resume from their checkpoint).
JOINING_FAILED = ('address already in use', 'failed to bind', 'failed to add port',
                  'gloo context initialization failed')


def joining_failed(text: str) -> bool:
  return any(m in text.lower() for m in JOINING_FAILED)


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.wait(timeout=120)


def wait_all(procs: list, timeout: float = 600) -> list[int]:
  """Exit codes of the processes of one multi-process run, waiting at most `timeout` seconds for all of
  them together. A run that outlives it is a hang: every process still running is asked for its threads'
  Python stacks (SIGUSR1: vggjax.parallel.dump_stacks_on_signal, into its log), then all are killed, and the
  error names each hung process, its pid, and the end of its log with the stacks. Nothing outlives the test."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      try:
        p.wait(timeout=max(0.0, deadline - time.time()))
      except subprocess.TimeoutExpired:
        break
    hung = [(i, p) for i, p in enumerate(procs) if p.poll() is None]
    if hung:
      for _, p in hung:
        p.send_signal(signal.SIGUSR1)
      time.sleep(3)  # faulthandler writes the stacks at once; the log is a file, not a pipe
      report = []
      for i, p in hung:
        text = output(p) if hasattr(p, 'log') else ''
        report.append(f'--- process {i} (pid {p.pid}) still running after {timeout:.0f} s; end of its log:\n'
                      f'{text[-6000:]}')
      raise AssertionError('a multi-process run hung:\n' + '\n'.join(report))
    return [p.returncode for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
