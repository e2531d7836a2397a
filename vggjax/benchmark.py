"""How fast the framework trains and evaluates, against the device's limit: images/s, achieved TFLOP/s, MFU.

    python -m vggjax.benchmark --model=vgg16 --batch=256 --image_size=224 --dtype=bfloat16 --json
    python -m vggjax.benchmark --model=vgg16 --batch=128,256 --dtype=bfloat16 --remat
    python -m vggjax.benchmark --model=vgg16 --dtype=bfloat16 --max_batch          # largest batch that fits

It times the real jitted steps of vggjax.train (``vggjax.aot.steps.Steps``, the steps the plan compiles) on
every available device (data parallel over the mesh):

* the train step (make_train_step: uint8 in, colour shift and normalisation, forward, backward, SGD with
  momentum and L2 from the default config, the non-finite guard), with the state donated as in training;
* the dense eval step (make_eval_step) on images larger than the training size (``--eval_size``, 384 for
  a 224 net): the network runs fully convolutionally and the class score map is averaged.

Method (``vggjax.metrology``): one batch of random uint8 images is put on the devices once (the input
pipeline is not timed); the step is lowered and compiled ahead of time (``compile_s``), run ``--warmup``
times untimed, then ``--repeats`` times ``--steps`` back-to-back steps, each repeat closed by
``jax.block_until_ready`` before the clock is read. The step time is the median over repeats of (repeat time
/ steps). FLOPs are analytic (vggjax.models.flops): a training step counts 3x the forward pass, the dense
eval the forward pass at the eval size. MFU = achieved FLOP/s / (the device's peak dense FLOP/s x devices);
peaks from ``vggjax.hardware.peak_tflops`` (``--peak_tflops`` overrides; none on a CPU). Peak memory is the
device allocator's ``peak_bytes_in_use`` where the backend reports it (GPU, TPU) and the compiled
executable's memory analysis everywhere. ``--max_batch`` is the plan's largest-batch search
(``vggjax.aot.search``) compiling on the attached devices.

``--json`` prints one JSON object per configuration on stdout (the human summary goes to stderr);
benchmarks/torch_reference.py prints the same fields for the same step in PyTorch.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import jax
from absl import flags
import numpy as np

from vggjax import __version__, cli, models, optim, parallel, settings, train
from vggjax.aot import analysis, search
from vggjax.aot.steps import Steps
from vggjax.hardware import DTYPES, GIB, peak_tflops  # noqa: F401 (benchmarks/torch_reference.py's names)
from vggjax.metrology import (Timing, cpu_name, eval_flops_per_image, throughput,  # noqa: F401 (the same)
                              time_steps, train_flops_per_image)

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



def _environment(mesh, opts: Options) -> dict:
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
  env = _environment(steps.mesh, opts)
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
    raise cli.CommandError(f'even a per-device batch of {b} does not fit in the limit of '
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
        f'peak {_fmt_bytes(t["peak_memory_bytes"])}')
    return {'per_device_batch': b, 'images_per_s': t['images_per_s'], 'step_time_s': t['step_time_s'],
            'mfu': t['mfu'], 'peak_memory_bytes': t['peak_memory_bytes']}
  return {'per_device_batch': None}


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
  f['json'] = flags.DEFINE_bool('json', False, 'One JSON object per configuration on stdout.')
  f['out'] = flags.DEFINE_string('out', '', 'Also append the JSON objects to this file (one per line).')
  f.update(cli.define_process_flags())  # --num_cpu_devices, and the multi-process flags
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


def _max_batch_main(f: dict, base: Options, emit) -> None:
  limit = int(f['memory_limit_gb'] * GIB) if f['memory_limit_gb'] else analysis.device_memory()['limit_bytes']
  if not limit:
    raise cli.CommandError('this backend reports no memory limit: give --memory_limit_gb')
  log = functools.partial(print, file=sys.stderr, flush=True)
  log(f'largest per-device batch for {f["model"]} {f["dtype"]} {f["image_size"]}px'
      f'{" remat" if f["remat"] else ""}, limit {limit / GIB:.2f} GiB:')
  found = largest_batch(base, limit, f['granularity'], log=log)
  env = _environment(parallel.make_mesh(), base)
  record = {**env, 'model': f['model'], 'width': f['width'], 'image_size': f['image_size'],
            'dtype': f['dtype'], 'remat': f['remat'], 'max_batch': found}
  log(f'  -> {found["max_per_device_batch"]} per device ({_fmt_bytes(found["bytes_at_max"])})')
  if f['verify']:
    record['max_batch']['verified'] = verify_batch(base, found['max_per_device_batch'], f['granularity'],
                                                   log=log)
  emit(record)


def main(argv, flag_holders) -> None:
  f = cli.start_command(argv, flag_holders)
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
  base = Options(**{k.name: f[k.name] for k in dataclasses.fields(Options) if k.name != 'batch'})

  def emit(record: dict) -> None:
    line = json.dumps(record)
    if f['json']:
      print(line, flush=True)
    if f['out']:
      with open(f['out'], 'a') as out:
        out.write(line + '\n')

  if f['max_batch']:
    _max_batch_main(f, base, emit)
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
