"""Running the real training CLI in subprocesses, as a user (or a cluster scheduler) would."""

from __future__ import annotations

import json
import os
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


def cli_env(tmp_cache: str | None, num_devices: int = 8, **extra) -> dict:
  env = subprocess_env(num_devices, **extra)
  if tmp_cache:  # the persistent compilation cache makes restarts cheap (cached executables are identical)
    env.update(JAX_COMPILATION_CACHE_DIR=tmp_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def start(workdir, *args, env: dict, log=None) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'vggjax.main', f'--workdir={workdir}', *args]
  out = open(log, 'ab') if log else subprocess.PIPE
  return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)


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


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def kill(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
  if proc.poll() is None:
    proc.send_signal(sig)
  proc.wait(timeout=120)
