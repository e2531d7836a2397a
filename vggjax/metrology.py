"""How the framework's steps are measured: analytic FLOPs per image, throughput and MFU, the clock discipline,
the timed train and dense eval steps (``run_benchmark``), the largest batch (``largest_batch``: the plan's
search, ``vggjax.aot.search``, compiling on the attached devices) and the run that checks it.

``vggjax.benchmark`` is its command; benchmarks/torch_reference.py times PyTorch the same way (through
``vggjax.benchmark``'s names).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from vggjax import __version__, models, optim, parallel, settings, train
from vggjax.aot import analysis, search
from vggjax.aot.steps import Steps
from vggjax.hardware import GIB, peak_tflops


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


OPTIMIZER_SOURCE = 'configs/default.py'  # the packaged default config's optimizer (the paper's SGD)


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


def environment(mesh, opts: Options) -> dict:
  """Where a record was measured: framework, JAX, devices, peak, XLA flags, date."""
  devices = mesh.devices.flatten().tolist()
  kind = devices[0].device_kind
  platform_name = devices[0].platform
  peak, label = (opts.peak_tflops, 'flag') if opts.peak_tflops else peak_tflops(kind, opts.dtype)
  if platform_name == 'cpu' and not opts.peak_tflops:
    peak, label = None, None
  return {'framework': 'vggjax', 'framework_version': __version__, 'jax_version': jax.__version__,
          'backend': platform_name, 'device_kind': kind if platform_name != 'cpu' else f'cpu ({cpu_name()})',
          'device_count': len(devices), 'process_count': jax.process_count(), 'cpu_count': os.cpu_count(),
          'peak_tflops_per_device': peak, 'peak_source': label,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}

def default_eval_size(image_size: int) -> int:
  """The dense-eval size for a training size: 384 for 224 (the paper's Q = 384 for S = 384 nets)."""
  return int(round(image_size * 384 / 224))


def build_steps(opts: Options, mesh=None) -> Steps:
  """The benchmark's model, the default config's optimizer and their steps on the mesh of every device."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  model = models.get_model(opts.model, image_size=opts.image_size, dtype=opts.dtype, **opts.model_options())
  tx = optim.make_optimizer(settings.default_config().optimizer)
  return Steps(mesh=mesh, model=model, eval_model=model, tx=tx, image_size=opts.image_size,
               train_options=dict(color_shift=opts.color_shift, remat=opts.remat), dtype=opts.dtype)


def _random_batch(rng, batch: int, size: int, num_classes: int, mesh, mask: bool = False) -> dict:
  local = batch // jax.process_count()
  data = {'image': rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
          'label': rng.integers(0, num_classes, (local,), dtype=np.int32)}
  if mask:
    data['mask'] = np.ones((local,), np.bool_)
  return parallel.global_batch(data, mesh)

def _time_train(steps: Steps, opts: Options, rng, peak, n: int) -> tuple[dict, Any]:
  mesh = steps.mesh
  state = train.create_train_state(steps.model, steps.tx, mesh, opts.seed)
  batch = _random_batch(rng, opts.batch, opts.image_size, opts.num_classes, mesh)
  lr = jax.device_put(np.float32(0.01), parallel.replicated(mesh))
  t0 = time.perf_counter()
  compiled = steps.train_step().lower(state, batch, lr).compile()
  compile_s = time.perf_counter() - t0
  holder = {'state': state}

  def run_train():
    holder['state'], metrics = compiled(holder['state'], batch, lr)
    return holder['state'], metrics

  timing = time_steps(run_train, jax.block_until_ready, steps=opts.steps, repeats=opts.repeats,
                      warmup=opts.warmup)
  loss = float(jax.device_get(run_train()[1]['loss']))
  jax.block_until_ready(holder['state'])
  mem = analysis.device_memory()
  flops_img = train_flops_per_image(opts.model, opts.image_size, **opts.model_options())
  xla_flops = analysis.cost_flops(compiled)
  return {
      **timing.to_dict(), 'compile_s': compile_s, **throughput(flops_img, opts.batch, timing.median, peak, n),
      'gflops_per_image': flops_img / 1e9,
      'xla_gflops_per_image': (xla_flops * n / opts.batch / 1e9) if xla_flops else None,
      'peak_memory_bytes': mem['peak_bytes'], 'memory_limit_bytes': mem['limit_bytes'],
      'compiled_memory': analysis.compiled_memory(compiled), 'final_loss': loss}, holder['state']


def _time_eval(steps: Steps, opts: Options, rng, peak, n: int, variables, eval_size: int) -> dict:
  if eval_size < opts.image_size:
    raise ValueError(f'--eval-size={eval_size} is below the training size {opts.image_size}')
  eval_batch = opts.eval_batch or opts.batch
  parallel.check_batch_size(eval_batch, steps.mesh)
  ebatch = _random_batch(rng, eval_batch, eval_size, opts.num_classes, steps.mesh, mask=True)
  t0 = time.perf_counter()
  ecompiled = steps.eval_step().lower(variables, ebatch).compile()
  ecompile_s = time.perf_counter() - t0
  etiming = time_steps(lambda: ecompiled(variables, ebatch), jax.block_until_ready, steps=opts.steps,
                       repeats=opts.repeats, warmup=opts.warmup)
  f = models.flops(opts.model, eval_size, train_size=opts.image_size, **opts.model_options())
  return {'image_size': eval_size, 'batch': eval_batch, 'score_map': list(f.score_map),
          **etiming.to_dict(), 'compile_s': ecompile_s,
          **throughput(f.flops, eval_batch, etiming.median, peak, n),
          'gflops_per_image': f.flops / 1e9, 'peak_memory_bytes': analysis.device_memory()['peak_bytes'],
          'compiled_memory': analysis.compiled_memory(ecompiled)}


def run_benchmark(opts: Options) -> dict:
  """Times the train step (and the dense eval step) for one configuration; returns the JSON record."""
  steps = build_steps(opts)
  parallel.check_batch_size(opts.batch, steps.mesh)
  env = environment(steps.mesh, opts)
  n, peak = env['device_count'], env['peak_tflops_per_device']
  rng = np.random.default_rng(opts.seed)
  record: dict[str, Any] = {
      **env, 'model': opts.model, 'width': opts.width, 'fc_features': opts.fc_features or None,
      'num_classes': opts.num_classes, 'image_size': opts.image_size, 'dtype': opts.dtype,
      'batch': opts.batch, 'per_device_batch': opts.batch // n, 'remat': opts.remat,
      'optimizer': OPTIMIZER_SOURCE}
  record['train'], state = _time_train(steps, opts, rng, peak, n)
  eval_size = default_eval_size(opts.image_size) if opts.eval_size is None else opts.eval_size
  record['eval'] = _time_eval(steps, opts, rng, peak, n, state.variables, eval_size) if eval_size else None
  return record


def largest_batch(opts: Options, limit_bytes: int, granularity: int = 8,
                  log: Callable[[str], None] = lambda s: None) -> dict:
  """The largest per-device batch (a multiple of `granularity`) whose train step, compiled on the attached
  devices, needs at most `limit_bytes` on one device: ``vggjax.aot.search.max_batch``, from 4 granules."""
  steps = build_steps(opts)
  probe = search.TrainStepProbe.on_attached_devices(steps, limit_bytes, log, opts.dtype)
  found = search.max_batch(steps, probe.target, 4 * granularity, log, granularity=granularity, probe=probe)
  lo = found['max_per_chip_batch']
  totals = {int(b): p['total_bytes'] for b, p in found['probes'].items()}
  if not lo:
    b = min(totals)
    need = f' ({totals[b] / GIB:.2f} GiB)' if totals[b] else ' (out of memory at compile time)'
    raise ValueError(f'even a per-device batch of {b} does not fit in the limit of '
                     f'{limit_bytes / GIB:.2f} GiB{need}')
  known = sorted(b for b, t in totals.items() if t is not None)
  a, b = (known[:2] + [None, None])[:2]
  return {'max_per_device_batch': lo, 'limit_bytes': limit_bytes, 'bytes_at_max': totals[lo],
          'first_not_fitting': found['first_not_fitting'], 'granularity': found['granularity'],
          'bytes_per_image': (totals[b] - totals[a]) / (b - a) if b is not None else None,
          'probes': {str(k): v for k, v in sorted(totals.items())}, 'exact': found['exact'],
          'search': found['search']}


def verify_batch(opts: Options, per_device_batch: int, granularity: int = 8, tries: int = 4,
                 log: Callable[[str], None] = lambda s: None) -> dict:
  """Runs the real train step at `per_device_batch` (then lower by `granularity` while it runs out of
  memory): the largest batch that trains, its throughput and its measured peak memory."""
  n = len(jax.devices())
  b = per_device_batch
  for _ in range(tries):
    if b < 1:
      break
    try:
      r = run_benchmark(dataclasses.replace(opts, batch=b * n, steps=3, repeats=2, warmup=1, eval_size=0))
    except Exception as e:  # noqa: BLE001
      if not analysis.is_oom(e):
        raise
      log(f'  per-device batch {b}: out of memory when run')
      b -= granularity
      continue
    t = r['train']
    log(f'  per-device batch {b} runs: {t["images_per_s"]:.1f} img/s, '
        f'peak {fmt_bytes(t["peak_memory_bytes"])}')
    return {'per_device_batch': b, 'images_per_s': t['images_per_s'], 'step_time_s': t['step_time_s'],
            'mfu': t['mfu'], 'peak_memory_bytes': t['peak_memory_bytes']}
  return {'per_device_batch': None}


def fmt_bytes(n: int | None) -> str:
  return 'n/a' if n is None else f'{n / GIB:.2f} GiB'

