"""The plan of a config on a target: will it fit, how fast, how long (the report ``vggjax plan`` prints).

Per step (train, validation, dense evaluation) the compiler's memory per chip against the chip's HBM, its
FLOPs and HBM bytes beside the analytic count, the collectives of the compiled program and an ESTIMATED step
time (``roofline``); from it the schedule's cost (days and chip-hours for the config's epochs), the hosts,
processes and per-process batch, and the cores per host the input pipeline needs; with ``find_max_batch``
the largest per-chip batch whose train step fits (``search``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import jax

from vggjax import config_lib, models, parallel, settings
from vggjax.aot import hlo, search
from vggjax.aot.analysis import PlanError
from vggjax.aot.roofline import step_report
from vggjax.aot.steps import Steps, nbytes
from vggjax.aot.target import Compiled, Target, compile_step, libtpu_version
from vggjax.data import pipeline
from vggjax.evaluation import engine
from vggjax.hardware import GIB

EXIT_COMPILE_ERROR = 3
EXIT_DOES_NOT_FIT = 4
# Images per core-second of the whole input pipeline (folder source, Grain, batches of 32), from
# BENCHMARKS.md "Input pipeline" (2-core AMD EPYC VM, 2026-11-28): S = 256 and S ~ U[256, 512].
PIPELINE_IMAGES_PER_CORE_S = {'fixed': 1113.0, 'jittered': 986.0}
# Datasets whose size the plan knows without reading them: (classes, training images, validation images).
KNOWN_DATASETS = {'imagenet2012': (1000, 1_281_167, 50_000)}
ASSUMPTIONS = [
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
]


def dataset_size(config, train_examples: int = 0) -> tuple[int, int, str]:
  """(classes, training images, source) of the config's dataset: known sizes first, else the data layer."""
  d = settings.DataSettings.from_config(config.data)
  name = d.name if d.source == 'tfds' else ''
  if name in KNOWN_DATASETS:
    classes, num_train, _ = KNOWN_DATASETS[name]
    source = f'{name} ({num_train:,} training images)'
  else:
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


def model_options(config) -> dict:
  m = config.model
  return dict(num_classes=m.num_classes, width=m.width, fc_features=m.fc_features or None)


@dataclasses.dataclass
class _Plan:
  """What every step of one plan shares: the config, the target, the steps and the analytic figures."""
  config: Any
  target: Target
  steps: Steps
  log: Callable[[str], None]

  def __post_init__(self):
    self.n, self.gb, self.size = self.target.chips, self.config.train.global_batch_size, self.steps.image_size
    self.fwd = models.flops(self.config.model.name, self.size, train_size=self.size,
                            **model_options(self.config)).flops
    self.parts = self.steps.state_parts()
    self.img_bytes = self.size * self.size * 3 + 4  # uint8 image, int32 label

  def train_report(self, comp: Compiled, per_chip: int, loop_trips: int = 1) -> dict:
    size = (self.size, self.size)
    return step_report('train', comp, self.target, global_batch=per_chip * self.n,
                       analytic_flops_per_image=3 * self.fwd, state_parts=self.parts,
                       batch_bytes_per_chip=per_chip * self.img_bytes, image_hw=size, loop_trips=loop_trips,
                       valid_flops_per_image=hlo.valid_tap_flops(self.steps.model, size, True),
                       step_remat=self.steps.remat)

  def variable_parts(self) -> dict:
    variables_bytes = self.parts['parameters_bytes'] + nbytes(self.steps.abstract_state().batch_stats)
    return {'parameters_bytes': self.parts['parameters_bytes'],
            'other_state_bytes': variables_bytes - self.parts['parameters_bytes']}


