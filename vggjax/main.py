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

DEMO_CONFIG = cli.config_file('demo')
cli.add_config_roots(sys.argv)

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', str(DEMO_CONFIG), 'A config file PATH[:ARG] (relative to the working directory, '
    'else an installed config: configs/vgg16.py:jitter or vgg16:jitter); the built-in demo if not given. '
    'Override fields with --config.FIELD=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run directory: config, metrics, checkpoints, plots.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'HOST:PORT of process 0 (multi-process runs).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process runs).')
_PROCESS_ID = flags.DEFINE_integer('process_id', -1, 'This process\'s index (multi-process runs).')
_NUM_CPU_DEVICES = flags.DEFINE_integer('num_cpu_devices', 0,
                                        'Virtual CPU devices for CPU runs (0: VGGJAX_NUM_CPU_DEVICES or 1).')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  cli.quiet_libraries()
  cli.set_cpu_devices(_NUM_CPU_DEVICES.value)
  from vggjax import checkpoints, config_lib, parallel, train  # after flags: nothing has touched a device yet

  config = _CONFIG.value
  try:
    config_lib.validate(config)  # before anything compiles
    config_lib.check_init_required(config)  # the :384 and :jitter configs continue another run
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e))
  parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX %s: process %d of %d, %d local / %d devices (%s)', jax.__version__, jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except train.NonFiniteError as e:
    logging.error('%s', e)
    sys.exit(3)
  if jax.process_index() == 0:
    m = result.metrics
    summary = (f'val top-1 {m["val_top1"]:.4f}, top-5 {m["val_top5"]:.4f}' if m else 'no evaluation')
    print(f'{"preempted" if result.preempted else "done"} at step {result.step} (epoch {result.epoch:.2f}): '
          f'{summary}; run directory {checkpoints.absolute(_WORKDIR.value)}', flush=True)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
