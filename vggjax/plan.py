"""Will it fit, how fast, how long: the real steps compiled for a TPU slice without the hardware.

    python -m vggjax.plan --config=configs/vgg16.py --topology=v5litepod-16
    python -m vggjax.plan --config=configs/vgg16.py:jitter --topology=v5p-128 --num_slices=2 --json
    python -m vggjax.plan --config=configs/vgg19.py --topology=v5litepod-8 --max_batch --workdir=plans/E
    python -m vggjax.plan --config=configs/vgg16.py --topology=gpu            # on the attached GPUs

Before a pod is booked, the question is whether the config fits in a chip's memory, how fast it could go and
what the paper's schedule would cost. The plan compiles the steps ``vggjax.main`` would run with the config
(train, validation, dense evaluation) for the slice, with libtpu as a compiler only (``pip install
'vggjax[tpu-plan]'``): nothing is allocated and nothing runs, no TPU is claimed or touched (the process's own
backend is the CPU). Per step it reports the compiler's memory per chip against the chip's HBM, its FLOPs
beside the analytic count, the collectives of the compiled program (ICI or DCN) and an ESTIMATED step time, a
roofline, never a measurement; from it images/s, MFU and the schedule's cost (days, chip-hours), and the
cores per host the input pipeline needs. ``--max_batch``: the largest per-chip batch whose train step fits,
by compiling (two compiles give a line, the line predicts the edge, the edge and one granule above it are
compiled); when the config's batch does not fit, the plan says which per-chip batch would.

A step that does not compile for the slice (an op the TPU compiler rejects, a sharding error, out of memory
at compile time) is reported with the topology, the step and the compiler's message, exit code 3; a step
that compiles but does not fit in HBM exits with 4. The library: ``vggjax.aot`` (target, steps, analysis,
hlo, roofline, search, planner, report); the chip table: ``vggjax.hardware``. ``--topology=gpu`` compiles on
the attached GPUs (JAX's CUDA plugin gives no compile-only GPU topology, so a GPU plan needs a GPU).
"""

from __future__ import annotations

import functools
import json
import os
import sys

from vggjax import cli

if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  cli.add_config_roots(sys.argv)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vggjax import config_lib  # noqa: E402
from vggjax import runlog as vlog  # noqa: E402  (the run-directory path layer: local or gs://)
from vggjax.aot.analysis import PlanError  # noqa: E402,F401
from vggjax.aot.planner import (EXIT_COMPILE_ERROR, EXIT_DOES_NOT_FIT, exit_code, plan)  # noqa: E402,F401
from vggjax.aot.report import format_report  # noqa: E402
from vggjax.aot.target import gpu_target, tpu_target  # noqa: E402

STEPS = ('train', 'eval', 'dense')


def _define_flags():
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

def _check(f: dict) -> None:
  unknown = [s for s in f['steps'] if s not in STEPS]
  if unknown or not f['steps']:
    raise app.UsageError(f'--steps: unknown {unknown}; valid: train, eval, dense')
  if f['max_batch'] and 'train' not in f['steps']:
    raise app.UsageError('--max_batch needs the train step in --steps')
  if f['batch_granularity'] < 1 or f['max_batch_limit'] < f['batch_granularity']:
    raise app.UsageError(f'--batch_granularity={f["batch_granularity"]} --max_batch_limit='
                         f'{f["max_batch_limit"]}: the granularity must be at least 1 and the limit at least '
                         'the granularity')


def _target(f: dict, config):
  try:
    config_lib.validate(config)
    if f['topology'] == 'gpu':
      return gpu_target(str(config.model.dtype))
    return tpu_target(f['topology'], f['num_slices'], str(config.model.dtype), f['ici_gbps'], f['dcn_gbps'],
                      f['hbm_gib'])
  except (ValueError, config_lib.ConfigError) as e:
    raise app.UsageError(str(e))
  except PlanError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_COMPILE_ERROR)


def _print(f: dict, report: dict, log) -> None:
  table = format_report(report)
  if f['json']:
    print(table, file=sys.stderr, flush=True)
    print(json.dumps(report, default=str), flush=True)
  else:
    print(table, flush=True)
  if f['workdir']:
    path = vlog.run_path(f['workdir'], 'plan.json')
    path.parent.mkdir(parents=True, exist_ok=True)
    vlog.write_text(path, json.dumps(report, indent=2, default=str))
    log(f'plan written to {path}')


def main(argv, flag_holders) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = {k: v.value for k, v in flag_holders.items()}
  if f['topology'] != 'gpu':
    jax.config.update('jax_platforms', 'cpu')  # the process's own backend: never a TPU of this machine
  config = f['config']
  _check(f)
  target = _target(f, config)
  log = functools.partial(print, file=sys.stderr, flush=True)
  try:
    report = plan(config, target, steps_to_plan=tuple(f['steps']), find_max_batch=f['max_batch'],
                  train_examples=f['train_examples'], granularity=f['batch_granularity'], log=log,
                  max_batch_limit=f['max_batch_limit'])
  except PlanError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(EXIT_COMPILE_ERROR)
  _print(f, report, log)
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
