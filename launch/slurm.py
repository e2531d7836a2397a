#!/usr/bin/env python3
"""Writes (and submits) a SLURM batch script that trains vggjax on several nodes with several GPUs each.

    python launch/slurm.py --workdir=/shared/runs/vgg16 --config=configs/vgg16.py \\
        --nodes=4 --gpus-per-node=8 --partition=gpu --time=3-00:00:00 --cpus-per-task=64 \\
        --setup='source ~/venvs/vggjax/bin/activate' [--dry-run] -- --config.optimizer.lr=0.02

The script goes to WORKDIR/slurm.sbatch (--script), its output to WORKDIR/slurm-JOBID.out, and `sbatch`
submits it. --dry-run prints the script and the sbatch command and touches nothing. Submitting again (or
`sbatch WORKDIR/slurm.sbatch`) resumes from the last checkpoint.

Processes (--per): `node` (default) runs one process per node that drives all of its GPUs: one input pipeline
per node (Grain workers share the node's CPUs) and the fewest processes. The script then sets
JAX_LOCAL_DEVICE_IDS=0,...,G-1, because JAX's SLURM detection otherwise gives each task only the GPU numbered
by its SLURM_LOCALID. `gpu` runs one process per GPU (JAX's SLURM default); lower data.num_workers then, as
G processes per node each start that many workers. Either way srun starts `python -m vggjax.main` in every
task, and vggjax joins them with jax.distributed.initialize() from the SLURM variables (one process in all:
nothing to join). The workdir must be on a filesystem every node sees: every process writes its part of each
checkpoint; only process 0 writes logs and metrics.

Preemption and time limits: the script asks SLURM for SIGTERM --signal-seconds (default 120) before the time
limit; the trainer then finishes its step, writes a checkpoint and exits 0. With --requeue SLURM may requeue
the job after a preemption; the requeued job resumes.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: list[str]) -> argparse.Namespace:
  if '--' in argv:
    i = argv.index('--')
    argv, overrides = argv[:i], argv[i + 1:]
  else:
    overrides = []
  p = argparse.ArgumentParser(
      prog='slurm.py', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='Training overrides (--config.FIELD=VALUE ...) go after --.')
  p.add_argument('--workdir', required=True, help='the run directory, on a filesystem every node sees')
  p.add_argument('--config', default='', help='config file[:arg] (default: vggjax.main\'s, the demo)')
  p.add_argument('--nodes', type=int, default=1, help='number of nodes (default 1)')
  p.add_argument('--gpus-per-node', type=int, default=8, help='GPUs per node (default 8; 0: CPU nodes)')
  p.add_argument('--per', choices=('node', 'gpu'), default='node',
                 help='one process per node with all its GPUs (default), or one process per GPU')
  p.add_argument('--processes-per-node', type=int, default=0,
                 help='CPU nodes (--gpus-per-node=0) only: processes per node (default 1)')
  p.add_argument('--cpu-devices-per-node', type=int, default=0,
                 help='CPU nodes only: virtual CPU devices per node, an equal share for each process '
                      '(VGGJAX_NUM_CPU_DEVICES; default: the environment\'s, else one per process)')
  p.add_argument('--job-name', default='', help='default: vggjax-BASENAME(WORKDIR)')
  p.add_argument('--partition', default='')
  p.add_argument('--account', default='')
  p.add_argument('--qos', default='')
  p.add_argument('--time', default='', help='time limit, e.g. 3-00:00:00 (default: the partition\'s)')
  p.add_argument('--cpus-per-task', type=int, default=0,
                 help='CPUs per process for the input pipeline (default: SLURM\'s)')
  p.add_argument('--mem', default='', help='memory per node, e.g. 0 (all) or 400G')
  p.add_argument('--exclusive', action='store_true', help='whole nodes')
  p.add_argument('--requeue', action='store_true', help='let SLURM requeue the job after a preemption')
  p.add_argument('--signal-seconds', type=int, default=120,
                 help='SIGTERM this many seconds before the time limit (0: none)')
  p.add_argument('--sbatch-arg', action='append', default=[], metavar='ARG',
                 help='any other #SBATCH option, e.g. --sbatch-arg=--constraint=a100 (repeatable)')
  p.add_argument('--setup', action='append', default=[], metavar='LINE',
                 help='a shell line run before training, e.g. "module load cuda/12" or '
                      '"source VENV/bin/activate" (repeatable)')
  p.add_argument('--env', action='append', default=[], metavar='KEY=VALUE', help='exported (repeatable)')
  p.add_argument('--python', default='python', help='the Python of the nodes (default: python on PATH)')
  p.add_argument('--repo-dir', default=REPO,
                 help='the vggjax checkout on the nodes (default: this one); shell variables such as '
                      '$SLURM_SUBMIT_DIR are expanded')
  p.add_argument('--script', default='', help='where to write the script (default WORKDIR/slurm.sbatch)')
  p.add_argument('--no-submit', action='store_true', help='write the script, do not submit it')
  p.add_argument('--dry-run', action='store_true',
                 help='print the script and the sbatch command; write nothing')
  args = p.parse_args(argv)
  args.overrides = overrides
  errors = []
  if args.nodes < 1:
    errors.append(f'--nodes must be >= 1, not {args.nodes}')
  if args.gpus_per_node < 0:
    errors.append(f'--gpus-per-node must be >= 0, not {args.gpus_per_node}')
  if args.per == 'gpu' and args.gpus_per_node < 1:
    errors.append('--per=gpu needs --gpus-per-node >= 1')
  if args.processes_per_node < 0 or args.cpu_devices_per_node < 0:
    errors.append('--processes-per-node and --cpu-devices-per-node must be >= 0, not '
                  f'{args.processes_per_node} and {args.cpu_devices_per_node}')
  elif args.gpus_per_node and (args.processes_per_node or args.cpu_devices_per_node):
    errors.append('--processes-per-node and --cpu-devices-per-node are for CPU nodes (--gpus-per-node=0); '
                  'on GPU nodes --per=node|gpu chooses the processes')
  elif args.cpu_devices_per_node % (args.processes_per_node or 1):
    errors.append(f'--cpu-devices-per-node={args.cpu_devices_per_node} must be a multiple of '
                  f'--processes-per-node={args.processes_per_node}')
  for o in overrides:
    if not o.startswith('--'):
      errors.append(f'training overrides look like --config.FIELD=VALUE, not {o!r}')
  for e in args.env:
    if not re.match(r'^[A-Za-z_][A-Za-z0-9_]*=', e):
      errors.append(f'--env takes KEY=VALUE, not {e!r}')
  if errors:
    p.error('; '.join(errors))
  if not args.workdir.startswith('gs://'):
    args.workdir = os.path.abspath(args.workdir)
  args.job_name = args.job_name or 'vggjax-' + os.path.basename(args.workdir.rstrip('/'))
  args.script = args.script or os.path.join(args.workdir, 'slurm.sbatch')
  return args


def _dq(s: str) -> str:
  """Double-quotes `s` for bash, leaving $VARIABLES to expand."""
  return '"' + re.sub(r'(["\\`])', r'\\\1', s) + '"'


def train_command(args: argparse.Namespace) -> list[str]:
  cmd = [args.python, '-m', 'vggjax.main']
  if args.config:
    cmd.append(f'--config={args.config}')
  return cmd + [f'--workdir={args.workdir}', *args.overrides]


# A port the kernel has free on this node (bound, then released for the coordinator to bind).
FREE_PORT = 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'


def render(args: argparse.Namespace, invocation: str) -> str:
  """The batch script."""
  g = args.gpus_per_node
  tasks_per_node = g if args.per == 'gpu' else 1 if g else args.processes_per_node or 1
  procs = args.nodes * tasks_per_node
  what = (f'{args.nodes} node(s) x {g} GPU(s), ' if g else f'{args.nodes} CPU node(s), ')
  what += ('one process per GPU' if args.per == 'gpu' else 'one process per node' if tasks_per_node == 1
           else f'{tasks_per_node} processes per node')
  lines = [
      '#!/bin/bash',
      f'# vggjax training under SLURM: {what} ({procs} process{"es" if procs > 1 else ""} in all).',
      f'# Written by: {invocation}',
      '# Submit with `sbatch THIS_FILE`; submitting it again resumes from the last checkpoint.',
      f'#SBATCH --job-name={args.job_name}',
      f'#SBATCH --nodes={args.nodes}',
      f'#SBATCH --ntasks-per-node={tasks_per_node}',
  ]
  if g:
    lines.append(f'#SBATCH --gres=gpu:{g}')
  if args.cpus_per_task:
    lines.append(f'#SBATCH --cpus-per-task={args.cpus_per_task}')
  if args.mem:
    lines.append(f'#SBATCH --mem={args.mem}')
  for opt in ('partition', 'account', 'qos', 'time'):
    if getattr(args, opt):
      lines.append(f'#SBATCH --{opt}={getattr(args, opt)}')
  if args.exclusive:
    lines.append('#SBATCH --exclusive')
  lines += [f'#SBATCH --output={os.path.join(args.workdir, "slurm-%j.out")}', '#SBATCH --open-mode=append']
  if args.signal_seconds:
    lines.append(f'#SBATCH --signal=TERM@{args.signal_seconds}')
  if args.requeue:
    lines.append('#SBATCH --requeue')
  lines += [f'#SBATCH {a}' for a in args.sbatch_arg]
  lines += ['', 'set -euo pipefail', f'cd {_dq(args.repo_dir)}']
  lines += args.setup
  for e in args.env:
    k, v = e.split('=', 1)
    lines.append(f'export {k}={shlex.quote(v)}')
  if args.per == 'node' and g:
    lines += ['# One process drives all GPUs of its node (JAX would give each SLURM task one GPU).',
              f'export JAX_LOCAL_DEVICE_IDS={",".join(str(i) for i in range(g))}']
  if args.cpu_devices_per_node:
    lines += [f'# Each process runs on its share of the node\'s {args.cpu_devices_per_node} CPU devices.',
              f'export VGGJAX_NUM_CPU_DEVICES={args.cpu_devices_per_node // tasks_per_node}']
  if procs > 1:
    lines += ['# The coordinator\'s port (jax.distributed): one free now on this node, the job\'s first, where',
              '# process 0 runs. JAX\'s SLURM default, 61440 + job id % 4096, is the same for every step of a job',
              '# and for jobs whose ids differ by 4096: two runs on one node with one port join each other\'s',
              '# processes. A JAX_COORDINATOR_PORT set before submitting is kept.',
              'export JAX_COORDINATOR_PORT="${JAX_COORDINATOR_PORT:-$(' + shlex.quote(args.python) + ' -c ' +
              shlex.quote(FREE_PORT) + ')}"']
  lines += ['echo "job ${SLURM_JOB_ID:-}${SLURM_RESTART_COUNT:+ (restart $SLURM_RESTART_COUNT)}: '
            '${SLURM_NNODES:-} node(s) (${SLURM_JOB_NODELIST:-}), $(date)"',
            'srun --kill-on-bad-exit=1 ' + shlex.join(train_command(args))]
  return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  invocation = shlex.join(['python', 'launch/slurm.py', *(a for a in argv if a != '--dry-run')])
  script = render(args, invocation)
  submit = ['sbatch', '--parsable', args.script]
  if args.dry_run:
    sys.stdout.write(script)
    print(shlex.join(['mkdir', '-p', args.workdir]))
    if not args.no_submit:
      print(shlex.join(submit))
    return 0
  os.makedirs(os.path.dirname(os.path.abspath(args.script)), exist_ok=True)
  with open(args.script, 'w') as f:
    f.write(script)
  print(f'wrote {args.script}', file=sys.stderr)
  if args.no_submit:
    return 0
  os.makedirs(args.workdir, exist_ok=True)  # SLURM cannot create the output file's directory
  try:
    out = subprocess.run(submit, check=True, capture_output=True, text=True).stdout.strip()
  except FileNotFoundError:
    print('slurm.py: error: sbatch is not on PATH (run this on a SLURM login node)', file=sys.stderr)
    return 1
  except subprocess.CalledProcessError as e:
    print(f'slurm.py: error: sbatch failed ({e.returncode}): {e.stderr.strip()}', file=sys.stderr)
    return 1
  job = out.split(';')[0]
  print(f'submitted job {job}: output in {os.path.join(args.workdir, f"slurm-{job}.out")}', file=sys.stderr)
  print(job)
  return 0


if __name__ == '__main__':
  sys.exit(main())
