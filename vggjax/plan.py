"""Will it fit, how fast, how long: the real steps compiled for a TPU slice without the hardware.

Why one module of about 1,000 lines: the plan is one pipeline (slice topology, abstract train state, compilation,
memory, FLOPs and collectives of the compiled programs, roofline, schedule, report) whose parts share the
compiled executables and the target's figures and have no use apart; split up, each part would import the rest.

    python -m vggjax.plan --config=configs/vgg16.py --topology=v5litepod-16
    python -m vggjax.plan --config=configs/vgg16.py:jitter --topology=v5p-128 --num_slices=2 --json
    python -m vggjax.plan --config=configs/vgg19.py --topology=v5litepod-8 --max_batch --workdir=plans/E
    python -m vggjax.plan --config=configs/vgg16.py --topology=gpu            # on the attached GPUs

Before a pod is booked, the question is whether the config fits in a chip's memory, how fast it could go and
what the paper's schedule would cost. JAX compiles ahead of time for a TPU slice that is not attached: with
libtpu installed (``pip install 'vggjax[tpu]'``), ``jax.experimental.topologies.get_topology_desc`` gives
the slice's devices on any machine and ``jax.jit(...).lower(abstract arguments).compile()`` runs the real
TPU compiler for them. The plan does exactly that for the steps ``vggjax.main`` would run with the config:

* the train step (``train.make_train_step`` with the config's model, optimizer, normalisation, colour
  shift, remat and nan policy), the validation step (``train.make_eval_step``, central crops) and the dense
  evaluation step (``evaluate.dense_posteriors`` at the config's single test scale Q, on ImageNet's common
  4:3 image shape in its padded bucket, with the flip), with the train state's shapes and shardings
  (``train.abstract_train_state``) on a 1-D 'data' mesh over every chip of every slice, at the config's
  global batch. Nothing is allocated and nothing runs: no TPU is claimed or touched (the process's own
  backend is the CPU; libtpu is used as a compiler only, its metadata look-ups switched off);
* per step it reports the compiler's memory analysis per chip (arguments, of which parameters, optimizer
  state and batch; temporaries; code) against the chip's HBM, its FLOPs and HBM bytes per chip beside the
  analytic count (``vggjax.models.flops``), the collectives of the compiled program (kind, count, bytes,
  participants, and whether they stay on ICI or cross DCN between slices);
* an ESTIMATED step time, a roofline: max(FLOPs / peak, HBM bytes / HBM bandwidth) + collectives at link
  bandwidth (ring all-reduce: 2 (n-1)/n x bytes / the chip's all-reduce bandwidth; across slices, a
  hierarchical all-reduce whose DCN part moves each chip's 1/n_ici share), collectives NOT overlapped with
  compute (a conservative assumption: XLA can overlap part of the gradient all-reduce with the backward
  pass). It is an estimate, never a measurement; from it: images/s per chip, per slice and in all, MFU, and
  the schedule's cost (wall-clock days and chip-hours for the config's epochs over the training set);
* hosts, processes and per-process batch, and the images/s each host's input pipeline must sustain against
  the per-core rate measured in BENCHMARKS.md ("Input pipeline"): the cores per host it needs;
* ``--max_batch``: the largest per-chip batch whose train step fits, for the config's dtype and
  ``model.remat``. A step's memory is close to affine in its batch, so the config's batch and its double
  give a line, the line predicts the edge, and the edge and one granule above it are compiled: about four
  compiles where doubling and bisection took seven or more (a compile that runs out of memory counts as not
  fitting; without two figures the search halves or bisects). The answer always comes from compiles. When the config's batch does not fit, the search runs by itself and the plan says which
  per-chip batch fits and how many accumulation steps (``train.accumulate_steps``) keep the global batch.

A step that does not compile for the slice (an op the TPU compiler rejects, a sharding error, out of memory
at compile time) is reported with the topology, the step and the compiler's message, exit code 3; a step
that compiles but does not fit in HBM exits with 4. The chip table and its sources: ``vggjax.hardware``.

GPUs: ``--topology=gpu`` compiles on the attached GPUs (their memory limit, ``benchmark.PEAK_TFLOPS``).
Compiling for a named GPU that is not attached is not possible with jax 0.10.2's CUDA plugin: it gives no
compile-only GPU topology (``jax.experimental.topologies`` implements only TPU), so a GPU plan needs a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable

from vggjax import cli, hardware

if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  cli.add_config_roots(sys.argv)

GIB = 1024 ** 3
EXIT_COMPILE_ERROR = 3
EXIT_DOES_NOT_FIT = 4
# A train step whose compiled FLOPs exceed the model's (the taps inside the image) by more than this
# recomputes activations. Measured on a v5litepod-8: D 1.004; the narrow test net 1.15 (its elementwise work
# is a larger share of a tiny net), 1.54 with model.remat (the forward convolutions done twice).
RECOMPUTE_RATIO = 1.25

# Images per core-second of the whole input pipeline (folder source, Grain, batches of 32), from
# BENCHMARKS.md "Input pipeline" (2-core AMD EPYC VM, 2026-11-28): S = 256 and S ~ U[256, 512].
PIPELINE_IMAGES_PER_CORE_S = {'fixed': 1113.0, 'jittered': 986.0}
# Datasets whose size the plan knows without reading them: (classes, training images, validation images).
KNOWN_DATASETS = {'imagenet2012': (1000, 1_281_167, 50_000)}
# ImageNet's most common photo is 500 x 375 (4:3): the dense step is planned on its padded bucket.
DENSE_IMAGE_HW = (375, 500)

_COLLECTIVE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|'
                         r'collective-permute|all-to-all|collective-broadcast)(-start)?\(')
_SHAPE = re.compile(r'\b(pred|s4|u4|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64|c64|c128|f8e4m3fn|f8e5m2)'
                    r'\[([\d,]*)\]')
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}


class PlanError(RuntimeError):
  """A step did not compile for the target (the message names the topology, the step and the compiler's)."""


# ----------------------------------------------------------------------------------------------------------
# The target: a TPU slice compiled for without the hardware, or the attached GPUs.


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

  @property
  def chips(self) -> int:
    return len(self.devices)

  def to_dict(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'devices'}
    d['chips'] = self.chips
    return d


@contextlib.contextmanager
def _libtpu_environment(accelerator_type: str):
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
  from jax.experimental import topologies
  sl = hardware.parse_slice(topology, num_slices)
  chip = sl.chip
  try:
    with _libtpu_environment(sl.accelerator_type):
      topo = topologies.get_topology_desc(**sl.topology_kwargs())
  except RuntimeError as e:
    if 'not installed' in str(e):
      raise PlanError('libtpu is not installed: it is the TPU compiler the plan needs (pip install '
                      '"vggjax[tpu]", about 500 MB; no TPU needed)') from e
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
                hosts=sl.hosts, hbm_bytes=int(hbm_gib * GIB) if hbm_gib else int(chip.hbm_bytes),
                peak_flops=chip.peak_bf16_flops,
                hbm_bytes_per_s=chip.hbm_bytes_per_s,
                ici_bytes_per_s=ici_gbps * 1e9 / 8 if ici_gbps else chip.ici_allreduce_bytes_per_s,
                dcn_bytes_per_s=dcn_gbps * 1e9 / 8 if dcn_gbps else chip.dcn_bytes_per_s,
                device_kind=devices[0].device_kind, notes=notes)


