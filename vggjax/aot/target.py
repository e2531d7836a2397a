"""Where the steps are compiled for: a TPU slice without the hardware, or the attached devices; the compile.

Compiling for a named GPU that is not attached is not possible with jax 0.10.2's CUDA plugin: it gives no
compile-only GPU topology (``jax.experimental.topologies`` implements only TPU), so a GPU plan needs a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable

import jax
from jax.experimental import topologies
from jax.experimental.compilation_cache import compilation_cache

from vggjax import hardware
from vggjax.aot import analysis
from vggjax.aot.analysis import PlanError


@dataclasses.dataclass
class Target:
  """Where the steps are compiled for: its devices (compile-only for a TPU slice) and its figures."""
  name: str
  devices: list
  chips_per_slice: int
  num_slices: int
  hosts: int
  hbm_bytes: int
  peak_flops: float | None  # per chip, for the compute dtype
  hbm_bytes_per_s: float | None
  ici_bytes_per_s: float | None  # per chip, all-reduce
  dcn_bytes_per_s: float | None  # per chip
  device_kind: str
  notes: list[str] = dataclasses.field(default_factory=list)
  compile_only: bool = False  # devices of a topology, not of a client: no persistent compilation cache

  @property
  def chips(self) -> int:
    return len(self.devices)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
         if f.name not in ('devices', 'compile_only')}
    d['chips'] = self.chips
    return d


@contextlib.contextmanager
def libtpu_environment(accelerator_type: str):
  """What libtpu reads when it loads, set for a machine that has no TPU (no metadata-server queries, no
  warnings about unknown workers), and restored afterwards."""
  values = {'TPU_SKIP_MDS_QUERY': '1', 'TPU_ACCELERATOR_TYPE': accelerator_type,
            'TPU_WORKER_HOSTNAMES': 'localhost', 'TPU_WORKER_ID': '0',
            # A compiler only: no device to guard, so no /tmp/libtpu_lockfile (another JAX process on this
            # machine that loaded libtpu while looking for TPUs may hold it).
            'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}
  old = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def tpu_target(topology: str, num_slices: int = 1, dtype: str = 'bfloat16', ici_gbps: float = 0.0,
               dcn_gbps: float = 0.0, hbm_gib: float = 0.0) -> Target:
  """The compile-only devices of `num_slices` slices of `topology` (an accelerator type such as
  v5litepod-16) and the chip's figures. Needs libtpu; never opens a TPU."""
  sl = hardware.parse_slice(topology, num_slices)
  chip = sl.chip
  try:
    with libtpu_environment(sl.accelerator_type):
      topo = topologies.get_topology_desc(**sl.topology_kwargs())
  except RuntimeError as e:
    if 'not installed' in str(e):
      raise PlanError('libtpu is not installed: it is the TPU compiler the plan needs (pip install '
                      '"vggjax[tpu-plan]", about 500 MB; no TPU needed)') from e
    raise PlanError(f'{sl.describe()}: libtpu rejected the topology {sl.topology_kwargs()}: {e}') from e
  devices = sorted(topo.devices, key=lambda d: (d.process_index, d.id))  # as parallel.devices_in_order
  if len(devices) != sl.chips:
    raise PlanError(f'{sl.describe()}: libtpu gave {len(devices)} devices, expected {sl.chips}')
  notes = [f'chip figures: {chip.source}']
  if hbm_gib:
    notes.append(f'HBM per chip set to {hbm_gib} GiB (--hbm_gib)')
  if chip.dcn_assumed and num_slices > 1 and not dcn_gbps:
    notes.append(f'DCN bandwidth per chip ASSUMED {chip.dcn_bytes_per_s * 8 / 1e9:.0f} Gbit/s for '
                 f'{chip.generation} (none published; --dcn_gbps overrides)')
  # TPUs run float32 matmuls and convolutions as bf16 passes by default (JAX's default precision).
  return Target(name=sl.describe(), devices=devices, chips_per_slice=sl.chips_per_slice,
                num_slices=num_slices,
                hosts=sl.hosts, hbm_bytes=int(hbm_gib * hardware.GIB) if hbm_gib else int(chip.hbm_bytes),
                peak_flops=chip.peak_bf16_flops,
                hbm_bytes_per_s=chip.hbm_bytes_per_s,
                ici_bytes_per_s=ici_gbps * 1e9 / 8 if ici_gbps else chip.ici_allreduce_bytes_per_s,
                dcn_bytes_per_s=dcn_gbps * 1e9 / 8 if dcn_gbps else chip.dcn_bytes_per_s,
                device_kind=devices[0].device_kind, notes=notes, compile_only=True)


