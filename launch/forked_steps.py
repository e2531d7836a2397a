"""Starting a study's commands (`python -m vggjax.main ...`, `vggjax.evaluate`, `vggjax.localize`) as forked
children of one process that has imported vggjax, JAX and Flax once, instead of as new interpreters.

A new interpreter spends about 2-3 s of CPU importing JAX, Flax, Orbax and vggjax before the command reads its
flags; at toy size (a tiny net, 3 steps) that is about 40% of a step. A forked child starts with those
modules imported and runs the command's module as `__main__`, with its own argv, working directory, niceness
and log file, exactly as `python -m MODULE ARGS` would from there on: nothing of JAX has started in the
parent (no backend, no device, no thread: `preload` checks), so the child initialises its backend itself,
reading XLA_FLAGS and the virtual CPU devices then. What the parent cannot give a child is an environment of
its own read at import time (JAX's JAX_* settings): every step of a study shares the study's environment,
set before `preload`.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading
import traceback

MODULES = ('vggjax.main', 'vggjax.evaluate', 'vggjax.localize')


def available() -> bool:
  return hasattr(os, 'fork')


def preload(environ: dict[str, str], cwd: str) -> None:
  """Sets the study's environment and imports the commands' modules from `cwd` first, as `python -m` run there
  would (not their flags: each command defines them when it runs). Raises if importing started a thread or a
  JAX backend, after which forking is unsafe."""
  os.environ.update(environ)
  sys.path.insert(0, cwd)
  import importlib
  for name in MODULES:
    importlib.import_module(name)
  from jax._src import xla_bridge
  started = getattr(xla_bridge, 'backends_are_initialized', lambda: bool(getattr(xla_bridge, '_backends', {})))
  if threading.active_count() != 1 or started():
    raise RuntimeError('importing the commands started a thread or a JAX backend: steps cannot be forked')


def forkable(argv: list[str]) -> bool:
  """A command this process can fork: this Python, `-m`, one of MODULES."""
  return len(argv) >= 3 and argv[0] == sys.executable and argv[1] == '-m' and argv[2] in MODULES


class Forked:
  """A forked step, polled like subprocess.Popen: poll() is None while it runs, then its exit status
  (negative: killed by that signal)."""

  def __init__(self, pid: int):
    self.pid = pid
    self.returncode: int | None = None

  def poll(self) -> int | None:
    if self.returncode is None:
      pid, status = os.waitpid(self.pid, os.WNOHANG)
      if pid:
        self.returncode = os.waitstatus_to_exitcode(status)
    return self.returncode


def start(argv: list[str], *, cwd: str, log, nice: int = 0) -> Forked:
  """Forks and runs `argv` (forkable) in the child: its stdout and stderr go to `log` (an open file)."""
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid:
    return Forked(pid)
  code = 1
  try:  # the child: never returns into the parent's code
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    os.chdir(cwd)
    if nice:
      os.nice(nice)
    sys.argv = [argv[2], *argv[3:]]
    runpy.run_module(argv[2], run_name='__main__', alter_sys=True)
    code = 0
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if isinstance(e.code, str):
      print(e.code, file=sys.stderr)
  except BaseException:  # noqa: BLE001: reported in the step's log, as an interpreter would
    traceback.print_exc()
  finally:
    try:
      atexit._run_exitfuncs()  # what the interpreter runs at exit (the child never returns to it)
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)
