"""launch/slurm.py under a real SLURM scheduler (tests/slurm_cluster.py: munged, slurmctld, slurmd on this
machine): the generated batch script, submitted with sbatch, runs 2 vggjax processes of one job on one CPU
node, each on its half of 8 virtual CPU devices, joined by jax.distributed from SLURM's environment.

What they prove: the 2 processes train the demo to the parameters of 1 process on 8 devices (the
checkpoint, written by both, restores in one process); SLURM's SIGTERM reaches both trainers through srun,
the job checkpoints, exits 0 and ends COMPLETED; `scontrol requeue` runs it again, and the requeued job
resumes and ends with the parameters of an uninterrupted job, bit for bit; the job's output file holds one
log stream (process 0's). Skipped only where the SLURM and munge packages are absent (CI installs them).
"""

import os
import re
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import cli_util
import slurm_cluster
from conftest import REPO

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(bool(slurm_cluster.missing()),
                                 reason=f'SLURM is not installed (apt-get install {slurm_cluster.PACKAGES})')]

STEPS = 24
TRAIN = [*cli_util.TINY, f'--config.train.max_steps={STEPS}']


@pytest.fixture(scope='module')
def cluster():
  with slurm_cluster.Cluster(cpus=2) as c:
    yield c


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('jax_cache'))


def submit(cluster, cache, workdir, *extra) -> str:
  """launch/slurm.py as a user runs it: 2 processes on the CPU node, 4 virtual CPU devices each."""
  env = cluster.env(cli_util.cli_env(cache))
  p = subprocess.run([sys.executable, str(REPO / 'launch' / 'slurm.py'), f'--workdir={workdir}',
                      '--gpus-per-node=0', '--processes-per-node=2', '--cpu-devices-per-node=8',
                      f'--python={sys.executable}', *extra, '--', *TRAIN],
                     env=env, capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  return p.stdout.strip()


def output(workdir, job: str) -> str:
  return (workdir / f'slurm-{job}.out').read_text()


def assert_one_log_stream(out: str, processes: int = 2) -> None:
  """Process 0 logs; the others only warn: one start-up line, one summary, each logged step once."""
  assert out.count(f'process 0 of {processes}') == 1 and 'process 1 of' not in out, out[-3000:]
  assert len(re.findall(rf'over {processes} processes, \d+ steps/epoch', out)) == 1


@pytest.fixture(scope='module')
def two_process_job(cluster, cache, tmp_path_factory):
  """One uninterrupted job of 2 processes."""
  workdir = tmp_path_factory.mktemp('two_processes')
  job = submit(cluster, cache, workdir)
  info = cluster.wait_job(job, timeout=600)
  return workdir, job, info


def test_two_processes_of_one_job_equal_one_process(two_process_job, cache, tmp_path):
  workdir, job, info = two_process_job
  out = output(workdir, job)
  assert info['ExitCode'] == '0:0', out[-3000:]
  assert_one_log_stream(out)
  assert out.count(f'done at step {STEPS}') == 1
  # Both processes wrote their part of the checkpoint, and one process restores it.
  ckpt = workdir / 'checkpoints' / str(STEPS) / 'data'
  assert sorted(p for p in os.listdir(ckpt) if p.startswith('process')) == ['process_0-of-2.json',
                                                                            'process_1-of-2.json']
  variables, meta = cli_util.final_params(workdir)
  assert meta['step'] == STEPS
  # One process on 8 devices, outside SLURM: the same parameters up to float summation order.
  cli_util.run(tmp_path, *TRAIN, env=_no_slurm(cache))
  ref, _ = cli_util.final_params(tmp_path)
  diffs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                                           variables, ref))
  assert max(diffs) <= 1e-5, max(diffs)


def _no_slurm(cache) -> dict:
  return {k: v for k, v in cli_util.cli_env(cache).items() if not k.startswith('SLURM_')}


def test_sigterm_through_srun_checkpoints_and_the_requeued_job_resumes(cluster, cache, two_process_job, tmp_path):
  ref_dir, _, _ = two_process_job
  job = submit(cluster, cache, tmp_path)
  # Once both processes train (process 0 logs every 2 steps), SIGTERM every task of the job's steps: what
  # SLURM sends --signal-seconds before the time limit, or at a preemption.
  t0 = checked = time.time()
  while cli_util.last_step(tmp_path) < 4:
    if time.time() - checked > 1:
      state, checked = cluster.job(job).get('JobState'), time.time()
      assert state in ('PENDING', 'CONFIGURING', 'RUNNING'), f'job {job} {state}: {output(tmp_path, job)[-3000:]}'
      assert time.time() - t0 < 600, 'the job did not reach step 4'
    time.sleep(0.05)
  cluster.run('scancel', '--signal=TERM', job)
  info = cluster.wait_job(job)
  out = output(tmp_path, job)
  assert info['ExitCode'] == '0:0', out[-3000:]
  stopped = cli_util.final_params(tmp_path)[1]['step']
  assert 4 <= stopped < STEPS and f'preempted at step {stopped}' in out, out[-3000:]
  # Requeued (as after a preemption), the same job id runs again, appends to its output and resumes.
  cluster.run('scontrol', 'requeue', job)
  info = cluster.wait_job(job, restarts=1)
  out = output(tmp_path, job)
  assert info['ExitCode'] == '0:0' and f'job {job} (restart 1)' in out, out[-3000:]
  resumed = out[out.index(f'job {job} (restart 1)'):]
  assert f'at step {stopped}' in resumed and f'done at step {STEPS}' in resumed, resumed[-3000:]
  assert_one_log_stream(resumed)
  variables, meta = cli_util.final_params(tmp_path)
  assert meta['step'] == STEPS
  cli_util.assert_identical(variables, cli_util.final_params(ref_dir)[0])
