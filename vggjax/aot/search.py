"""The one largest-batch search: the largest per-chip batch whose train step fits, by compiling.

A step's memory is close to affine in its batch, so two compiles give a line and the line predicts the edge;
the answer always comes from compiles (``search_max_batch``). Its probe compiles the train step: for a
target (a TPU slice without the hardware, ``TrainStepProbe``) or on the attached devices
(``TrainStepProbe.on_attached_devices``, which ``vggjax benchmark --max_batch`` uses).
"""

from __future__ import annotations

import math
from typing import Callable

from vggjax import hardware
from vggjax.aot import analysis
from vggjax.aot.analysis import PlanError
from vggjax.aot.steps import Steps
from vggjax.aot.target import Compiled, Target, attached_target, checked_memory, compile_step


def compile_train(steps: Steps, target: Target, per_chip: int, log: Callable[[str], None],
                  compiler_options: dict | None = None) -> Compiled:
  """The train step compiled for `target` at `per_chip` images per chip."""
  return compile_step(steps.train_step(), steps.train_args(per_chip * target.chips),
                      f'train step (per-chip batch {per_chip})', target, log, compiler_options)


def fast_compiler_options(platform: str) -> dict:
  """Compiler options that leave memory as it is and save compile time: memory does not depend on LLVM's
  optimisation, and barely on the GPU autotuner's choices."""
  options = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  if platform == 'gpu':
    options['xla_gpu_autotune_level'] = 0
  return options


class _OutOfProbes(Exception):
  pass


