"""What the compiler says of a compiled step: its memory analysis, its cost analysis, out of memory."""

from __future__ import annotations

import jax


class PlanError(RuntimeError):
  """A step did not compile for the target (the message names the topology, the step and the compiler's)."""


def compiled_memory(compiled) -> dict | None:
  """The compiled executable's memory analysis (per device): arguments, outputs, aliased, temporaries, code,
  and the compiler's peak where it reports one (TPU)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 (not every backend implements it)
    return None
  if ma is None:
    return None
  get = lambda name: int(getattr(ma, name, 0) or 0)  # noqa: E731
  out = {'argument_bytes': get('argument_size_in_bytes'), 'output_bytes': get('output_size_in_bytes'),
         'alias_bytes': get('alias_size_in_bytes'), 'temp_bytes': get('temp_size_in_bytes'),
         'code_bytes': get('generated_code_size_in_bytes')}
  # Live at once: inputs, outputs not aliased to (donated) inputs, temporaries.
  out['total_bytes'] = out['argument_bytes'] + out['output_bytes'] - out['alias_bytes'] + out['temp_bytes']
  peak = get('peak_memory_in_bytes')
  if peak:
    out['peak_bytes'] = peak
  return out


def memory_total(mem: dict) -> tuple[int, int]:
  """(total bytes one chip needs, temporaries) from ``compiled_memory``. The TPU compiler reports the
  program's peak (arguments and every buffer live at once, activations included): its temp_size counts only
  part of the scratch and stays flat as the batch grows. With a peak: total = peak + code, temporaries = peak
  - arguments; without one (CPU, GPU): arguments + outputs - donated + temporaries + code."""
  if mem.get('peak_bytes'):
    return mem['peak_bytes'] + mem['code_bytes'], mem['peak_bytes'] - mem['argument_bytes']
  return mem['total_bytes'] + mem['code_bytes'], mem['temp_bytes']


def device_memory() -> dict:
  """Allocator statistics of the local devices: the largest peak and the smallest limit (None if absent)."""
  peaks, limits = [], []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # noqa: BLE001
      stats = None
    if stats:
      if 'peak_bytes_in_use' in stats:
        peaks.append(int(stats['peak_bytes_in_use']))
      if 'bytes_limit' in stats:
        limits.append(int(stats['bytes_limit']))
  return {'peak_bytes': max(peaks) if peaks else None, 'limit_bytes': min(limits) if limits else None}


def cost(compiled) -> dict:
  """XLA's cost analysis of a compiled step (per device: 'flops', 'bytes accessed', ...), {} if none."""
  try:
    c = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return {}
  if isinstance(c, (list, tuple)):
    c = c[0] if c else {}
  return dict(c or {})


def cost_flops(compiled) -> float | None:
  """XLA's own FLOP count of a compiled step (per device), as a cross-check of the analytic count."""
  flops = cost(compiled).get('flops')
  return None if flops is None else float(flops)


def is_oom(error) -> bool:
  """Whether a compile's or a run's error (an exception or its message) says out of memory."""
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()
