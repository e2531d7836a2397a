"""The training command: on one CPU, a multi-GPU host, a Colab runtime or every worker of a TPU pod.

    python -m vggjax.main --workdir=DIR                              # the built-in demo (digits, CPU)
    python -m vggjax.main --config=configs/vgg16.py --workdir=DIR     # the paper's net D on ImageNet
    python -m vggjax.main --config=configs/vgg16.py:jitter --workdir=DIR --config.init_from=A_WORKDIR
    python -m vggjax.main --config=configs/vgg11.py --workdir=DIR --config.optimizer.lr=0.02

Running the same command again resumes from the last checkpoint in DIR (a finished run says where it
stands). ``--dry_run`` validates the config, prints every field and the dataset's sizes, and exits. Several
processes (a pod, SLURM, or --coordinator_address/--num_processes/--process_id) join with
jax.distributed.initialize before anything else touches the devices.
"""

from __future__ import annotations

import os
import sys

# Set up before JAX initialises a backend: quiet TensorFlow (if something imports it), a number of virtual
# CPU devices for CPU runs and tests (VGGJAX_NUM_CPU_DEVICES or --num_cpu_devices).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vggjax import checkpoints, cli, config_lib, parallel, rundir, train  # noqa: E402
from vggjax.data import pipeline  # noqa: E402

EXIT_NON_FINITE = 3  # train.nan_policy=stop ended the run (the last good checkpoint is kept)


def _define_flags() -> dict:
  f = {'config': config_flags.DEFINE_config_file(
      'config', str(cli.config_file('demo')), 'A config file PATH[:ARG] (relative to the working directory, '
      'else an installed config: configs/vgg16.py:jitter or vgg16:jitter); the built-in demo if not given. '
      'Override fields with --config.FIELD=VALUE.', lock_config=True)}
  f['workdir'] = flags.DEFINE_string('workdir', None,
                                     'The run directory: config, metrics, checkpoints, plots.')
  f['dry_run'] = flags.DEFINE_boolean('dry_run', False, 'Validate the config, print every field of it and '
                                      'the sizes of the dataset\'s splits, and exit (nothing is written).')
  f.update(cli.define_process_flags())
  flags.mark_flags_as_required(['workdir'])
  return f


def main(argv, flag_holders) -> None:
  def check(values):  # before anything compiles (a bad field: one line, exit 2)
    config_lib.validate(values['config'])
    config_lib.check_init_required(values['config'])  # the :384 and :jitter configs continue another run

  if flag_holders['dry_run'].value:
    local = {k: v for k, v in flag_holders.items() if k != 'coordinator_address'}  # joins no other process
    cli.start_command(argv, local, check=check)
    dry_run(flag_holders['config'].value, flag_holders['workdir'].value)
    return
  f = cli.start_command(argv, flag_holders, check=check, join=parallel.join_processes)  # joins the others
  config = f['config']
  logging.info('JAX %s: process %d of %d, %d local / %d devices (%s)', jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  try:
    result = train.train_and_evaluate(config, f['workdir'])
  except train.NonFiniteError as e:
    logging.error('%s', e)
    sys.exit(EXIT_NON_FINITE)
  if jax.process_index() == 0:
    m = result.metrics
    summary = (f'val top-1 {m["val_top1"]:.4f}, top-5 {m["val_top5"]:.4f}' if m else
               last_evaluation(f['workdir']))
    if result.skipped_images:
      summary += (f'; {result.skipped_images} unreadable training images skipped (each replaced by the next '
                  f'readable one; metrics.jsonl: skipped_images)')
    print(f'{"preempted" if result.preempted else "done"} at step {result.step} (epoch {result.epoch:.2f}): '
          f'{summary}; run directory {checkpoints.absolute(f["workdir"])}', flush=True)


def last_evaluation(workdir) -> str:
  """Where a run that evaluated nothing in this process stands (a second run of a finished training): its
  last evaluation in metrics.jsonl, `val top-1 0.9833, top-5 1.0000 (evaluated at step 345)`."""
  rows = [r for r in rundir.read_rows(workdir) if 'val_top1' in r]
  if not rows:
    return 'no evaluation'
  r = rows[-1]
  top5 = f', top-5 {r["val_top5"]:.4f}' if 'val_top5' in r else ''
  return f'val top-1 {r["val_top1"]:.4f}{top5} (evaluated at step {r["step"]})'


def dry_run(config, workdir) -> None:
  """`--dry_run`: the resolved config (every field, as config.json would record it), the sizes of the
  dataset's splits (opening them: a missing data_dir fails here), the schedule's steps; nothing written."""
  info = pipeline.dataset_info(config.data)
  t = config.train
  steps = rundir.total_steps(t.get('max_steps', 0), t.num_epochs,
                             rundir.steps_per_epoch(info.num_train, t.global_batch_size))
  print(config.to_json_best_effort(indent=2, sort_keys=True))
  d = config.data
  print(f'dataset {d.get("name") or d.source}: {info.num_train} training images ({d.train_split}), '
        f'{info.num_eval} validation images ({d.eval_split}), {info.num_classes} classes; {steps} steps of '
        f'{t.global_batch_size} images; workdir {workdir} (not written)', flush=True)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