def _check_batch(gb: int, k: int, target: Target) -> None:
  n = target.chips
  if gb % n:
    raise PlanError(f'config.train.global_batch_size={gb} does not split over the {n} chips of {target.name}'
                    ': '
                    f'give a multiple of {n} (--config.train.global_batch_size={max(n, gb - gb % n)} or '
                    f'{gb - gb % n + n})')
  if gb % k or (gb // k) % n:
    raise PlanError(f'config.train.global_batch_size={gb} with train.accumulate_steps='
                    f'{k} does not give every chip whole micro-batches on {n} chips')


def _batch_estimate(tr: dict, comp: Compiled, per_chip: int, hbm_bytes: int) -> dict | None:
  """The per-chip batch that would fit, from the one compile of a train step that does not."""
  estimate = None
  if tr.get('fits') is False and tr.get('memory'):
    mm = tr['memory']
    per_image = (mm['temporaries_bytes'] + mm['batch_bytes']) / per_chip
    fixed = mm['total_bytes'] - mm['temporaries_bytes'] - mm['batch_bytes']
    guess = int((hbm_bytes - fixed) // per_image) if per_image > 0 else 0
    estimate = {
        'kind': 'linear estimate from the one compile (temporaries and batch scale with the batch); '
                '--max_batch searches by compiling', 'per_chip_batch': max(0, guess),
        'accumulate_steps_for_config_batch': math.ceil(per_chip / guess) if guess > 0 else None}
  hbm_oom = re.search(r'required for HLO temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)',
                      comp.error or '')
  if hbm_oom:  # the compiler's own figures: temporaries needed against what the chip has
    need, have = float(hbm_oom.group(1)), float(hbm_oom.group(2))
    guess = int(per_chip * have / need * 0.9)
    estimate = {
        'kind': 'estimate from the compiler\'s out-of-memory message (temporaries scale with the batch, '
                '10% margin); --max_batch searches by compiling', 'per_chip_batch': guess,
        'accumulate_steps_for_config_batch': math.ceil(per_chip / guess) if guess > 0 else None}
  return estimate


def _plan_max_batch(p: _Plan, comp: Compiled, per_chip: int, compiled_out: dict, granularity: int,
                    limit: int) -> dict:
  p.log(f'largest per-chip batch whose train step fits in {p.target.hbm_bytes / GIB:.1f} GiB:')
  found = search.max_batch(p.steps, p.target, per_chip, p.log,
                           known={per_chip: comp} if comp.ok or comp.oom else None,
                           granularity=granularity, limit=limit, compiled_out=compiled_out)
  b = found['max_per_chip_batch']
  if b:
    found['global_batch_at_max'] = b * p.n
    found['accumulate_steps_for_config_batch'] = math.ceil(p.gb / (b * p.n)) if b * p.n < p.gb else 1
    at_max = compiled_out.pop('train_at_max_batch', None)
    if at_max is not None and p.steps.accumulate_steps == 1:  # the edge's own program: no extra compile
      found['train_step'] = p.train_report(at_max, b)
  return found


def _plan_train(p: _Plan, report: dict, compiled_out: dict, find_max_batch: bool, granularity: int,
                limit: int) -> None:
  per_chip = p.gb // p.n
  comp = compiled_out['train'] = compile_step(p.steps.train_step(), p.steps.train_args(p.gb), 'train step',
                                              p.target, p.log)
  tr = report['steps']['train'] = p.train_report(comp, per_chip, loop_trips=p.steps.accumulate_steps)
  if comp.ok is False and not comp.oom:
    report['failed'] = {'step': 'train', 'topology': p.target.name, 'message': comp.error}
  estimate = _batch_estimate(tr, comp, per_chip, p.target.hbm_bytes)
  if estimate:
    report['max_batch_estimate'] = estimate
  if find_max_batch:
    report['max_batch'] = _plan_max_batch(p, comp, per_chip, compiled_out, granularity, limit)


def _plan_eval(p: _Plan, report: dict, compiled_out: dict) -> None:
  comp = compiled_out['eval'] = compile_step(p.steps.eval_step(), p.steps.eval_args(p.gb), 'validation step',
                                             p.target, p.log)
  size = (p.size, p.size)
  report['steps']['eval'] = step_report('eval', comp, p.target, global_batch=p.gb,
                                        analytic_flops_per_image=p.fwd, state_parts=p.variable_parts(),
                                        batch_bytes_per_chip=p.gb // p.n * (p.img_bytes + 1), image_hw=size,
                                        valid_flops_per_image=hlo.valid_tap_flops(p.steps.eval_model, size,
                                                                                  False))
  if not comp.ok and not comp.oom:
    report.setdefault('failed', {'step': 'eval', 'topology': p.target.name, 'message': comp.error})


def _plan_dense(p: _Plan, report: dict, compiled_out: dict) -> None:
  q, bh, bw = p.steps.dense_shape()
  dense_gb = engine.DEFAULT_PER_DEVICE_BATCH * p.n
  flips = 2 if p.steps.flip else 1
  dense_fwd = flips * models.flops(p.config.model.name, (bh, bw), train_size=p.size,
                                   **model_options(p.config)).flops
  comp = compiled_out['dense'] = compile_step(p.steps.dense_step(), p.steps.dense_args(dense_gb),
                                              f'dense evaluation step (Q={q})', p.target, p.log)
  report['steps']['dense'] = step_report('dense', comp, p.target, global_batch=dense_gb,
                                         analytic_flops_per_image=dense_fwd, state_parts=p.variable_parts(),
                                         batch_bytes_per_chip=dense_gb // p.n * (bh * bw * 3 + 8),
                                         image_hw=(bh, bw), loop_trips=flips,
                                         valid_flops_per_image=flips * hlo.valid_tap_flops(p.steps.eval_model,
                                                                                           (bh, bw), False))
  report['steps']['dense']['test_scale'] = q
  if not comp.ok and not comp.oom:
    report.setdefault('failed', {'step': 'dense', 'topology': p.target.name, 'message': comp.error})


def _schedule(steps_total: int, step_s: float, chips: int) -> dict:
  seconds = steps_total * step_s
  return {'kind': 'estimate', 'steps': steps_total, 'days': seconds / 86400,
          'chip_hours': seconds / 3600 * chips}


def _plan_schedules(p: _Plan, report: dict, num_train: int, data_source: str) -> None:
  """The schedule's cost at the config's batch and, with the search, at the largest batch."""
  t = p.config.train
  tr = report['steps'].get('train')
  est = tr and tr.get('estimate')
  if est:
    steps_total = t.max_steps or math.ceil(t.num_epochs * num_train / p.gb)
    report['schedule'] = {'epochs': t.num_epochs if not t.max_steps else None, 'train_examples': num_train,
                          'dataset': data_source, **_schedule(steps_total, est['step_s'], p.n)}
  est_max = report.get('max_batch', {}).get('train_step', {}).get('estimate')
  if est_max and not t.max_steps:  # the same epochs at the largest batch (the recipe's lr is not rescaled)
    steps_max = math.ceil(t.num_epochs * num_train / report['max_batch']['global_batch_at_max'])
    report['max_batch']['schedule'] = {'epochs': t.num_epochs, **_schedule(steps_max, est_max['step_s'], p.n)}


def _input_rates(p: _Plan, report: dict) -> dict:
  """Hosts, processes, per-process batch and the cores per host the input pipeline needs."""
  d, target = p.config.data, p.target
  jittered = int(d.scale_max) > int(d.scale_min)
  per_core = PIPELINE_IMAGES_PER_CORE_S['jittered' if jittered else 'fixed']
  inp: dict[str, Any] = {'hosts': target.hosts, 'processes': target.hosts,
                         'per_process_batch': p.gb // target.hosts,
                         'chips_per_host': p.n // target.hosts, 'pipeline_images_per_core_s': per_core,
                         'pipeline_source': 'BENCHMARKS.md, Input pipeline (whole pipeline, '
                                            f'{"S~U[256,512]" if jittered else "S=256"})'}
  tr = report['steps'].get('train')
  est = tr and tr.get('estimate')
  if est:
    rate = est['images_per_s'] / target.hosts
    inp.update(images_per_s_per_host=rate, cores_per_host=rate / per_core)
  return inp


def _header(p: _Plan) -> dict:
  m, d = p.config.model, p.config.data
  return {
      'kind': 'plan (compiled for the target; times are estimates, not measurements)',
      'date': time.strftime('%Y-%m-%d'), 'jax_version': jax.__version__,
      'libtpu_version': libtpu_version() if p.target.device_kind.startswith('TPU') else None,
      'target': p.target.to_dict(),
      'model': {'name': m.name, 'dtype': str(m.dtype), 'remat': bool(m.remat), 'width': m.width,
                'num_classes': m.num_classes, 'parameters': models.param_count(p.steps.model),
                'image_size': p.size, 'train_scale': [int(d.scale_min), int(d.scale_max)]},
      'global_batch': p.gb, 'accumulate_steps': p.steps.accumulate_steps, 'steps': {}}


def plan(config, target: Target, *, steps_to_plan=('train', 'eval', 'dense'), find_max_batch: bool = False,
         train_examples: int = 0, granularity: int = 8, log: Callable[[str], None] = lambda s: None,
         compiled_out: dict | None = None, max_batch_limit: int = 4096) -> dict:
  """Compiles the config's steps for the target and returns the report (a JSON-able dict). The compiled
  executables are put in `compiled_out` (by step name) when given."""
  compiled_out = {} if compiled_out is None else compiled_out
  config_lib.validate(config)
  classes, num_train, data_source = dataset_size(config, train_examples)
  config = config_lib.resolve(config, config.model.num_classes or classes)
  steps = Steps.build(config, parallel.make_mesh(target.devices))
  _check_batch(config.train.global_batch_size, steps.accumulate_steps, target)
  p = _Plan(config, target, steps, log)
  report = _header(p)
  if 'train' in steps_to_plan:
    _plan_train(p, report, compiled_out, find_max_batch, granularity, max_batch_limit)
  if 'eval' in steps_to_plan:
    _plan_eval(p, report, compiled_out)
  if 'dense' in steps_to_plan:
    _plan_dense(p, report, compiled_out)
  _plan_schedules(p, report, num_train, data_source)
  report['input'] = _input_rates(p, report)
  report['assumptions'] = ASSUMPTIONS + target.notes
  return report


def exit_code(report: dict) -> int:
  if report.get('failed'):
    return EXIT_COMPILE_ERROR
  if any(s.get('fits') is False for s in report['steps'].values()):
    return EXIT_DOES_NOT_FIT
  return 0
