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
import functools
import json
import sys
from typing import Sequence

import jax
from absl import flags

from vggjax import cli, models, parallel
from vggjax.aot import analysis
from vggjax.hardware import DTYPES, GIB, peak_tflops  # noqa: F401 (benchmarks/torch_reference.py's names)
from vggjax.metrology import (Options, Timing, build_steps, cpu_name, default_eval_size,  # noqa: F401
                              environment, eval_flops_per_image, fmt_bytes, largest_batch, run_benchmark,
                              throughput, time_steps, train_flops_per_image, verify_batch)


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
           f"peak memory {fmt_bytes(mem)}" + (f' (compiled: {fmt_bytes(cm)})' if cm else '')]
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
  try:
    found = largest_batch(base, limit, f['granularity'], log=log)
  except ValueError as e:
    raise cli.CommandError(str(e)) from None
  env = environment(parallel.make_mesh(), base)
  record = {**env, 'model': f['model'], 'width': f['width'], 'image_size': f['image_size'],
            'dtype': f['dtype'], 'remat': f['remat'], 'max_batch': found}
  log(f'  -> {found["max_per_device_batch"]} per device ({fmt_bytes(found["bytes_at_max"])})')
  if f['verify']:
    record['max_batch']['verified'] = verify_batch(base, found['max_per_device_batch'], f['granularity'],
                                                   log=log)
  emit(record)


def main(argv, flag_holders) -> None:
  f = cli.start_command(argv, flag_holders, join=parallel.join_processes)
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
