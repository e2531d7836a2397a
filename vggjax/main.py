"""The training command: on one CPU, a multi-GPU host, a Colab runtime or every worker of a TPU pod.

    python -m vggjax.main --workdir=DIR                              # the built-in demo (digits, CPU, ~1 min)
    python -m vggjax.main --config=configs/vgg16.py --workdir=DIR     # the paper's net D on ImageNet
    python -m vggjax.main --config=configs/vgg16.py:jitter --workdir=DIR --config.init_from=A_WORKDIR
    python -m vggjax.main --config=configs/vgg11.py --workdir=DIR --config.optimizer.lr=0.02

Running the same command again resumes from the last checkpoint in DIR. Several processes (a pod, SLURM, or
--coordinator_address/--num_processes/--process_id) join with jax.distributed.initialize before anything
else touches the devices.
"""

from __future__ import annotations

import os
import sys

# Set up before JAX initialises a backend: quiet TensorFlow (if something imports it), a number of virtual
# CPU devices for CPU runs and tests (VGGJAX_NUM_CPU_DEVICES or --num_cpu_devices).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

from vggjax import cli  # noqa: E402  (light: nothing of JAX yet)

EXIT_NON_FINITE = 3  # train.nan_policy=stop ended the run (the last good checkpoint is kept)


def _define_flags() -> dict:
  from absl import flags
  from ml_collections import config_flags
  f = {'config': config_flags.DEFINE_config_file(
      'config', str(cli.config_file('demo')), 'A config file PATH[:ARG] (relative to the working directory, '
      'else an installed config: configs/vgg16.py:jitter or vgg16:jitter); the built-in demo if not given. '
      'Override fields with --config.FIELD=VALUE.', lock_config=True)}
  f['workdir'] = flags.DEFINE_string('workdir', None,
                                     'The run directory: config, metrics, checkpoints, plots.')
  f.update(cli.define_process_flags())
  flags.mark_flags_as_required(['workdir'])
  return f


def main(argv, flag_holders) -> None:
  def check(values):  # before anything compiles (a bad field: one line, exit 2)
    from vggjax import config_lib
    config_lib.validate(values['config'])
    config_lib.check_init_required(values['config'])  # the :384 and :jitter configs continue another run

  f = cli.start_command(argv, flag_holders, check=check)  # then joins the other processes
  config = f['config']
  import jax
  from absl import logging
  from vggjax import checkpoints, train
  logging.info('JAX %s: process %d of %d, %d local / %d devices (%s)', jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  try:
    result = train.train_and_evaluate(config, f['workdir'])
  except train.NonFiniteError as e:
    logging.error('%s', e)
    sys.exit(EXIT_NON_FINITE)
  if jax.process_index() == 0:
    m = result.metrics
    summary = (f'val top-1 {m["val_top1"]:.4f}, top-5 {m["val_top5"]:.4f}' if m else 'no evaluation')
    if result.skipped_images:
      summary += (f'; {result.skipped_images} unreadable training images skipped (each replaced by the next '
                  f'readable one; metrics.jsonl: skipped_images)')
    print(f'{"preempted" if result.preempted else "done"} at step {result.step} (epoch {result.epoch:.2f}): '
          f'{summary}; run directory {checkpoints.absolute(f["workdir"])}', flush=True)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
