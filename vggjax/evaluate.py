"""The command of the paper's evaluation protocols (sections 3.2 and 4) over every image of a split.

    python -m vggjax.evaluate --workdir=runs/D                        # the run's latest checkpoint and config
    python -m vggjax.evaluate --config=configs/vgg16.py --workdir=runs/D --multiscale
    python -m vggjax.evaluate --config=configs/vgg16.py --workdir=runs/D_E --checkpoint=runs/D \\
        --checkpoint=runs/E --multiscale --protocols=dense,multicrop,dense+multicrop     # fusion of D and E

The protocols, their exactness on images of any aspect ratio, the sharding and the output are described in
``vggjax.evaluation`` (the library this command runs). Output: WORKDIR/eval.json and a table laid out like
the paper's Tables 3-5 on stdout. The library's names are importable from here too
(``from vggjax import evaluate as ev; ev.evaluate(...)``), as notebooks and scripts use them.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from vggjax import cli

if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  cli.add_config_roots(sys.argv)

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vggjax import checkpoints, parallel, rundir  # noqa: E402
from vggjax.data import pipeline  # noqa: E402
from vggjax.settings import DataSettings  # noqa: E402
from vggjax.evaluation import *  # noqa: E402,F401,F403 - the library's names, as before the split
from vggjax.evaluation import (ASPECT_BUCKETS, DEFAULT_PER_DEVICE_BATCH, PROTOCOLS,  # noqa: E402
                               ProtocolEvaluator, ProtocolSettings, format_table, load_model, write_results)
from vggjax.evaluation.engine import EvalResult, evaluate  # noqa: E402,F401


def _define_flags():
  f = {}
  f['config'] = config_flags.DEFINE_config_file(
      'config', None, 'The config of the data to evaluate on (configs/*.py[:arg]); default: the workdir\'s '
      'config.json. Override fields with --config.FIELD=VALUE (e.g. --config.data.eval_split=...).',
      lock_config=False)
  f['workdir'] = flags.DEFINE_string('workdir', None, 'Where eval.json goes; also the checkpoint to evaluate '
                                     '(its latest) when no --checkpoint is given.')
  f['checkpoint'] = flags.DEFINE_multi_string(
      'checkpoint', [], 'A training workdir (its latest checkpoint), WORKDIR/best (its best val top-1 one, '
      'train.keep_best), checkpoint step directory or weights directory; repeat the flag to fuse several '
      'models.')
  f['protocols'] = flags.DEFINE_list('protocols', list(PROTOCOLS), f'Any of {", ".join(PROTOCOLS)}.')
  f['scales'] = flags.DEFINE_list('scales', [], 'Test scales Q for every model (default: the paper\'s, from '
                                  'each model\'s training S).')
  f['multiscale'] = flags.DEFINE_bool('multiscale', False, 'The paper\'s 3 test scales per model: {S-32, S, '
                                      'S+32} (fixed S) or {Smin, (Smin+Smax)/2, Smax} (jittered S).')
  f['flip'] = flags.DEFINE_bool('flip', None, 'Average with the horizontal flips (dense) and use the '
                                'mirrored crops (multi-crop), as the paper. Default: the config\'s data.flip '
                                '(True).')
  f['batch_size'] = flags.DEFINE_integer('batch_size', 0, 'Global images per step (0: '
                                         f'{DEFAULT_PER_DEVICE_BATCH} per device).')
  f['num_threads'] = flags.DEFINE_integer('num_threads', 0,
                                          'Host threads decoding and rescaling (0: up to 16).')
  f['aspect_buckets'] = flags.DEFINE_list('aspect_buckets', [f'{a:.4g}' for a in ASPECT_BUCKETS],
                                          'Aspect ratios of the dense buckets (fewer: fewer compiled shapes, '
                                          'more padding).')
  f['dtype'] = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype (default: float32).')
  f['weights'] = flags.DEFINE_enum('weights', 'trained', list(checkpoints.WEIGHTS),
                                   'Which parameters of a training run: trained (the default: the latest '
                                   'checkpoint\'s), or ema (their moving average, train.ema_decay > 0).')
  f.update(cli.define_process_flags())
  flags.mark_flags_as_required(['workdir'])
  return f


def _load_config(config, workdir: str):
  if config is not None:
    return config
  run_config = rundir.read_config(checkpoints.absolute(workdir))  # local or gs://
  if run_config is None:
    raise FileNotFoundError(f'--workdir={workdir} holds no training run (no {rundir.CONFIG_FILE}): give the '
                            f'workdir of a `vggjax train` run, or --config=NAME of the data with '
                            f'--checkpoint=WEIGHTS')
  return ml_collections.ConfigDict(run_config)


def main(argv, flag_holders) -> None:
  f = cli.start_command(argv, flag_holders, join=parallel.join_processes)
  workdir = f['workdir']
  config = _load_config(f['config'], workdir)
  data_cfg = config.data
  try:
    scales = [int(q) for q in f['scales']]
    aspects = [float(a) for a in f['aspect_buckets']]
  except ValueError as e:
    raise app.UsageError(f'--scales takes integers and --aspect_buckets numbers: {e}')
  if not aspects or min(aspects) < 1:
    raise app.UsageError(f'--aspect_buckets must be ratios >= 1, got {aspects}')
  unknown = [p for p in f['protocols'] if p not in PROTOCOLS]
  if unknown or not f['protocols']:
    raise app.UsageError(f'--protocols: unknown {unknown}; valid: {", ".join(PROTOCOLS)}')
  paths = f['checkpoint'] or [workdir]
  fallback = (int(data_cfg.scale_min), int(data_cfg.scale_max))
  eval_models = [load_model(p, scales=scales, multiscale=f['multiscale'], fallback_train_scale=fallback,
                            dtype=f['dtype']) for p in paths]
  if f['weights'] != 'trained':  # the same nets with their EMA parameters
    eval_models = [dataclasses.replace(m, variables=checkpoints.load_weights(p, weights=f['weights'])[0])
                   for m, p in zip(eval_models, paths)]
  source = pipeline.open_source(data_cfg, data_cfg.eval_split)
  logging.info('evaluating %s on %s (%d images): protocols %s, scales %s; %d devices over %d processes',
                    ', '.join(f'{m.label} ({m.checkpoint})' for m in eval_models), data_cfg.eval_split,
                    len(source), ','.join(f['protocols']), [list(m.scales) for m in eval_models],
                    jax.device_count(), jax.process_count())
  data = DataSettings.from_config(data_cfg)  # the run's data block; a field it lacks: configs/default.py's
  protocol_settings = ProtocolSettings(
      protocols=tuple(f['protocols']), batch_size=f['batch_size'], num_threads=f['num_threads'],
      aspect_buckets=tuple(aspects), flip=data.flip if f['flip'] is None else f['flip'],
      dct_scaling=data.jpeg_dct_scaling)
  result = ProtocolEvaluator(eval_models, source, protocol_settings).run()
  result['split'] = str(data_cfg.eval_split)
  result['dataset'] = data.name or data.source
  if jax.process_index() == 0:
    path = write_results(result, workdir)
    print(format_table(result))
    shapes = ', '.join(f'Q={q}: {c["dense"]}/{c["crop_net"]}' for q, c in result['compiled_shapes'].items())
    print(f'{result["num_images"]} of {result["split_size"]} images ({result["unreadable"]} unreadable), '
          f'flips {"on" if result["flip"] else "off"}; '
          f'compiled shapes (dense/crop network) {shapes}; compilation {result["compile_s"]:.1f} s of '
          f'{result["wall_s"]:.1f} s; results in {path}', flush=True)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