def gpu_target(dtype: str = 'bfloat16') -> Target:
  """The attached GPUs of this process (a plan compiled by the real GPU compiler on them)."""
  import jax
  from vggjax import benchmark
  try:
    devices = jax.devices('gpu')
  except RuntimeError as e:
    raise PlanError('--topology=gpu needs an attached GPU (JAX\'s CUDA plugin cannot compile for a GPU that '
                    f'is not attached): {e}') from e
  kind = devices[0].device_kind
  peak, label = benchmark.peak_tflops(kind, dtype)
  limit = benchmark.device_memory()['limit_bytes'] or 0
  notes = [f'peak: {label or "unknown device"} (vggjax.benchmark.PEAK_TFLOPS); HBM and link bandwidths are '
           'not tabulated for GPUs: the estimate counts compute only']
  return Target(name=f'{len(devices)} x {kind}',
                devices=sorted(devices, key=lambda d: (d.process_index, d.id)),
                chips_per_slice=len(devices), num_slices=1, hosts=jax.process_count(), hbm_bytes=int(limit),
                peak_flops=peak * 1e12 if peak else None, hbm_bytes_per_s=None, ici_bytes_per_s=None,
                dcn_bytes_per_s=None, device_kind=kind, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# The steps vggjax.main would run, on abstract arguments.


def _supported(fn: Callable, **kwargs) -> dict:
  """The keyword arguments `fn` takes (the trainer's options that this checkout's train.py has)."""
  params = inspect.signature(fn).parameters
  return {k: v for k, v in kwargs.items() if k in params}


@dataclasses.dataclass
class Steps:
  """The config's model, optimizer and jitted steps on a mesh, as train.train_and_evaluate builds them."""
  config: Any
  mesh: Any
  model: Any
  eval_model: Any
  tx: Any
  norm: Any
  accumulate_steps: int

  @classmethod
  def build(cls, config, mesh) -> 'Steps':
    from vggjax import optim, settings, train
    t = settings.TrainSettings.from_config(config.train)
    model = train.build_model(config)
    tx = optim.make_optimizer(config.optimizer, **_supported(optim.make_optimizer, trainable=t.trainable))
    return cls(config=config, mesh=mesh, model=model, eval_model=train.build_model(config, dropout_rate=0.0),
               tx=tx, norm=train.normalization(config), accumulate_steps=t.accumulate_steps)

  def train_step(self, remat: bool | None = None, accumulate_steps: int | None = None):
    from vggjax import settings, train
    d = settings.DataSettings.from_config(self.config.data)
    m = settings.ModelSettings.from_config(self.config.model)
    t = settings.TrainSettings.from_config(self.config.train)
    k = self.accumulate_steps if accumulate_steps is None else accumulate_steps
    kwargs = _supported(train.make_train_step, norm=self.norm, color_shift=d.color_shift,
                        remat=m.remat if remat is None else remat, nan_policy=t.nan_policy,
                        accumulate_steps=k, head=m.head, eigval=d.pca_eigval, eigvec=d.pca_eigvec)
    return train.make_train_step(self.model, self.tx, self.mesh, **kwargs)

  def eval_step(self):
    from vggjax import settings, train
    kwargs = _supported(train.make_eval_step, head=settings.ModelSettings.from_config(self.config.model).head)
    return train.make_eval_step(self.eval_model, self.mesh, self.norm, **kwargs)

  def dense_step(self):
    import jax
    from vggjax import evaluate, parallel, settings
    flip = settings.DataSettings.from_config(self.config.data).flip
    return jax.jit(functools.partial(evaluate.dense_posteriors, self.eval_model, norm=self.norm, flip=flip),
                   out_shardings=parallel.batch_sharding(self.mesh))

  # --- abstract arguments ---

  def abstract_state(self):
    from vggjax import train
    return train.abstract_train_state(self.model, self.tx, self.mesh)

  def _batch(self, global_batch: int, hw: tuple[int, int], **extra) -> dict:
    import jax
    import jax.numpy as jnp
    from vggjax import parallel
    shard = parallel.batch_sharding(self.mesh)
    batch = {'image': jax.ShapeDtypeStruct((global_batch, *hw, 3), jnp.uint8, sharding=shard),
             'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=shard)}
    for k, dtype in extra.items():
      batch[k] = jax.ShapeDtypeStruct((global_batch,), dtype, sharding=shard)
    return batch

  def train_args(self, global_batch: int) -> tuple:
    import jax
    import jax.numpy as jnp
    from vggjax import parallel
    size = self.config.data.image_size
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(self.mesh))
    return self.abstract_state(), self._batch(global_batch, (size, size)), lr

  def variables(self):
    state = self.abstract_state()
    v = {'params': state.params}
    if state.batch_stats:
      v['batch_stats'] = state.batch_stats
    return v

  def eval_args(self, global_batch: int) -> tuple:
    import jax.numpy as jnp
    size = self.config.data.image_size
    return self.variables(), self._batch(global_batch, (size, size), mask=jnp.bool_)

  def dense_shape(self) -> tuple[int, int, int]:
    """(Q, padded height, padded width) of the dense step: the config's single test scale, 4:3 bucket."""
    from vggjax import evaluate
    d = self.config.data
    q = evaluate.single_scale(d.scale_min, d.scale_max)
    h, w = DENSE_IMAGE_HW
    s = q / min(h, w)
    rh, rw = max(q, round(h * s)), max(q, round(w * s))
    return (q, *evaluate.bucket_shape(rh, rw, q))

  def dense_args(self, global_batch: int) -> tuple:
    import jax
    import jax.numpy as jnp
    from vggjax import parallel
    _, bh, bw = self.dense_shape()
    shard = parallel.batch_sharding(self.mesh)
    images = jax.ShapeDtypeStruct((global_batch, bh, bw, 3), jnp.uint8, sharding=shard)
    hw = jax.ShapeDtypeStruct((global_batch, 2), jnp.int32, sharding=shard)
    return self.variables(), images, hw


# ----------------------------------------------------------------------------------------------------------
# What the compiled program says.


def _nbytes(tree) -> int:
  import jax
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def _shape_bytes(text: str) -> int:
  return int(sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
                 for d, dims in _SHAPE.findall(text)))


