"""How fast the framework trains and evaluates, against the device's limit: images/s, achieved TFLOP/s, MFU.

Why one module of about 650 lines: the timing method, the FLOP count, the peak table, the memory search and
the command are one measurement; benchmarks/torch_reference.py imports its parts to time PyTorch the same way.

    python -m vggjax.benchmark --model=vgg16 --batch=256 --image_size=224 --dtype=bfloat16 --json
    python -m vggjax.benchmark --model=vgg16 --batch=128,256 --dtype=bfloat16 --remat
    python -m vggjax.benchmark --model=vgg16 --dtype=bfloat16 --max_batch          # largest batch that fits

It times the real jitted steps of vggjax.train on every available device (data parallel over the mesh):

* the train step (make_train_step: uint8 in, colour shift and normalisation, forward, backward, SGD with
  momentum and L2 from the default config, the non-finite guard), with the state donated as in training;
* the dense eval step (make_eval_step) on images larger than the training size (``--eval_size``, 384 for
  a 224 net): the network runs fully convolutionally and the class score map is averaged.

Method: one batch of random uint8 images is put on the devices once (the input pipeline is not timed);
the step is lowered and compiled ahead of time (``compile_s``), run ``--warmup`` times untimed, then
``--repeats`` times ``--steps`` back-to-back steps, each repeat closed by ``jax.block_until_ready`` before
the clock is read. The step time is the median over repeats of (repeat time / steps).

FLOPs are analytic (vggjax.models.flops: convolutions and FC layers): a training step counts 3x the
forward pass (forward, and the two products of the backward pass), the dense eval counts the forward pass
at the eval size. MFU = achieved FLOP/s / (the device's peak dense FLOP/s x devices); peaks are the
vendors' dense figures in PEAK_TFLOPS (``--peak_tflops`` overrides; none on a CPU). Peak memory is the
device allocator's ``peak_bytes_in_use`` where the backend reports it (GPU, TPU) and the compiled
executable's memory analysis everywhere.

``--json`` prints one JSON object per configuration on stdout (the human summary goes to stderr);
benchmarks/torch_reference.py prints the same fields for the same step in PyTorch.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import time
import types
from typing import Any, Callable, Sequence

from vggjax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ('float32', 'bfloat16')
GIB = 1024 ** 3

# Peak dense (no structured sparsity) TFLOP/s of one device as JAX sees it, from the vendors' datasheets.
# 'bfloat16': the 16-bit matrix units. 'float32': the rate of what XLA runs by default for float32
# convolutions and matmuls: TF32 tensor cores on Ampere and later, the FP32 units on Volta/Turing, and
# single-pass bf16 on TPUs (JAX's default precision there). TPU v2/v3 show each core as a device (half a
# chip); v4 and v5p (megacore) and v5e/v6e one device per chip. V100 and T4 have no bf16 units: their
# 'bfloat16' entry is the fp16 tensor-core peak, which XLA does not reach with bf16.
# (pattern on the lower-cased device kind, label, bfloat16, float32)
PEAK_TFLOPS: tuple[tuple[str, str, float, float], ...] = (
    (r'b200', 'B200', 2250.0, 1100.0),
    (r'gh200', 'GH200', 989.4, 494.7),
    (r'h200', 'H200', 989.4, 494.7),
    (r'h100.*nvl', 'H100 NVL', 835.5, 417.5),
    (r'h100.*pcie', 'H100 PCIe', 756.0, 378.0),
    (r'h100|h800', 'H100 SXM', 989.4, 494.7),
    (r'a100|a800', 'A100', 312.0, 156.0),
    (r'l40s', 'L40S', 362.0, 183.0),
    (r'\bl40\b', 'L40', 181.0, 90.5),
    (r'\bl4\b', 'L4', 121.0, 60.0),
    (r'\ba10\b', 'A10', 125.0, 62.5),
    (r'v100', 'V100', 125.0, 15.7),
    (r'\bt4\b', 'T4', 65.0, 8.1),
    (r'^tpu.*(v6|trillium)', 'TPU v6e', 918.0, 918.0),
    (r'^tpu.*(v5 ?lite|v5e)', 'TPU v5e', 197.0, 197.0),
    (r'^tpu.*v5', 'TPU v5p', 459.0, 459.0),
    (r'^tpu.*v4', 'TPU v4', 275.0, 275.0),
    (r'^tpu.*v3', 'TPU v3 (per core)', 61.5, 61.5),
    (r'^tpu.*v2', 'TPU v2 (per core)', 22.5, 22.5),
)

# The paper's optimizer (3.1), used when configs/default.py cannot be loaded (it needs ml_collections).
_PAPER_OPTIMIZER = dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4, decay_biases=False)


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  """(peak dense TFLOP/s of one device for `dtype`, the table's label), or (None, None) if unknown."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  kind = (device_kind or '').lower()
  for pattern, label, bf16, f32 in PEAK_TFLOPS:
    if re.search(pattern, kind):
      return (bf16 if dtype == 'bfloat16' else f32), label
  return None, None


def train_flops_per_image(model: str, image_size: int, **options) -> int:
  """Analytic FLOPs of one training image: 3x the forward pass (forward, input and weight gradients)."""
  from vggjax import models
  return 3 * models.flops(model, image_size, train_size=image_size, **options).flops


def eval_flops_per_image(model: str, eval_size: int, train_size: int, **options) -> int:
  """Analytic FLOPs of the dense evaluation of one image at `eval_size` (the forward pass only)."""
  from vggjax import models
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


def default_eval_size(image_size: int) -> int:
  """The dense-eval size for a training size: 384 for 224 (the paper's Q = 384 for S = 384 nets)."""
  return int(round(image_size * 384 / 224))


def optimizer_config():
  """configs/default.py's optimizer section (the paper's SGD), or the same values if it cannot be loaded."""
  path = REPO / 'configs' / 'default.py'
  try:
    spec = importlib.util.spec_from_file_location('_vggjax_default_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    opt = module.get_config().optimizer
    return types.SimpleNamespace(**{k: opt[k] for k in _PAPER_OPTIMIZER}), 'configs/default.py'
  except (ImportError, OSError, AttributeError):
    return types.SimpleNamespace(**_PAPER_OPTIMIZER), 'built-in (the paper: SGD 0.9, L2 5e-4)'


# --- what JAX reports about memory ---------------------------------------------------------------------

def compiled_memory(compiled) -> dict | None:
  """The compiled executable's memory analysis (per device): arguments, outputs, aliased, temporaries."""
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


def device_memory() -> dict:
  """Allocator statistics of the local devices: the largest peak and the smallest limit (None if absent)."""
  import jax
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


def cost_analysis_flops(compiled) -> float | None:
  """XLA's own FLOP count of a compiled step (per device), as a cross-check of the analytic count."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


# --- the benchmark --------------------------------------------------------------------------------------

@dataclasses.dataclass
class Options:
  model: str = 'vgg16'
  batch: int = 256  # global: split over all devices
  image_size: int = 224
  dtype: str = 'bfloat16'
  num_classes: int = 1000
  width: float = 1.0
  fc_features: int = 0
  remat: bool = False
  steps: int = 10
  repeats: int = 3
  warmup: int = 2
  eval_size: int | None = None  # None: default_eval_size(image_size); 0: no eval
  eval_batch: int = 0  # 0: the train batch
  peak_tflops: float = 0.0  # 0: the table's
  color_shift: float = 0.1
  seed: int = 0

  def model_options(self) -> dict:
    return dict(num_classes=self.num_classes, width=self.width, fc_features=self.fc_features or None)


def _environment(mesh, opts: Options) -> dict:
  import jax
  devices = mesh.devices.flatten().tolist()
  kind = devices[0].device_kind
  platform_name = devices[0].platform
  peak, label = (opts.peak_tflops, 'flag') if opts.peak_tflops else peak_tflops(kind, opts.dtype)
  if platform_name == 'cpu' and not opts.peak_tflops:
    peak, label = None, None
  return {'framework': 'vggjax', 'framework_version': _version(), 'jax_version': jax.__version__,
          'backend': platform_name, 'device_kind': kind if platform_name != 'cpu' else f'cpu ({cpu_name()})',
          'device_count': len(devices), 'process_count': jax.process_count(), 'cpu_count': os.cpu_count(),
          'peak_tflops_per_device': peak, 'peak_source': label,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}


def _version() -> str:
  from vggjax import __version__
  return __version__


def _build(opts: Options):
  from vggjax import models, optim, parallel
  mesh = parallel.make_mesh()
  parallel.check_batch_size(opts.batch, mesh)
  model = models.get_model(opts.model, image_size=opts.image_size, dtype=opts.dtype, **opts.model_options())
  opt_cfg, opt_source = optimizer_config()
  tx = optim.make_optimizer(opt_cfg)
  return mesh, model, tx, opt_source


def _random_batch(rng, batch: int, size: int, num_classes: int, mesh, mask: bool = False) -> dict:
  import jax
  import numpy as np
  from vggjax import parallel
  local = batch // jax.process_count()
  data = {'image': rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, (local,), dtype=np.int32)}
  if mask:
    data['mask'] = np.ones((local,), np.bool_)
  return parallel.global_batch(data, mesh)


def run_benchmark(opts: Options) -> dict:
  """Times the train step (and the dense eval step) for one configuration; returns the JSON record."""
  import jax
  import numpy as np
  from vggjax import parallel, train

  mesh, model, tx, opt_source = _build(opts)
  env = _environment(mesh, opts)
  n = env['device_count']
  rng = np.random.default_rng(opts.seed)
  record: dict[str, Any] = {
      **env, 'model': opts.model, 'width': opts.width, 'fc_features': opts.fc_features or None,
      'num_classes': opts.num_classes, 'image_size': opts.image_size, 'dtype': opts.dtype,
      'batch': opts.batch, 'per_device_batch': opts.batch // n, 'remat': opts.remat,
      'optimizer': opt_source}

  # --- train step ---
  state = train.create_train_state(model, tx, mesh, opts.seed)
  batch = _random_batch(rng, opts.batch, opts.image_size, opts.num_classes, mesh)
  lr = jax.device_put(np.float32(0.01), parallel.replicated(mesh))
  step = train.make_train_step(model, tx, mesh, color_shift=opts.color_shift, remat=opts.remat)
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, lr).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run_train():
    holder['state'], metrics = compiled(holder['state'], batch, lr)
    return holder['state'], metrics

  timing = time_steps(run_train, jax.block_until_ready, steps=opts.steps, repeats=opts.repeats,
                      warmup=opts.warmup)
  loss = float(jax.device_get(run_train()[1]['loss']))
  jax.block_until_ready(holder['state'])
  mem = device_memory()
  flops_img = train_flops_per_image(opts.model, opts.image_size, **opts.model_options())
  xla_flops = cost_analysis_flops(compiled)
  record['train'] = {
      **timing.to_dict(), 'compile_s': compile_s,
      **throughput(flops_img, opts.batch, timing.median, env['peak_tflops_per_device'], n),
      'gflops_per_image': flops_img / 1e9,
      'xla_gflops_per_image': (xla_flops * n / opts.batch / 1e9) if xla_flops else None,
      'peak_memory_bytes': mem['peak_bytes'], 'memory_limit_bytes': mem['limit_bytes'],
      'compiled_memory': compiled_memory(compiled), 'final_loss': loss}

  # --- dense eval step ---
  eval_size = default_eval_size(opts.image_size) if opts.eval_size is None else opts.eval_size
  record['eval'] = None
  if eval_size:
    if eval_size < opts.image_size:
      raise ValueError(f'--eval-size={eval_size} is below the training size {opts.image_size}')
    eval_batch = opts.eval_batch or opts.batch
    parallel.check_batch_size(eval_batch, mesh)
    variables = holder['state'].variables
    ebatch = _random_batch(rng, eval_batch, eval_size, opts.num_classes, mesh, mask=True)
    estep = train.make_eval_step(model, mesh)
    t0 = time.perf_counter()
    ecompiled = estep.lower(variables, ebatch).compile()
    ecompile_s = time.perf_counter() - t0
    etiming = time_steps(lambda: ecompiled(variables, ebatch), jax.block_until_ready, steps=opts.steps,
                         repeats=opts.repeats, warmup=opts.warmup)
    from vggjax import models
    f = models.flops(opts.model, eval_size, train_size=opts.image_size, **opts.model_options())
    record['eval'] = {
        'image_size': eval_size, 'batch': eval_batch, 'score_map': list(f.score_map),
        **etiming.to_dict(), 'compile_s': ecompile_s,
        **throughput(f.flops, eval_batch, etiming.median, env['peak_tflops_per_device'], n),
        'gflops_per_image': f.flops / 1e9, 'peak_memory_bytes': device_memory()['peak_bytes'],
        'compiled_memory': compiled_memory(ecompiled)}
  return record


# --- the largest batch that fits ------------------------------------------------------------------------

def step_memory_bytes(opts: Options, per_device_batch: int, mesh=None, model=None, tx=None,
                      compiler_options: dict | None = None) -> int:
  """Bytes one device needs for the compiled train step at `per_device_batch` (memory analysis of an
  abstract lowering: nothing is allocated)."""
  import jax
  import jax.numpy as jnp
  from vggjax import parallel, train
  if mesh is None:
    mesh, model, tx, _ = _build(dataclasses.replace(opts, batch=len(jax.devices())))
  n = mesh.devices.size
  state = train.abstract_train_state(model, tx, mesh)
  shard = parallel.batch_sharding(mesh)
  b = per_device_batch * n
  batch = {'image': jax.ShapeDtypeStruct((b, opts.image_size, opts.image_size, 3), jnp.uint8, sharding=shard),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=shard)}
  lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(mesh))
  step = train.make_train_step(model, tx, mesh, color_shift=opts.color_shift, remat=opts.remat)
  lowered = step.lower(state, batch, lr)
  try:
    compiled = lowered.compile(compiler_options)
  except Exception:  # noqa: BLE001 (an option this XLA does not know)
    compiled = lowered.compile()
  mem = compiled_memory(compiled)
  if mem is None:
    raise RuntimeError('this backend gives no memory analysis of compiled executables')
  return mem['total_bytes']


def max_batch_size(opts: Options, limit_bytes: int, granularity: int = 8, start: int = 0,
                   max_probes: int = 12, log: Callable[[str], None] = lambda s: None) -> dict:
  """The largest per-device batch (a multiple of `granularity`) whose compiled train step needs at most
  `limit_bytes` on one device. Memory grows about linearly with the batch: two probes fit the line, its
  prediction is probed and the bracket [fits, does not fit] is narrowed by the secant, else by bisection."""
  import jax
  mesh, model, tx, _ = _build(dataclasses.replace(opts, batch=len(jax.devices())))
  # Memory does not depend on LLVM's optimisation, and barely on the GPU autotuner's choices: skip their time.
  compiler_options = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}
  if jax.devices()[0].platform == 'gpu':
    compiler_options['xla_gpu_autotune_level'] = 0
  probes: dict[int, int] = {}

  def mem(b: int) -> int:
    if b not in probes:
      t0 = time.perf_counter()
      probes[b] = step_memory_bytes(opts, b, mesh, model, tx, compiler_options)
      log(f'  per-device batch {b}: {probes[b] / GIB:.2f} GiB ({time.perf_counter() - t0:.1f} s)')
    return probes[b]

  g = granularity
  lo, hi = 0, None  # the largest batch known to fit, the smallest known not to
  b1 = start or 4 * g
  for b in (b1, 2 * b1):
    if mem(b) <= limit_bytes:
      lo = max(lo, b)
    else:
      hi = b if hi is None else min(hi, b)
      break
  while len(probes) < max_probes and (hi is None or hi - lo > g):
    fit = sorted(probes)
    b_a, b_b = fit[-2:] if len(fit) >= 2 else (fit[0], fit[0])
    slope = (probes[b_b] - probes[b_a]) / (b_b - b_a) if b_b != b_a else 0
    guess = int((lo + (limit_bytes - probes[lo]) / slope) // g * g) if (lo and slope > 0) else 0
    upper = hi if hi is not None else 4 * max(lo, g)
    if not (lo < guess < upper):
      guess = (lo + upper) // 2 // g * g
    if guess <= lo:
      guess = lo + g
    if hi is not None and guess >= hi:
      break
    if mem(guess) <= limit_bytes:
      lo = guess
      if hi is None and lo + g not in probes:  # is the line's prediction the edge?
        if mem(lo + g) > limit_bytes:
          hi = lo + g
    else:
      hi = guess
  if lo == 0:
    raise RuntimeError(f'even a per-device batch of {min(probes)} needs {probes[min(probes)] / GIB:.2f} GiB, '
                       f'over the limit of {limit_bytes / GIB:.2f} GiB')
  per_image = None
  if len(probes) >= 2:
    a, b = sorted(probes)[:2]
    per_image = (probes[b] - probes[a]) / (b - a)
  return {'max_per_device_batch': lo, 'limit_bytes': limit_bytes, 'bytes_at_max': probes[lo],
          'first_not_fitting': hi, 'bytes_per_image': per_image, 'granularity': g,
          'probes': {str(k): v for k, v in sorted(probes.items())}, 'exact': hi is not None and hi - lo <= g}


def _is_oom(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def verify_batch(opts: Options, per_device_batch: int, granularity: int = 8, tries: int = 4,
                 log: Callable[[str], None] = lambda s: None) -> dict:
  """Runs the real train step at `per_device_batch` (then lower by `granularity` while it runs out of
  memory): the largest batch that trains, its throughput and its measured peak memory."""
  import jax
  n = len(jax.devices())
  b = per_device_batch
  for _ in range(tries):
    if b < 1:
      break
    try:
      r = run_benchmark(dataclasses.replace(opts, batch=b * n, steps=3, repeats=2, warmup=1, eval_size=0))
    except Exception as e:  # noqa: BLE001
      if not _is_oom(e):
        raise
      log(f'  per-device batch {b}: out of memory when run')
      b -= granularity
      continue
    t = r['train']
    log(f'  per-device batch {b} runs: {t["images_per_s"]:.1f} img/s, peak {_fmt_bytes(t["peak_memory_bytes"])}')
    return {'per_device_batch': b, 'images_per_s': t['images_per_s'], 'step_time_s': t['step_time_s'],
            'mfu': t['mfu'], 'peak_memory_bytes': t['peak_memory_bytes']}
  return {'per_device_batch': None}


# --- the command line -----------------------------------------------------------------------------------

def _batches(values: str | list[str]) -> list[int]:
  """The global batch sizes of --batch (a list, or the text '128,256': benchmarks/torch_reference.py)."""
  values = values.split(',') if isinstance(values, str) else values
  try:
    batches = [int(v) for v in values if v.strip()]
  except ValueError:
    raise cli.CommandError(f'--batch takes integers separated by commas, got {",".join(values)!r}') from None
  if not batches or min(batches) < 1:
    raise cli.CommandError(f'--batch must be positive, got {",".join(values)!r}')
  return batches


def _define_flags() -> dict:
  from absl import flags
  f = {}
  f['model'] = flags.DEFINE_string('model', 'vgg16', 'vgg11 ... vgg19, *_bn, or A ... E.')
  f['batch'] = flags.DEFINE_list('batch', ['256'], 'Global batch (split over all devices); several separated '
                                 'by commas.')
  f['image_size'] = flags.DEFINE_integer('image_size', 224, 'Training resolution.')
  f['dtype'] = flags.DEFINE_enum('dtype', 'bfloat16', list(DTYPES), 'Compute dtype (params stay float32).')
  f['num_classes'] = flags.DEFINE_integer('num_classes', 1000, 'Classes of the last layer.')
  f['width'] = flags.DEFINE_float('width', 1.0, 'Multiplier of the layer widths (narrow nets).')
  f['fc_features'] = flags.DEFINE_integer('fc_features', 0, 'Width of fc6/fc7 (0: 4096 x width).')
  f['remat'] = flags.DEFINE_bool('remat', False, 'Recompute conv activations in the backward pass.')
  f['steps'] = flags.DEFINE_integer('steps', 10, 'Back-to-back steps per timed repeat.')
  f['repeats'] = flags.DEFINE_integer('repeats', 3, 'Timed repeats (the median is reported).')
  f['warmup'] = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  f['eval_size'] = flags.DEFINE_integer('eval_size', None, 'Dense-eval image size (default 384 for a 224 '
                                        'net; 0: no eval step).')
  f['eval_batch'] = flags.DEFINE_integer('eval_batch', 0, 'Dense-eval global batch (0: the train batch).')
  f['peak_tflops'] = flags.DEFINE_float('peak_tflops', 0.0, 'Peak dense TFLOP/s of one device for MFU '
                                        '(default: the table; none on CPU).')
  f['color_shift'] = flags.DEFINE_float('color_shift', 0.1, 'PCA lighting std, as in training.')
  f['seed'] = flags.DEFINE_integer('seed', 0, 'Seed of the random batch and the initialisation.')
  f['max_batch'] = flags.DEFINE_bool('max_batch', False, 'Find the largest per-device batch whose train step '
                                     'fits in device memory instead.')
  f['memory_limit_gb'] = flags.DEFINE_float('memory_limit_gb', 0.0, 'Device memory for --max_batch in GiB '
                                            '(default: the allocator limit; needed on CPU).')
  f['granularity'] = flags.DEFINE_integer('granularity', 8, '--max_batch: search in multiples of this.')
  f['verify'] = flags.DEFINE_bool('verify', False, '--max_batch: also run the step at the batch found (lower '
                                  'while out of memory).')
  f['num_cpu_devices'] = flags.DEFINE_integer('num_cpu_devices', 0, 'Virtual CPU devices (0: '
                                              'VGGJAX_NUM_CPU_DEVICES or 1).')
  f['json'] = flags.DEFINE_bool('json', False, 'One JSON object per configuration on stdout.')
  f['out'] = flags.DEFINE_string('out', '', 'Also append the JSON objects to this file (one per line).')
  return f


def undash(argv: Sequence[str], names) -> list[str]:
  """--image-size=224 as --image_size=224 for the flags in `names`: the spellings of earlier versions, which
  benchmarks/torch_reference.py shares (benchmarks/gpu.sh passes one argument list to both)."""
  out = list(argv[:1])
  for arg in argv[1:]:
    flag, eq, value = arg.partition('=')
    if flag.startswith('--') and flag[2:].replace('-', '_') in names:
      arg = '--' + flag[2:].replace('-', '_') + eq + value
    out.append(arg)
  return out


def _fmt_bytes(n: int | None) -> str:
  return 'n/a' if n is None else f'{n / GIB:.2f} GiB'


def _pct(x: float | None) -> str:
  return 'n/a' if x is None else f'{100 * x:.1f}%'


def summary(r: dict) -> str:
  """One human line per step of a record (of vggjax or of the PyTorch reference)."""
  t = r['train']
  mem = t.get('peak_memory_bytes')
  cm = (t.get('compiled_memory') or {}).get('total_bytes')
  head = (f"{r['framework']} {r['model']} {r['dtype']} {r['image_size']}px batch {r['batch']}"
          f"{' remat' if r.get('remat') else ''} on {r['device_count']}x {r['device_kind']}")
  lines = [f"{head}\n  train: {t['images_per_s']:.1f} img/s (median step {1e3 * t['step_time_s']:.1f} ms, "
           f"min {1e3 * t['step_time_min_s']:.1f}, max {1e3 * t['step_time_max_s']:.1f}), "
           f"{t['tflops']:.2f} TFLOP/s, MFU {_pct(t['mfu'])}, compile {t['compile_s']:.1f} s, "
           f"peak memory {_fmt_bytes(mem)}" + (f' (compiled: {_fmt_bytes(cm)})' if cm else '')]
  e = r.get('eval')
  if e:
    lines.append(f"  dense eval at {e['image_size']}px (score map {e['score_map'][0]}x{e['score_map'][1]}), "
                 f"batch {e['batch']}: {e['images_per_s']:.1f} img/s ({1e3 * e['step_time_s']:.1f} ms), "
                 f"{e['tflops']:.2f} TFLOP/s, MFU {_pct(e['mfu'])}, compile {e['compile_s']:.1f} s")
  return '\n'.join(lines)


def main(argv, flag_holders) -> None:
  from absl import flags, logging
  if not flags.FLAGS['verbosity'].present:  # the output is the summary (or JSON): no library INFO lines
    logging.set_verbosity(logging.WARNING)
  f = cli.start_command(argv, flag_holders)
  import jax
  from vggjax import models
  try:
    models.canonical_name(f['model'])
  except ValueError as e:
    raise cli.CommandError(f'--model={f["model"]}: {e}') from None
  batches = _batches(f['batch'])
  if jax.process_count() == 1:
    bad = [b for b in batches if b % jax.device_count()]
    if bad and not f['max_batch']:
      raise cli.CommandError(f'--batch={",".join(map(str, bad))}: a global batch must be a multiple of the '
                             f'number of devices ({jax.device_count()})')
  base = Options(model=f['model'], image_size=f['image_size'], dtype=f['dtype'], num_classes=f['num_classes'],
                 width=f['width'], fc_features=f['fc_features'], remat=f['remat'], steps=f['steps'],
                 repeats=f['repeats'], warmup=f['warmup'], eval_size=f['eval_size'],
                 eval_batch=f['eval_batch'], peak_tflops=f['peak_tflops'], color_shift=f['color_shift'],
                 seed=f['seed'])

  def emit(record: dict) -> None:
    line = json.dumps(record)
    if f['json']:
      print(line, flush=True)
    if f['out']:
      with open(f['out'], 'a') as out:
        out.write(line + '\n')

  if f['max_batch']:
    limit = int(f['memory_limit_gb'] * GIB) if f['memory_limit_gb'] else device_memory()['limit_bytes']
    if not limit:
      raise cli.CommandError('this backend reports no memory limit: give --memory_limit_gb')
    print(f'largest per-device batch for {f["model"]} {f["dtype"]} {f["image_size"]}px'
          f'{" remat" if f["remat"] else ""}, limit {limit / GIB:.2f} GiB:', file=sys.stderr)
    found = max_batch_size(base, limit, f['granularity'], log=lambda s: print(s, file=sys.stderr))
    env = _environment(_build(dataclasses.replace(base, batch=len(jax.devices())))[0], base)
    record = {**env, 'model': f['model'], 'width': f['width'], 'image_size': f['image_size'],
              'dtype': f['dtype'], 'remat': f['remat'], 'max_batch': found}
    print(f'  -> {found["max_per_device_batch"]} per device ({_fmt_bytes(found["bytes_at_max"])})',
          file=sys.stderr)
    if f['verify']:
      record['max_batch']['verified'] = verify_batch(base, found['max_per_device_batch'], f['granularity'],
                                                     log=lambda s: print(s, file=sys.stderr))
    emit(record)
    return

  for b in batches:
    record = run_benchmark(dataclasses.replace(base, batch=b))
    print(summary(record), file=sys.stderr if f['json'] else sys.stdout, flush=True)
    emit(record)


def _define_flags_accepting_dashes() -> dict:
  holders = _define_flags()
  sys.argv[:] = undash(sys.argv, holders)  # in place: the list run_command parses
  return holders


def run() -> None:
  """The command line (`vggjax benchmark`, `python -m vggjax.benchmark`)."""
  cli.run_command(_define_flags_accepting_dashes, main)


if __name__ == '__main__':
  run()
