"""launch/paper.py, the paper's whole training chain as one plan: the dry run; the --tiny chain end to end."""

import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, fast_compile_env, subprocess_env

PAPER = str(REPO / 'launch' / 'paper.py')
TRAIN_STEPS = ['A256', 'B256', 'C256', 'D256', 'E256', 'C384', 'D384', 'E384',
               'Cjitter', 'Djitter', 'Ejitter']


def _paper(*args, **kw):
  return subprocess.run([sys.executable, PAPER, *args], capture_output=True, text=True,
                        env=subprocess_env(1, **fast_compile_env()), cwd=kw.pop('cwd', None), timeout=kw.pop('timeout', 600))


def test_dry_run_prints_the_whole_chain_in_order(tmp_path):
  out = _paper('--root', str(tmp_path / 'p'), '--dry-run', '--python=python', '--set', 'data.data_dir=/data')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 14 and not (tmp_path / 'p').exists()  # a dry run writes nothing
  root = str(tmp_path / 'p')
  want = {
      'A256': ('configs/vgg11.py:256', None), 'B256': ('configs/vgg13.py:256', 'A256'),
      'E256': ('configs/vgg19.py:256', 'A256'), 'C384': ('configs/vgg16_c.py:384', 'C256'),
      'D384': ('configs/vgg16.py:384', 'D256'), 'Djitter': ('configs/vgg16.py:jitter', 'D384'),
      'Ejitter': ('configs/vgg19.py:jitter', 'E384')}
  for line, name in zip(lines, TRAIN_STEPS):
    assert line.startswith('python -m vggjax.main ') and f'--workdir={root}/{name} ' in line
    assert '--config.data.data_dir=/data' in line
    if name in want:
      config, parent = want[name]
      assert f'--config={config} ' in line
      assert (f'--config.init_from={root}/{parent}' in line) == bool(parent)
      assert ('init_from' in line) == bool(parent)
  table3, table4, table5 = lines[11:]
  assert table3.count('--checkpoint=') == 11 and '--protocols=dense' in table3
  assert '--multiscale' not in table3
  assert table4.count('--checkpoint=') == 10 and '--multiscale' in table4
  assert (f'--checkpoint={root}/Djitter --checkpoint={root}/Ejitter' in table5 and
          '--protocols=dense,multicrop,dense+multicrop --multiscale' in table5)
  # SLURM: every step a job, each depending on its parents' jobs.
  out = _paper('--root', root, '--dry-run', '--launcher=slurm', '--python=python', '--', '--nodes=2')
  lines = out.stdout.strip().splitlines()
  assert lines[0].startswith('JOB_A256=$(python ') and 'dependency' not in lines[0]
  assert '--sbatch-arg=--dependency=afterok:${JOB_D256} ' in lines[6]
  assert '--dependency=afterok:${JOB_Djitter}:${JOB_Ejitter} ' in lines[13]


@pytest.mark.slow
def test_tiny_chain_runs_a_net_through_every_scale_and_resumes(tmp_path):
  """One net through the chain's every kind of step (A at 256 from scratch, D at 256 from A's seven layers,
  D at 384 and jittered from the step before, every layer), run by --only as a user runs part of a plan. The whole plan's order and commands are the dry run's test above;
  the study's toy chain (tests/test_study.py) runs every net and every evaluation."""
  root = tmp_path / 'chain'
  only = ['--only', 'A256', 'D256', 'D384', 'Djitter']
  out = _paper('--root', str(root), '--tiny', *only, timeout=900)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-4000:]
  for name in ('A256', 'D256', 'D384', 'Djitter'):
    rows = [json.loads(x) for x in (root / name / 'metrics.jsonl').read_text().splitlines()]
    assert max(r['step'] for r in rows) == 8 and any('val_top1' in r for r in rows), name
  # The S=384 and jitter runs copied every layer of their parent; D at 256 the paper's seven of A.
  assert f'warm start from {root}/A256 (vgg11): copied 7 layers' in log
  assert f'warm start from {root}/D256 (vgg16): copied 16 layers' in log
  assert f'warm start from {root}/D384 (vgg16): copied 16 layers' in log
  assert 'starts from scratch' not in log
  # A step whose parents are not in the plan's run fails in one line; a half-done part resumes.
  out = _paper('--root', str(root), '--tiny', '--only', 'Ejitter')
  assert out.returncode == 1 and 'its parents E384 are not complete' in out.stderr
  shutil.rmtree(root / 'Djitter')
  out = _paper('--root', str(root), '--tiny', *only)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stderr.count('complete, skipped') == 3 and '[4/4] Djitter: ' in out.stderr
