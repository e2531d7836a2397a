"""Preemption notices (SIGTERM): the training loop stops at a point every process agrees on, checkpoints and
exits 0 (docs/design.md, decision 19).

`StopRequest` is polled on the host only, never waiting for the device: after every training step
(`requested`) and before every evaluation batch (`in_eval`, evaluate's `stop`).

* One process: a Python SIGTERM handler sets a flag; the loop finishes the step (or drops the evaluation
  pass at the next batch), checkpoints and exits.
* Several processes: JAX's preemption service (started by jax.distributed.initialize) owns SIGTERM, and no
  Python handler is installed (it would replace JAX's notifier). Its protocol
  (xla/tsl/distributed_runtime/preemption/preemption_sync_manager.cc): once any process is notified, a
  background thread on every process reports the last id that process passed to
  `multihost_utils.reached_preemption_sync_point`, waits for all of them, and sets the sync point to the
  largest id + 1; the call whose id equals the sync point returns True. So the ids must grow by exactly one
  per call and every process must make the same sequence of calls: then each reaches the sync point, at the
  same call. The ids here are a dense counter of polls, advanced at every training step AND before every
  evaluation batch (every process runs the same global evaluation batches), so the agreed point can fall
  inside an evaluation pass and every process drops the pass at the same batch: within seconds of the
  notice, not minutes later at the end of the pass.

Orbax's CheckpointManager asks the same service itself (`reached_preemption(step)` in save(), even with
force=True, in should_save, and in the background finalisation of an async save) with the TRAINING step.
That call would overwrite the process's last id with a value off the dense sequence (a sync point computed
from it may never be reached, or be reached at different points on different processes), so `attach`
answers the manager's `reached_preemption` from this object instead (it only feeds Orbax's logs and
metrics there: our saves are forced).
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger('vggjax')


class StopRequest:
  """A preemption notice, polled by the training loop (module docstring). `restore()` puts back the signal
  handler it replaced (one process)."""

  def __init__(self):
    self.flag = threading.Event()
    self._previous = {}
    self._multi = jax.process_count() > 1
    self.counter = 0  # sync points polled so far (several processes): the ids given to JAX's service
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    log.warning('received signal %d: finishing the step, then checkpointing and exiting', signum)
    self.flag.set()

  def poll(self) -> bool:
    """True once a notice has arrived (one process) or once every process has reached the agreed point
    (several). On several processes each call is one sync point: call it at the same places on all."""
    if self.flag.is_set() or not self._multi:
      return self.flag.is_set()
    self.counter += 1
    try:
      reached = multihost_utils.reached_preemption_sync_point(self.counter)
    except RuntimeError as e:  # the preemption service is off (jax_enable_preemption_service=False)
      log.warning('preemption notices are not handled: %s', e)
      self._multi = False
      return False
    if reached:
      log.warning('preemption notice: every process stops at this point (sync point %d), checkpoints and '
                  'exits', self.counter)
      self.flag.set()
    return reached

  def requested(self, step: int) -> bool:
    """Polled after each training step."""
    del step  # the ids are the dense counter, not the step (module docstring)
    return self.poll()

  def in_eval(self) -> bool:
    """Polled before each evaluation batch (evaluate's `stop`)."""
    return self.poll()

  def reached_preemption(self, step: int) -> bool:
    """Orbax's CheckpointManager.reached_preemption, answered without touching JAX's service."""
    del step
    return self.flag.is_set()

  def attach(self, manager) -> None:
    """Makes an Orbax CheckpointManager ask this object instead of JAX's preemption service, whose ids it
    would otherwise overwrite with training steps (module docstring)."""
    manager.reached_preemption = self.reached_preemption

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
