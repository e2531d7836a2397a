"""Metrology any step can use: analytic FLOPs per image, throughput and MFU, the clock discipline, the CPU.

``vggjax.benchmark`` times the framework's steps with it; benchmarks/torch_reference.py times PyTorch the
same way (through ``vggjax.benchmark``'s names).
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from typing import Any, Callable

from vggjax import models


def train_flops_per_image(model: str, image_size: int, **options) -> int:
  """Analytic FLOPs of one training image: 3x the forward pass (forward, input and weight gradients)."""
  return 3 * models.flops(model, image_size, train_size=image_size, **options).flops


def eval_flops_per_image(model: str, eval_size: int, train_size: int, **options) -> int:
  """Analytic FLOPs of the dense evaluation of one image at `eval_size` (the forward pass only)."""
  return models.flops(model, eval_size, train_size=train_size, **options).flops


def throughput(flops_per_image: float, batch: int, step_time_s: float, peak_per_device: float | None,
               num_devices: int) -> dict:
  """images/s, achieved TFLOP/s (all devices and per device) and MFU of a step over `batch` images."""
  if step_time_s <= 0:
    raise ValueError(f'step time must be positive, got {step_time_s}')
  tflops = flops_per_image * batch / step_time_s / 1e12
  per_device = tflops / num_devices
  return {'images_per_s': batch / step_time_s, 'tflops': tflops, 'tflops_per_device': per_device,
          'mfu': (per_device / peak_per_device) if peak_per_device else None}


@dataclasses.dataclass
class Timing:
  """Per-step times (seconds) of each repeat of `steps` back-to-back steps, and the process's CPU time per
  step (all its threads: on a CPU backend, the work done, whatever else the machine runs)."""
  per_step: list[float]
  steps: int
  warmup_s: list[float]
  cpu_per_step: list[float] = dataclasses.field(default_factory=list)

  @property
  def median(self) -> float:
    return statistics.median(self.per_step)

  def to_dict(self) -> dict:
    return {'step_time_s': self.median, 'step_time_min_s': min(self.per_step),
            'step_time_max_s': max(self.per_step), 'step_times_s': self.per_step, 'steps': self.steps,
            'repeats': len(self.per_step), 'warmup_step_s': self.warmup_s,
            'cpu_time_per_step_s': statistics.median(self.cpu_per_step) if self.cpu_per_step else None}


def time_steps(run: Callable[[], Any], sync: Callable[[Any], Any], *, steps: int, repeats: int,
               warmup: int) -> Timing:
  """Times `run` (dispatches one step, returns its outputs): `warmup` untimed steps, then `repeats` timings
  of `steps` back-to-back steps, each closed by `sync(outputs)` (waits for the device) before the clock."""
  if steps < 1 or repeats < 1 or warmup < 0:
    raise ValueError(f'need steps >= 1, repeats >= 1, warmup >= 0; got {steps}, {repeats}, {warmup}')
  warm = []
  for _ in range(warmup):
    t0 = time.perf_counter()
    sync(run())
    warm.append(time.perf_counter() - t0)
  per_step, cpu = [], []
  for _ in range(repeats):
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
      out = run()
    sync(out)
    per_step.append((time.perf_counter() - t0) / steps)
    cpu.append((time.process_time() - c0) / steps)
  return Timing(per_step=per_step, steps=steps, warmup_s=warm, cpu_per_step=cpu)


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