def attached_target(devices: list, dtype: str = 'bfloat16', hbm_bytes: int = 0) -> Target:
  """The attached `devices` of this process (compiled for by the real compiler of their backend), their
  memory `hbm_bytes` (0: the allocator's limit) and the peak of the accelerator table."""
  kind = devices[0].device_kind
  peak, label = hardware.peak_tflops(kind, dtype)
  limit = hbm_bytes or analysis.device_memory()['limit_bytes'] or 0
  notes = [f'peak: {label or "unknown device"} (vggjax.hardware.PEAK_TFLOPS); HBM and link bandwidths are '
           'not tabulated for GPUs: the estimate counts compute only']
  return Target(name=f'{len(devices)} x {kind}',
                devices=sorted(devices, key=lambda d: (d.process_index, d.id)),
                chips_per_slice=len(devices), num_slices=1, hosts=jax.process_count(), hbm_bytes=int(limit),
                peak_flops=peak * 1e12 if peak else None, hbm_bytes_per_s=None, ici_bytes_per_s=None,
                dcn_bytes_per_s=None, device_kind=kind, notes=notes)


def gpu_target(dtype: str = 'bfloat16') -> Target:
  """The attached GPUs of this process (a plan compiled by the real GPU compiler on them)."""
  try:
    devices = jax.devices('gpu')
  except RuntimeError as e:
    raise PlanError('--topology=gpu needs an attached GPU (JAX\'s CUDA plugin cannot compile for a GPU that '
                    f'is not attached): {e}') from e
  return attached_target(devices, dtype)


def libtpu_version() -> str | None:
  """The version of the libtpu this process compiles with (None if it is not installed)."""
  try:
    import libtpu
  except ImportError:
    return None
  return getattr(libtpu, '__version__', None) or 'unknown'


def checked_memory(mem: dict, target: Target, step: str) -> tuple[int, int]:
  """``analysis.memory_total`` of a compile, refused where a TPU compiler's memory analysis cannot be right:
  the fits/does-not-fit rests on it, so a missing peak, or a peak below the arguments it includes, is a
  PlanError naming the libtpu rather than a verdict."""
  if target.device_kind.startswith('TPU'):
    peak = mem.get('peak_bytes') or 0
    if peak <= 0:
      raise PlanError(f'{target.name}: libtpu {libtpu_version()} gives no peak memory for the {step} step '
                      f'(memory analysis {mem}); without it the plan cannot say whether the step fits')
    if peak < mem['argument_bytes']:
      raise PlanError(f'{target.name}: libtpu {libtpu_version()} reports a peak memory of {peak:,} bytes for '
                      f'the {step} step, below its own arguments ({mem["argument_bytes"]:,} bytes): not a '
                      f'memory analysis the plan can use')
  return analysis.memory_total(mem)


@dataclasses.dataclass
class Compiled:
  ok: bool
  compiled: Any = None
  seconds: float = 0.0
  error: str = ''
  oom: bool = False


@contextlib.contextmanager
def no_persistent_cache():
  """JAX's persistent compilation cache off inside, as it was outside. A compile-only TPU topology has no
  client to load an executable with: reading a cached entry warns ("PjRtCompiler must be constructed with a
  Client") and writing one stores what nothing can load. JAX decides once per process whether it uses the
  cache (compilation_cache.is_cache_used), so that decision is reset on the way in and on the way out."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', enabled)
    compilation_cache.reset_cache()


def _compile(lowered, compiler_options: dict | None):
  if not compiler_options:
    return lowered.compile()
  try:
    return lowered.compile(compiler_options)
  except Exception as e:  # noqa: BLE001 (an option this XLA does not know)
    if analysis.is_oom(e):
      raise
    return lowered.compile()


def compile_step(fn, args: tuple, what: str, target: Target, log: Callable[[str], None],
                 compiler_options: dict | None = None) -> Compiled:
  """Lowers and compiles one jitted step on abstract arguments for the target (with `compiler_options`
  where given and known to this XLA)."""
  log(f'compiling the {what} for {target.name} ...')
  t0 = time.perf_counter()
  try:
    with no_persistent_cache() if target.compile_only else contextlib.nullcontext():
      compiled = _compile(fn.lower(*args), compiler_options)
  except Exception as e:  # noqa: BLE001 (the compiler's own error types differ per backend)
    message = str(e).strip()
    seconds = time.perf_counter() - t0
    log(f'  the {what} does not compile for {target.name} ({seconds:.0f} s): {message.splitlines()[0][:300]}')
    return Compiled(False, seconds=seconds, error=message, oom=analysis.is_oom(message))
  seconds = time.perf_counter() - t0
  log(f'  compiled in {seconds:.0f} s')
  return Compiled(True, compiled, seconds)