def search_max_batch(probe: Callable[[int], int | None], hbm_bytes: int, start: int, step: int,
                     limit: int = 4096, max_probes: int = 16) -> tuple[int, int | None, list[str]]:
  """(largest fitting batch or 0, smallest batch known not to fit or None, how each probe was chosen):
  the largest multiple of `step` whose memory `probe(b)` (bytes, or None for out of memory at compile time)
  is at most `hbm_bytes`. The memory of a step is close to affine in its batch, so two probes give a line and
  the line predicts the edge; every answer still comes from probes: the search ends only when a probe that
  fits and a probe `step` above it that does not are both compiled. Where the line misses (or a probe ran
  out of memory without a figure), the next probe moves one `step` past the last or bisects. After
  `max_probes` compiles the search stops with the bracket it has (the last line of `why` says so): the
  largest batch known to fit and the smallest known not to."""
  totals: dict[int, int | None] = {}
  why: list[str] = []

  def ask(b: int, reason: str) -> bool:
    if b not in totals:
      if len(totals) >= max_probes:
        raise _OutOfProbes()
      why.append(f'{b}: {reason}')
      totals[b] = probe(b)
    return totals[b] is not None and totals[b] <= hbm_bytes

  def floor(x: float) -> int:
    return int(x // step) * step

  b = max(step, floor(start))
  lo, hi = 0, None
  try:
    if ask(b, 'the config\'s per-chip batch'):
      lo = b
    else:
      hi = b
    while hi is None or hi - lo > step:
      measured = sorted((k, v) for k, v in totals.items() if v is not None)
      guess = None
      if len(measured) >= 2:  # the line through the two measured probes nearest the edge
        near = sorted(measured, key=lambda kv: abs(kv[1] - hbm_bytes))[:2]
        (b1, t1), (b2, t2) = sorted(near)
        if t2 > t1 and b2 > b1:
          guess = floor(b1 + (hbm_bytes - t1) * (b2 - b1) / (t2 - t1))
          reason = f'the line through {b1} and {b2}'
          if hi is not None and guess >= hi:  # the line overshoots a batch that does not fit: bisect instead
            guess = None
      if guess is None:  # no line yet: double up, halve down, or bisect
        if hi is None:
          guess, reason = 2 * lo, 'double'
        elif lo == 0:
          guess, reason = floor(hi / 2), 'halve'
        else:
          guess, reason = floor((lo + hi) / 2), 'bisect'
      # stay strictly inside (lo, hi); a guess on a known probe moves one step inwards
      guess = max(guess, lo + step)
      if hi is not None:
        guess = min(guess, hi - step)
      if hi is None and guess > limit:
        if lo >= limit or lo + step > limit:
          break
        guess = floor(limit)
      if guess <= 0 or guess in totals:
        break
      if ask(guess, reason):
        lo = guess
      else:
        hi = guess
      if lo == 0 and hi is not None and hi <= step:
        break
  except _OutOfProbes:
    why.append(f'stopped after {max_probes} compiles: the edge lies between {lo} and {hi}')
  return lo, hi, why


class TrainStepProbe:
  """``probe(b)``: the bytes one chip needs for the train step at a per-chip batch `b`, compiled for the
  target (None where the compile ran out of memory); any other compile error is a PlanError. It keeps what
  each probe gave (``probes``) and the program of the largest batch that fits (``fitting``)."""

  def __init__(self, steps: Steps, target: Target, log: Callable[[str], None],
               known: dict[int, Compiled] | None = None, compiler_options: dict | None = None):
    self.steps, self.target, self.log = steps, target, log
    self.known = known or {}
    self.compiler_options = compiler_options
    self.probes: dict[int, dict] = {}
    self.fitting: dict[int, Compiled] = {}

  @classmethod
  def on_attached_devices(cls, steps: Steps, hbm_bytes: int, log: Callable[[str], None],
                          dtype: str = 'bfloat16') -> 'TrainStepProbe':
    """A probe that compiles on the devices of `steps.mesh` (attached to this process), against
    `hbm_bytes` per device, with ``fast_compiler_options``."""
    devices = steps.mesh.devices.flatten().tolist()
    target = attached_target(devices, dtype, hbm_bytes)
    return cls(steps, target, log, compiler_options=fast_compiler_options(devices[0].platform))

  def __call__(self, b: int) -> int | None:
    target = self.target
    comp = self.known.get(b) or compile_train(self.steps, target, b, self.log, self.compiler_options)
    mem = analysis.compiled_memory(comp.compiled) if comp.ok else None
    total = checked_memory(mem, target, 'train')[0] if mem else None
    fits = bool(comp.ok and total is not None and total <= target.hbm_bytes)
    if fits and b > max(self.fitting, default=0):
      self.fitting.clear()
      self.fitting[b] = comp
    self.probes[b] = {'fits': fits,
                      'total_bytes': total, 'compile_s': round(comp.seconds, 1),
                      'error': None if comp.ok else comp.error.splitlines()[0][:300]}
    if not comp.ok and not comp.oom:
      raise PlanError(f'{target.name}: the train step at per-chip batch {b} does not compile: {comp.error}')
    self.log(f'  per-chip batch {b}: {"fits" if fits else "does not fit"}'
             + (f' ({total / hardware.GIB:.2f} GiB)' if total else ' (out of memory at compile time)'))
    return total if comp.ok else None


def max_batch(steps: Steps, target: Target, start: int, log: Callable[[str], None], limit: int = 4096,
              known: dict[int, Compiled] | None = None, granularity: int = 1,
              compiled_out: dict | None = None, probe: TrainStepProbe | None = None) -> dict:
  """The largest per-chip batch (a multiple of `granularity` and of the accumulation steps) whose train
  step fits in HBM, by compiling (``search_max_batch``: the line through two compiles predicts the edge,
  then the edge and one step above it are compiled). The compiled train step at that batch is put in
  `compiled_out['train_at_max_batch']` when given.
  `probe`: how a batch is compiled (default: for `target`)."""
  probe = probe or TrainStepProbe(steps, target, log, known)
  k = max(1, steps.accumulate_steps)
  step = math.lcm(k, max(1, granularity))  # the per-chip batch must split into the accumulation steps
  lo, hi, why = search_max_batch(probe, probe.target.hbm_bytes, start, step, limit)
  if compiled_out is not None and lo in probe.fitting:
    compiled_out['train_at_max_batch'] = probe.fitting[lo]
  exact = (hi - lo <= step) if hi is not None else (lo + step > limit)
  return {'max_per_chip_batch': lo or None, 'first_not_fitting': hi, 'exact': exact,
          'granularity': step, 'limit': limit,
          'dtype': steps.dtype,
          'remat': steps.remat, 'hbm_bytes': probe.target.hbm_bytes,
          'probes': {str(b): p for b, p in sorted(probe.probes.items())}, 'search': why}