def _replica_groups(line: str, n: int) -> list[list[int]] | None:
  """The groups of device indices (positions in the mesh) of one collective, from its HLO attributes."""
  import numpy as np
  m = re.search(r'replica_groups=\{(\{[\d,{} ]*\})\}', line)
  if m:
    groups = [[int(x) for x in g.split(',') if x.strip()] for g in re.findall(r'\{([\d, ]*)\}', m.group(1))]
    return [g for g in groups if g] or [list(range(n))]
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if m:
    g, s = int(m.group(1)), int(m.group(2))
    dims = [int(x) for x in m.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(',')])
    return ids.reshape(g, s).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    chosen = re.findall(r"'([^']+)'", m.group(2))
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    keep = [names.index(c) for c in chosen if c in names]
    rest = [i for i in range(len(names)) if i not in keep]
    ids = ids.transpose(rest + keep)
    return ids.reshape(-1, math.prod(sizes[i] for i in keep) if keep else 1).tolist()
  if 'collective-permute' in line:
    pairs = re.search(r'source_target_pairs=\{([^=]*?)\}(?:,|$)', line)
    if pairs:
      return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)\}', pairs.group(1))]
  return None


def collectives(hlo_text: str, chips_per_slice: int, num_devices: int) -> list[dict]:
  """The collectives of a compiled program, by kind and by link: count, bytes (the result's, per chip),
  participants and whether the groups stay inside one slice (ICI) or span slices (DCN). Across slices
  the TPU compiler emits host transfers (send ops marked _xla_megascale_transfer_type) of each chip's
  shard: those are the DCN collectives, their bytes the shard's."""
  found: dict[tuple, dict] = {}
  num_slices = max(1, num_devices // chips_per_slice)

  def add(kind, link, participants, spans, nbytes):
    entry = found.setdefault((kind, link, participants, spans), {
        'kind': kind, 'link': link, 'participants': participants, 'slices_spanned': spans, 'count': 0,
        'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += nbytes

  for line in hlo_text.splitlines():
    if '-done(' in line:
      continue
    dcn = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', line)
    if dcn and re.search(r'\ssend\(', line):
      data = re.search(r'=\s*\((.*?)\)\s+send\(', line)
      shapes = _SHAPE.findall(data.group(1)) if data else []
      nbytes = _shape_bytes('{}[{}]'.format(*shapes[0])) if shapes else 0
      add(dcn.group(1).lower().replace('_', '-'), 'DCN', num_slices, num_slices, nbytes)
      continue
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    kind = m.group(2)
    nbytes = _shape_bytes(m.group(1))
    if m.group(3):  # async start: (operands, results[, context]): count the results
      nbytes = _shape_bytes(m.group(1)) // 2
    groups = _replica_groups(line, num_devices) or [list(range(num_devices))]
    participants = max(len(g) for g in groups)
    spans = max(len({i // chips_per_slice for i in g}) for g in groups)
    add(kind, 'DCN' if spans > 1 else 'ICI', participants, spans, nbytes)
  return sorted(found.values(), key=lambda e: (e['link'], -e['bytes']))


def collective_seconds(c: dict, target: Target, chips_per_slice: int) -> tuple[float, float]:
  """(ICI seconds, DCN seconds) of one collective entry: ring algorithms at the chip's link bandwidth;
  a DCN-spanning all-reduce as ICI reduce-scatter, DCN all-reduce of 1/n_ici of the bytes, ICI all-gather."""
  ici, dcn = target.ici_bytes_per_s, target.dcn_bytes_per_s
  b, n = c['bytes'], c['participants']
  if not ici:
    return 0.0, 0.0
  factor = {'all-reduce': 2.0, 'all-gather': 1.0, 'reduce-scatter': 1.0, 'all-to-all': 1.0}.get(c['kind'])
  if c['link'] == 'ICI':
    if factor is None:  # collective-permute, broadcast: the bytes cross one link
      return b / ici, 0.0
    return factor * (n - 1) / n * b / ici, 0.0
  s = c['slices_spanned']
  if n == s:  # a host transfer between slices of each chip's shard (the compiler did the ICI part)
    return 0.0, ((factor or 1.0) * (s - 1) / s * b / dcn if dcn else 0.0)
  n_ici = max(1, n // s)  # one collective over chips of several slices: hierarchical
  ici_s = (factor or 1.0) * (n_ici - 1) / n_ici * b / ici if n_ici > 1 else 0.0
  dcn_s = (factor or 1.0) * (s - 1) / s * (b / n_ici) / dcn if dcn else 0.0
  return ici_s, dcn_s


def _cost(compiled) -> dict:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def _is_oom(message: str) -> bool:
  return 'RESOURCE_EXHAUSTED' in message or 'out of memory' in message.lower()


def memory_total(mem: dict) -> tuple[int, int]:
  """(total bytes one chip needs, temporaries) from benchmark.compiled_memory. The TPU compiler reports the
  program's peak (arguments and every buffer live at once, activations included): its temp_size counts only
  part of the scratch and stays flat as the batch grows. With a peak: total = peak + code, temporaries = peak
  - arguments; without one (CPU, GPU): arguments + outputs - donated + temporaries + code."""
  if mem.get('peak_bytes'):
    return mem['peak_bytes'] + mem['code_bytes'], mem['peak_bytes'] - mem['argument_bytes']
  return mem['total_bytes'] + mem['code_bytes'], mem['temp_bytes']


def libtpu_version() -> str | None:
  """The version of the libtpu this process compiles with (None if it is not installed)."""
  try:
    import libtpu
  except ImportError:
    return None
  return getattr(libtpu, '__version__', None) or 'unknown'


def checked_memory(mem: dict, target: Target, step: str) -> tuple[int, int]:
  """``memory_total`` of a TPU compile, refused where the compiler's memory analysis cannot be right: the
  plan's fits/does-not-fit rests on it, so a missing peak, or a peak below the arguments it includes, is a
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
  return memory_total(mem)


@dataclasses.dataclass
class Compiled:
  ok: bool
  compiled: Any = None
  seconds: float = 0.0
  error: str = ''
  oom: bool = False


def compile_step(fn, args: tuple, what: str, target: Target, log: Callable[[str], None]) -> Compiled:
  """Lowers and compiles one jitted step on abstract arguments for the target."""
  log(f'compiling the {what} for {target.name} ...')
  t0 = time.perf_counter()
  try:
    compiled = fn.lower(*args).compile()
  except Exception as e:  # noqa: BLE001 (the compiler's own error types differ per backend)
    message = str(e).strip()
    seconds = time.perf_counter() - t0
    log(f'  the {what} does not compile for {target.name} ({seconds:.0f} s): {message.splitlines()[0][:300]}')
    return Compiled(False, seconds=seconds, error=message, oom=_is_oom(message))
  seconds = time.perf_counter() - t0
  log(f'  compiled in {seconds:.0f} s')
  return Compiled(True, compiled, seconds)


def step_report(step: str, comp: Compiled, target: Target, *, global_batch: int,
                analytic_flops_per_image: float, state_parts: dict, batch_bytes_per_chip: int,
                image_hw: tuple[int, int], loop_trips: int = 1,
                valid_flops_per_image: float | None = None, step_remat: bool = False) -> dict:
  """Memory, FLOPs, collectives and the roofline estimate of one compiled step (per chip). XLA's cost
  analysis counts the body of a loop once: where the step loops (`loop_trips`: the dense step's flip, the
  train step's accumulation), the estimate scales the compiler's FLOPs and bytes by the trip count (which
  also scales the small part outside the loop: an upper bound)."""
  from vggjax import benchmark
  n = target.chips
  per_chip = global_batch // n
  r: dict[str, Any] = {'step': step, 'global_batch': global_batch, 'per_chip_batch': per_chip,
                       'image_hw': list(image_hw), 'compiles': comp.ok, 'compile_s': round(comp.seconds, 1)}
  if not comp.ok:
    r.update(error=comp.error, out_of_memory=comp.oom, fits=False if comp.oom else None)
    return r
  mem = benchmark.compiled_memory(comp.compiled)
  if mem is None:
    raise PlanError(f'{target.name}: the compiler gives no memory analysis of the {step} step')
  total, temporaries = checked_memory(mem, target, step)
  logical = sum(state_parts.values()) + batch_bytes_per_chip
  r['memory'] = {
      **state_parts, 'batch_bytes': batch_bytes_per_chip,
      'arguments_bytes': mem['argument_bytes'], 'layout_padding_bytes': mem['argument_bytes'] - logical,
      'outputs_bytes': mem['output_bytes'], 'aliased_bytes': mem['alias_bytes'],
      'temporaries_bytes': temporaries, 'compiler_temp_bytes': mem['temp_bytes'],
      'code_bytes': mem['code_bytes'],
      'compiler_peak_bytes': mem.get('peak_bytes'), 'total_bytes': total, 'hbm_bytes': target.hbm_bytes}
  fits = total <= target.hbm_bytes if target.hbm_bytes else None
  r['fits'] = fits
  r['short_by_bytes'] = max(0, total - target.hbm_bytes) if target.hbm_bytes else None
  cost = _cost(comp.compiled)
  flops = cost.get('flops')
  analytic = analytic_flops_per_image * per_chip
  valid = valid_flops_per_image * per_chip if valid_flops_per_image else None
  r['flops'] = {'compiler_per_chip': flops, 'analytic_per_chip': analytic,
                'compiler_over_analytic': (flops / analytic) if flops and analytic else None,
                'analytic_valid_taps_per_chip': valid,
                'compiler_over_valid_taps': (flops / valid) if flops and valid else None}
  over = r['flops']['compiler_over_valid_taps']
  if step == 'train' and over and over > RECOMPUTE_RATIO and loop_trips == 1:
    # More FLOPs than the model's: the compiler recomputes activations (model.remat, or its own
    # rematerialisation when the activations do not fit; libtpu 0.0.42.1 squeezes into HBM batches that
    # 0.0.52 rejects). The step fits only by recomputing, and the estimate below includes the recomputation.
    r['recomputes'] = {'compiler_over_model_flops': over, 'model_remat': step_remat}
  hbm_bytes = cost.get('bytes accessed')
  r['hbm_bytes_accessed_per_chip'] = hbm_bytes
  try:
    text = comp.compiled.as_text() or ''
  except Exception as e:  # noqa: BLE001  XLA could not print this program (libtpu 0.0.52, VGG-A at 4,096 per
    text = None           # v5p chip: a RET_CHECK on an async-update instruction); the compile itself is fine
    r['collectives_note'] = (
        f'the compiled program\'s text could not be read ({str(e).splitlines()[0][:200]}); its collectives '
        'are taken to be the data-parallel step\'s gradient all-reduce of the float32 parameters')
  trips = loop_trips if (loop_trips > 1 and (text is None or re.search(r'\swhile\(', text))) else 1
  if trips > 1:
    r['flops']['loop_trips'] = trips  # the compiler's figures count one trip of the loop
  if text is not None:
    coll = collectives(text, target.chips_per_slice, n)
  elif n > 1:
    spans = max(1, n // target.chips_per_slice)
    coll = [{'kind': 'all-reduce', 'link': 'DCN' if spans > 1 else 'ICI', 'participants': n,
             'slices_spanned': spans, 'count': 1, 'bytes': state_parts['parameters_bytes'],
             'source': 'analytic: the compiled text was unreadable'}]
  else:
    coll = []
  ici_s = dcn_s = 0.0
  for c in coll:
    a, b = collective_seconds(c, target, target.chips_per_slice)
    c['estimated_s'] = a + b
    ici_s, dcn_s = ici_s + a, dcn_s + b
  r['collectives'] = coll
  est = None
  if target.peak_flops and (flops or analytic):
    compute_s = (trips * flops if flops else analytic) / target.peak_flops
    memory_s = trips * hbm_bytes / target.hbm_bytes_per_s if (hbm_bytes and target.hbm_bytes_per_s) else 0.0
    step_s = max(compute_s, memory_s) + ici_s + dcn_s
    est = {'kind': 'estimate (roofline; not a measurement)', 'compute_s': compute_s, 'hbm_s': memory_s,
           'ici_s': ici_s, 'dcn_s': dcn_s, 'step_s': step_s,
           'bound': 'compute' if compute_s >= memory_s else 'HBM bandwidth',
           'images_per_s_per_chip': per_chip / step_s,
           'images_per_s_per_slice': per_chip * target.chips_per_slice / step_s,
           'images_per_s': global_batch / step_s,
           'mfu': analytic / (step_s * target.peak_flops)}
  r['estimate'] = est
  return r


# ----------------------------------------------------------------------------------------------------------
# The plan.


def dataset_size(config, train_examples: int = 0) -> tuple[int, int, str]:
  """(classes, training images, source) of the config's dataset: known sizes first, else the data layer."""
  from vggjax import settings
  d = settings.DataSettings.from_config(config.data)
  name = d.name if d.source == 'tfds' else ''
  if name in KNOWN_DATASETS:
    classes, num_train, _ = KNOWN_DATASETS[name]
    source = f'{name} ({num_train:,} training images)'
  else:
    from vggjax.data import pipeline
    try:
      info = pipeline.dataset_info(d)
    except Exception as e:  # noqa: BLE001
      if config.model.num_classes and train_examples:
        return config.model.num_classes, train_examples, '--train_examples'
      raise PlanError(f'the size of {d.source}:{name or d.data_dir} is unknown to the plan and '
                      f'could not be read ({e}); give --config.model.num_classes and --train_examples') from e
    classes, num_train, source = info.num_classes, info.num_train, f'{d.source} (read)'
  if train_examples:
    num_train, source = train_examples, '--train_examples'
  return (config.model.num_classes or classes), num_train, source


def _valid_taps(n: int, k: int) -> int:
  """Multiply-adds along one axis of a stride-1 'same' convolution of kernel k over n positions, counting
  only the taps that fall inside the input (the padding's zeros are not multiplied)."""
  if k == 1:
    return n
  half = k // 2
  return sum(min(n - 1, o + half) - max(0, o - half) + 1 for o in range(n))


def valid_tap_flops(model, image_hw: tuple[int, int], train: bool) -> int:
  """FLOPs (2 x multiply-adds) of the convolutions and FC layers of one image counting only taps inside
  the input, as XLA's cost analysis counts them. models.flops counts every tap (the usual convention); the
  two differ by the zero padding, a few percent at 224 and more on small images. Training: forward, the
  weight gradients and the input gradients of every layer but conv1_1 (whose input needs none)."""
  from vggjax import models
  params = models.variable_shapes(model)['params']
  h, w = image_hw
  macs, first = 0, 0
  for b, stage in enumerate(model.stages):
    for i in range(len(stage)):
      kh, kw, cin, cout = params[f'conv{b + 1}_{i + 1}']['kernel'].shape
      layer = _valid_taps(h, kh) * _valid_taps(w, kw) * cin * cout
      first = first or layer
      macs += layer
    h, w = h // 2, w // 2
  k6 = model.fc6_kernel
  cells = (h - k6 + 1) * (w - k6 + 1)
  for name in ('fc6', 'fc7', 'fc8'):
    macs += cells * math.prod(params[name]['kernel'].shape)
  if train:
    macs = 3 * macs - first
  return 2 * macs


def _model_options(config) -> dict:
  m = config.model
  return dict(num_classes=m.num_classes, width=m.width, fc_features=m.fc_features or None)


def _state_parts(steps: Steps) -> dict:
  state = steps.abstract_state()
  return {'parameters_bytes': _nbytes(state.params), 'optimizer_state_bytes': _nbytes(state.opt_state),
          'other_state_bytes': _nbytes((state.step, state.batch_stats, state.rng, state.fault,
                                        state.fault_step))}


def train_memory(steps: Steps, target: Target, per_chip: int, log: Callable[[str], None]) -> Compiled:
  fn = steps.train_step()
  return compile_step(fn, steps.train_args(per_chip * target.chips),
                      f'train step (per-chip batch {per_chip})', target, log)


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


def max_batch(steps: Steps, target: Target, start: int, log: Callable[[str], None], limit: int = 4096,
              known: dict[int, Compiled] | None = None, granularity: int = 1,
              compiled_out: dict | None = None) -> dict:
  """The largest per-chip batch (a multiple of `granularity` and of the accumulation steps) whose train
  step fits in HBM, by compiling (``search_max_batch``: the line through two compiles predicts the edge,
  then the edge and one step above it are compiled). The compiled train step at that batch is put in
  `compiled_out['train_at_max_batch']` when given."""
  from vggjax import benchmark
  probes: dict[int, dict] = {}
  fitting: dict[int, Compiled] = {}  # the largest fitting probe's program, kept for its report
  k = max(1, steps.accumulate_steps)

  def probe(b: int) -> int | None:
    comp = (known or {}).get(b) or train_memory(steps, target, b, log)
    mem = benchmark.compiled_memory(comp.compiled) if comp.ok else None
    total = checked_memory(mem, target, 'train')[0] if mem else None
    fits = bool(comp.ok and total is not None and total <= target.hbm_bytes)
    if fits and b > max(fitting, default=0):
      fitting.clear()
      fitting[b] = comp
    probes[b] = {'fits': fits,
                 'total_bytes': total, 'compile_s': round(comp.seconds, 1),
                 'error': None if comp.ok else comp.error.splitlines()[0][:300]}
    if not comp.ok and not comp.oom:
      raise PlanError(f'{target.name}: the train step at per-chip batch {b} does not compile: {comp.error}')
    log(f'  per-chip batch {b}: {"fits" if probes[b]["fits"] else "does not fit"}'
        + (f' ({total / GIB:.2f} GiB)' if total else ' (out of memory at compile time)'))
    return total if comp.ok else None

  step = math.lcm(k, max(1, granularity))  # the per-chip batch must split into the accumulation steps
  lo, hi, why = search_max_batch(probe, target.hbm_bytes, start, step, limit)
  if compiled_out is not None and lo in fitting:
    compiled_out['train_at_max_batch'] = fitting[lo]
  exact = (hi - lo <= step) if hi is not None else (lo + step > limit)
  return {'max_per_chip_batch': lo or None, 'first_not_fitting': hi, 'exact': exact,
          'granularity': step, 'limit': limit,
          'dtype': str(steps.config.model.dtype),
          'remat': bool(steps.config.model.remat), 'hbm_bytes': target.hbm_bytes,
          'probes': {str(b): p for b, p in sorted(probes.items())}, 'search': why}


def plan(config, target: Target, *, steps_to_plan=('train', 'eval', 'dense'), find_max_batch: bool = False,
         train_examples: int = 0, granularity: int = 8, log: Callable[[str], None] = lambda s: None,
         compiled_out: dict | None = None, max_batch_limit: int = 4096) -> dict:
  """Compiles the config's steps for the target and returns the report (a JSON-able dict). The compiled
  executables are put in `compiled_out` (by step name) when given."""
  compiled_out = {} if compiled_out is None else compiled_out
  import jax
  from vggjax import config_lib, models, parallel, settings
  config_lib.validate(config)
  classes, num_train, data_source = dataset_size(config, train_examples)
  config = config_lib.resolve(config, config.model.num_classes or classes)
  mesh = parallel.make_mesh(target.devices)
  steps = Steps.build(config, mesh)
  t, d, m = config.train, config.data, config.model
  n = target.chips
  gb = t.global_batch_size
  if gb % n:
    raise PlanError(f'config.train.global_batch_size={gb} does not split over the {n} chips of {target.name}'
                    ': '
                    f'give a multiple of {n} (--config.train.global_batch_size={max(n, gb - gb % n)} or '
                    f'{gb - gb % n + n})')
  if gb % steps.accumulate_steps or (gb // steps.accumulate_steps) % n:
    raise PlanError(f'config.train.global_batch_size={gb} with train.accumulate_steps='
                    f'{steps.accumulate_steps} does not give every chip whole micro-batches on {n} chips')
  opts = _model_options(config)
  size = d.image_size
  fwd = models.flops(m.name, size, train_size=size, **opts).flops
  report: dict[str, Any] = {
      'kind': 'plan (compiled for the target; times are estimates, not measurements)',
      'date': time.strftime('%Y-%m-%d'), 'jax_version': jax.__version__,
      'libtpu_version': libtpu_version() if target.device_kind.startswith('TPU') else None,
      'target': target.to_dict(),
      'model': {'name': m.name, 'dtype': str(m.dtype), 'remat': bool(m.remat), 'width': m.width,
                'num_classes': m.num_classes, 'parameters': models.param_count(steps.model),
                'image_size': size, 'train_scale': [int(d.scale_min), int(d.scale_max)]},
      'global_batch': gb, 'accumulate_steps': steps.accumulate_steps, 'steps': {}}
  parts = _state_parts(steps)
  img_bytes = size * size * 3 + 4  # uint8 image, int32 label
  if 'train' in steps_to_plan:
    per_chip = gb // n
    comp = compiled_out['train'] = compile_step(steps.train_step(), steps.train_args(gb), 'train step',
                                                target, log)
    report['steps']['train'] = step_report('train', comp, target, global_batch=gb,
                                           analytic_flops_per_image=3 * fwd, state_parts=parts,
                                           batch_bytes_per_chip=per_chip * img_bytes, image_hw=(size, size),
                                           loop_trips=steps.accumulate_steps,
                                           valid_flops_per_image=valid_tap_flops(steps.model, (size, size),
                                                                                 True),
                                           step_remat=bool(m.remat))
    tr = report['steps']['train']
    if comp.ok is False and not comp.oom:
      report['failed'] = {'step': 'train', 'topology': target.name, 'message': comp.error}
    if tr.get('fits') is False and tr.get('memory'):
      mm = tr['memory']
      per_image = (mm['temporaries_bytes'] + mm['batch_bytes']) / per_chip
      fixed = mm['total_bytes'] - mm['temporaries_bytes'] - mm['batch_bytes']
      guess = int((target.hbm_bytes - fixed) // per_image) if per_image > 0 else 0
      report['max_batch_estimate'] = {
          'kind': 'linear estimate from the one compile (temporaries and batch scale with the batch); '
                  '--max_batch searches by compiling', 'per_chip_batch': max(0, guess),
          'accumulate_steps_for_config_batch': math.ceil(per_chip / guess) if guess > 0 else None}
    hbm_oom = re.search(r'required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)',
                        comp.error or '')
    if hbm_oom:  # the compiler's own figures: temporaries needed against what the chip has
      need, have = float(hbm_oom.group(1)), float(hbm_oom.group(2))
      guess = int(per_chip * have / need * 0.9)
      report['max_batch_estimate'] = {
          'kind': 'estimate from the compiler\'s out-of-memory message (temporaries scale with the batch, '
                  '10% margin); --max_batch searches by compiling', 'per_chip_batch': guess,
          'accumulate_steps_for_config_batch': math.ceil(per_chip / guess) if guess > 0 else None}
    if find_max_batch:
      log(f'largest per-chip batch whose train step fits in {target.hbm_bytes / GIB:.1f} GiB:')
      found = max_batch(steps, target, per_chip, log, known={per_chip: comp} if comp.ok or comp.oom else None,
                        granularity=granularity, limit=max_batch_limit, compiled_out=compiled_out)
      b = found['max_per_chip_batch']
      if b:
        found['global_batch_at_max'] = b * n
        found['accumulate_steps_for_config_batch'] = math.ceil(gb / (b * n)) if b * n < gb else 1
        at_max = compiled_out.pop('train_at_max_batch', None)
        if at_max is not None and steps.accumulate_steps == 1:  # the edge's own program: no extra compile
          found['train_step'] = step_report(
              'train', at_max, target, global_batch=b * n, analytic_flops_per_image=3 * fwd,
              state_parts=parts, batch_bytes_per_chip=b * img_bytes, image_hw=(size, size),
              valid_flops_per_image=valid_tap_flops(steps.model, (size, size), True),
              step_remat=bool(m.remat))
      report['max_batch'] = found
  eval_gb = gb
  variables_bytes = parts['parameters_bytes'] + _nbytes(steps.abstract_state().batch_stats)
  var_parts = {'parameters_bytes': parts['parameters_bytes'],
               'other_state_bytes': variables_bytes - parts['parameters_bytes']}
  if 'eval' in steps_to_plan:
    comp = compiled_out['eval'] = compile_step(steps.eval_step(), steps.eval_args(eval_gb), 'validation step',
                                               target, log)
    report['steps']['eval'] = step_report('eval', comp, target, global_batch=eval_gb,
                                          analytic_flops_per_image=fwd, state_parts=var_parts,
                                          batch_bytes_per_chip=eval_gb // n * (img_bytes + 1),
                                          image_hw=(size, size),
                                          valid_flops_per_image=valid_tap_flops(steps.eval_model,
                                                                                (size, size), False))
    if not comp.ok and not comp.oom:
      report.setdefault('failed', {'step': 'eval', 'topology': target.name, 'message': comp.error})
  if 'dense' in steps_to_plan:
    from vggjax import evaluate
    q, bh, bw = steps.dense_shape()
    dense_gb = evaluate.DEFAULT_PER_DEVICE_BATCH * n
    flips = 2 if settings.DataSettings.from_config(d).flip else 1
    dense_fwd = flips * models.flops(m.name, (bh, bw), train_size=size, **opts).flops
    comp = compiled_out['dense'] = compile_step(steps.dense_step(), steps.dense_args(dense_gb),
                                                f'dense evaluation step (Q={q})', target, log)
    report['steps']['dense'] = step_report('dense', comp, target, global_batch=dense_gb,
                                           analytic_flops_per_image=dense_fwd, state_parts=var_parts,
                                           batch_bytes_per_chip=dense_gb // n * (bh * bw * 3 + 8),
                                           image_hw=(bh, bw), loop_trips=flips,
                                           valid_flops_per_image=flips * valid_tap_flops(steps.eval_model,
                                                                                         (bh, bw), False))
    report['steps']['dense']['test_scale'] = q
    if not comp.ok and not comp.oom:
      report.setdefault('failed', {'step': 'dense', 'topology': target.name, 'message': comp.error})
  def schedule(steps_total: int, step_s: float) -> dict:
    seconds = steps_total * step_s
    return {'kind': 'estimate', 'steps': steps_total, 'days': seconds / 86400,
            'chip_hours': seconds / 3600 * n}

  tr = report['steps'].get('train')
  est = tr and tr.get('estimate')
  if est:
    report['schedule'] = {'epochs': t.num_epochs if not t.max_steps else None, 'train_examples': num_train,
                          'dataset': data_source,
                          **schedule(t.max_steps or math.ceil(t.num_epochs * num_train / gb), est['step_s'])}
  est_max = report.get('max_batch', {}).get('train_step', {}).get('estimate')
  if est_max and not t.max_steps:  # the same epochs at the largest batch (the recipe's lr is not rescaled)
    steps_max = math.ceil(t.num_epochs * num_train / report['max_batch']['global_batch_at_max'])
    report['max_batch']['schedule'] = {'epochs': t.num_epochs, **schedule(steps_max, est_max['step_s'])}
  jittered = int(d.scale_max) > int(d.scale_min)
  per_core = PIPELINE_IMAGES_PER_CORE_S['jittered' if jittered else 'fixed']
  inp: dict[str, Any] = {'hosts': target.hosts, 'processes': target.hosts,
                         'per_process_batch': gb // target.hosts,
                         'chips_per_host': n // target.hosts, 'pipeline_images_per_core_s': per_core,
                         'pipeline_source': 'BENCHMARKS.md, Input pipeline (whole pipeline, '
                                            f'{"S~U[256,512]" if jittered else "S=256"})'}
  if est:
    rate = est['images_per_s'] / target.hosts
    inp.update(images_per_s_per_host=rate, cores_per_host=rate / per_core)
  report['input'] = inp
  report['assumptions'] = [
      'step time = max(FLOPs / peak bf16 FLOP/s, HBM bytes accessed / HBM bandwidth) + collectives; '
      'collectives are not overlapped with compute (conservative)',
      'FLOPs and HBM bytes per chip: the TPU compiler\'s cost analysis of the compiled step',
      'collectives: ring algorithms at the chip\'s all-reduce bandwidth (ICI) / DCN bandwidth per chip; a '
      'DCN-spanning all-reduce is hierarchical (ICI reduce-scatter, DCN all-reduce of 1/n, ICI all-gather)',
      'MFU: the analytic model FLOPs (vggjax.models.flops: 3x forward for training) over estimated time x '
      'peak',
      'memory per chip: the compiler\'s peak (arguments and all live buffers) + code, against the published '
      'HBM capacity (the runtime reserves a little of it: the TPU compiler allows 15.75 of a v5e\'s 16 GiB)',
      'input: one process per host; the pipeline scales linearly with cores (not measured beyond 2 cores)',
  ] + target.notes
  return report


def exit_code(report: dict) -> int:
  if report.get('failed'):
    return EXIT_COMPILE_ERROR
  if any(s.get('fits') is False for s in report['steps'].values()):
    return EXIT_DOES_NOT_FIT
  return 0


# ----------------------------------------------------------------------------------------------------------
# The table.


def _gib(b) -> str:
  if b is None:
    return '-'
  return f'{b / GIB:.2f} GiB' if abs(b) >= GIB / 10 else f'{b / 2**20:.1f} MiB'


def _si(x, unit='') -> str:
  if x is None:
    return '-'
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= scale:
      return f'{x / scale:.2f} {prefix}{unit}'
  return f'{x:.0f} {unit}'


def format_report(r: dict) -> str:
  t, m = r['target'], r['model']
  remat = ', remat' if m['remat'] else ''
  lines = [f'plan: {m["name"]} ({m["parameters"]:,} parameters, {m["dtype"]}{remat}) '
           f'on {t["name"]}, {t["chips"]} chips ({t["device_kind"]}), global batch {r["global_batch"]}'
           + (f' in {r["accumulate_steps"]} accumulation steps' if r['accumulate_steps'] > 1 else '')
           + (f'; compiled by libtpu {r["libtpu_version"]}' if r.get('libtpu_version') else '')]
  for name, s in r['steps'].items():
    head = (f'\n[{name}] per-chip batch {s["per_chip_batch"]} of {s["image_hw"][0]}x{s["image_hw"][1]} images'
            + (f' (test scale Q={s["test_scale"]})' if 'test_scale' in s else '')
            + f', compiled in {s["compile_s"]} s')
    lines.append(head)
    if not s['compiles']:
      what = 'OUT OF MEMORY at compile time' if s.get('out_of_memory') else 'DOES NOT COMPILE'
      lines.append(f'  {what} for {t["name"]}: {s["error"].splitlines()[0][:400]}')
      continue
    mm = s['memory']
    verdict = ('fits' if s['fits'] else f'DOES NOT FIT: short by {_gib(s["short_by_bytes"])}') \
        if s['fits'] is not None else 'HBM unknown'
    lines.append(f'  memory per chip: parameters {_gib(mm["parameters_bytes"])}'
                 + (f', optimizer state {_gib(mm["optimizer_state_bytes"])}'
                    if 'optimizer_state_bytes' in mm else '')
                 + f', batch {_gib(mm["batch_bytes"])}, all arguments {_gib(mm["arguments_bytes"])}, '
                 f'temporaries {_gib(mm["temporaries_bytes"])}, code {_gib(mm["code_bytes"])}; '
                 f'total {_gib(mm["total_bytes"])} of {_gib(mm["hbm_bytes"])} HBM: {verdict}')
    rc = s.get('recomputes')
    if rc:
      lines.append(f'  RECOMPUTES: the compiled step does {rc["compiler_over_model_flops"]:.2f}x the model\'s '
                   'FLOPs: it fits only by recomputing activations ('
                   + ('model.remat is on' if rc['model_remat'] else
                      'the compiler\'s own rematerialisation: model.remat is off; the activations of this batch '
                      'do not fit without it') + '); the estimate includes the recomputation')
    f = s['flops']
    ratio = f['compiler_over_analytic']
    valid = f.get('compiler_over_valid_taps')
    lines.append(f'  FLOPs per chip per step: compiler {_si(f["compiler_per_chip"])}, analytic '
                 f'{_si(f["analytic_per_chip"])}' + (f' (compiler/analytic {ratio:.3f}' if ratio else ' (')
                 + (f', compiler/analytic without padding taps {valid:.3f}' if valid else '') + ')'
                 + (f' [the compiler counts 1 of {f["loop_trips"]} loop trips]'
                    if f.get('loop_trips') else '')
                 + f'; HBM bytes accessed {_si(s["hbm_bytes_accessed_per_chip"], "B")}')
    if s['collectives']:
      coll = '; '.join(f'{c["count"]} {c["kind"]} over {c["participants"]} chips on {c["link"]}, '
                       f'{_si(c["bytes"], "B")}' for c in s['collectives'])
      lines.append(f'  collectives: {coll}'
                   + (f' (ASSUMED: {s["collectives_note"]})' if s.get('collectives_note') else ''))
    else:
      lines.append('  collectives: none')
    e = s.get('estimate')
    if e:
      lines.append(f'  ESTIMATE (roofline, not measured): step {1e3 * e["step_s"]:.1f} ms (compute '
                   f'{1e3 * e["compute_s"]:.1f}, HBM {1e3 * e["hbm_s"]:.1f}, ICI {1e3 * e["ici_s"]:.2f}, DCN '
                   f'{1e3 * e["dcn_s"]:.2f}; {e["bound"]}-bound): {e["images_per_s_per_chip"]:.0f} images/s '
                   f'per chip, {e["images_per_s_per_slice"]:.0f} per slice, {e["images_per_s"]:.0f} in all; '
                   f'MFU {100 * e["mfu"]:.0f}%')
  mb = r.get('max_batch')
  if mb:
    b = mb['max_per_chip_batch']
    if b:
      acc = mb.get('accumulate_steps_for_config_batch', 1)
      lines.append(f'\nlargest per-chip batch whose train step fits ({mb["dtype"]}'
                   f'{", remat" if mb["remat"] else ", no remat"}): {b} '
                   f'(global {mb["global_batch_at_max"]}); '
                   + (f'{mb["first_not_fitting"]} does not fit' if mb['first_not_fitting'] else
                      f'larger batches were not tried (the search stops at --max_batch_limit='
                      f'{mb.get("limit", 4096)})')
                   + ('' if mb.get('exact', True) else
                      f'; NOT the exact edge: {mb["search"][-1]} (the search\'s compiles ran out)')
                   + ''.join(f'\n  at that batch: {ts["memory"]["total_bytes"] / GIB:.2f} GiB per chip; '
                             f'ESTIMATE {ts["estimate"]["images_per_s"]:,.0f} images/s, MFU '
                             f'{100 * ts["estimate"]["mfu"]:.0f}%' for ts in [mb.get('train_step')]
                             if ts and ts.get('estimate'))
                   + ''.join(f'; {sc["epochs"]} epochs: {sc["days"]:.2f} days, '
                             f'{sc["chip_hours"]:,.0f} chip-hours (ESTIMATE)' for sc in [mb.get('schedule')]
                             if sc)
                   + (f'; the config\'s batch {r["global_batch"]} needs train.accumulate_steps={acc}'
                      if acc > 1 else ''))
    else:
      lines.append('\nno per-chip batch fits: even 1 image per chip needs more than the HBM')
  mbe = r.get('max_batch_estimate')
  if mbe and not mb:
    b, acc = mbe['per_chip_batch'], mbe['accumulate_steps_for_config_batch'] or 1
    if b:
      lines.append(f'\nthe train step does not fit: about {b} images per chip would ({mbe["kind"]})'
                   + (f'; the config\'s batch then needs train.accumulate_steps={acc}' if acc > 1 else ''))
    else:
      lines.append('\nthe train step does not fit even without its batch (parameters, optimizer state, code)')
  sc = r.get('schedule')
  if sc:
    lines.append(f'\nschedule (ESTIMATE): {sc["steps"]:,} steps'
                 + (f' ({sc["epochs"]} epochs of {sc["train_examples"]:,} images)' if sc['epochs'] else '')
                 + f': {sc["days"]:.2f} days wall-clock, {sc["chip_hours"]:,.0f} chip-hours')
  i = r['input']
  line = (f'hosts {i["hosts"]} ({i["chips_per_host"]} chips each), one process per host, per-process batch '
          f'{i["per_process_batch"]}')
  if 'images_per_s_per_host' in i:
    line += (f'; input per host {i["images_per_s_per_host"]:.0f} images/s (estimate) = '
             f'{i["cores_per_host"]:.1f} cores at {i["pipeline_images_per_core_s"]:.0f} images/s per core')
  lines.append(line)
  lines.append('assumptions: ' + '; '.join(r['assumptions']))
  return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------------------
# The command line.


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  f = {}
  f['config'] = config_flags.DEFINE_config_file(
      'config', None, 'The config to plan (configs/*.py[:arg]); override fields with --config.FIELD=VALUE.',
      lock_config=True)
  f['topology'] = flags.DEFINE_string(
      'topology', None, 'A Cloud TPU accelerator type (v4-8, v5litepod-16 or v5e-16, v5p-128, v6e-256, ...), '
      'or gpu (the attached GPUs).')
  f['num_slices'] = flags.DEFINE_integer('num_slices', 1, 'Slices joined by DCN (data parallel across them).')
  f['workdir'] = flags.DEFINE_string('workdir', None,
                                     'If given, the report is also written to WORKDIR/plan.json.')
  f['json'] = flags.DEFINE_bool('json', False,
                                'Print the report as JSON on stdout (the table goes to stderr).')
  f['max_batch'] = flags.DEFINE_bool('max_batch', False, 'Also find the largest per-chip batch whose train '
                                     'step fits (for the config\'s model.dtype and model.remat).')
  f['steps'] = flags.DEFINE_list('steps', ['train', 'eval', 'dense'],
                                 'The steps to compile: train, eval, dense.')
  f['train_examples'] = flags.DEFINE_integer('train_examples', 0, 'Training set size for the schedule '
                                             '(default: the dataset\'s; ImageNet 1,281,167).')
  f['ici_gbps'] = flags.DEFINE_float('ici_gbps', 0.0,
                                     'Override the chip\'s all-reduce ICI bandwidth (Gbit/s).')
  f['dcn_gbps'] = flags.DEFINE_float('dcn_gbps', 0.0, 'Override the DCN bandwidth per chip (Gbit/s).')
  f['batch_granularity'] = flags.DEFINE_integer('batch_granularity', 8, '--max_batch: per-chip batches in '
                                                'multiples of this.')
  f['hbm_gib'] = flags.DEFINE_float('hbm_gib', 0.0, 'Override the HBM per chip (GiB), e.g. to keep a margin.')
  f['max_batch_limit'] = flags.DEFINE_integer('max_batch_limit', 4096, '--max_batch: the largest per-chip '
                                              'batch the search compiles.')
  flags.mark_flags_as_required(['config', 'topology'])
  return f


def main(argv, flag_holders) -> None:
  from absl import app
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = {k: v.value for k, v in flag_holders.items()}
  import jax
  if f['topology'] != 'gpu':
    jax.config.update('jax_platforms', 'cpu')  # the process's own backend: never a TPU of this machine
  from vggjax import config_lib
  config = f['config']
  unknown = [s for s in f['steps'] if s not in ('train', 'eval', 'dense')]
  if unknown or not f['steps']:
    raise app.UsageError(f'--steps: unknown {unknown}; valid: train, eval, dense')
  if f['max_batch'] and 'train' not in f['steps']:
    raise app.UsageError('--max_batch needs the train step in --steps')
  if f['batch_granularity'] < 1 or f['max_batch_limit'] < f['batch_granularity']:
    raise app.UsageError(f'--batch_granularity={f["batch_granularity"]} --max_batch_limit='
                         f'{f["max_batch_limit"]}: the granularity must be at least 1 and the limit at least '
                         'the granularity')
  try:
    config_lib.validate(config)
    if f['topology'] == 'gpu':
      target = gpu_target(str(config.model.dtype))
    else:
      target = tpu_target(f['topology'], f['num_slices'], str(config.model.dtype), f['ici_gbps'],
                          f['dcn_gbps'], f['hbm_gib'])
  except (ValueError, config_lib.ConfigError) as e:
    raise app.UsageError(str(e))
  except PlanError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_COMPILE_ERROR)
  log = functools.partial(print, file=sys.stderr, flush=True)
  try:
    report = plan(config, target, steps_to_plan=tuple(f['steps']), find_max_batch=f['max_batch'],
                  train_examples=f['train_examples'], granularity=f['batch_granularity'], log=log,
                  max_batch_limit=f['max_batch_limit'])
  except PlanError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_COMPILE_ERROR)
  table = format_report(report)
  if f['json']:
    print(table, file=sys.stderr, flush=True)
    print(json.dumps(report, default=str), flush=True)
  else:
    print(table, flush=True)
  if f['workdir']:
    from vggjax import runlog as vlog  # the run-directory path layer: local or gs://
    path = vlog.run_path(f['workdir'], 'plan.json')
    path.parent.mkdir(parents=True, exist_ok=True)
    vlog.write_text(path, json.dumps(report, indent=2, default=str))
    log(f'plan written to {path}')
  failed = report.get('failed')
  if failed:
    log(f'error: the {failed["step"]} step does not compile for {failed["topology"]}: '
        f'{failed["message"].splitlines()[0][:500]}')
  code = exit_code(report)
  if code == EXIT_DOES_NOT_FIT:
    log('error: ' + ', '.join(f'the {k} step does not fit' for k, s in report['steps'].items()
                              if s.get('fits') is False) + f' on {target.name}')
  sys.exit(code)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
