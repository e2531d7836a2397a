"""A throwaway single-node SLURM cluster for tests: munged, slurmctld and slurmd on this machine.

launch/slurm.py writes a batch script for a real scheduler, and what matters (several processes of one job
joining through jax.distributed from SLURM's environment, SLURM's SIGTERM reaching the trainer through srun,
a requeued job resuming) only shows under one. Debian's `munge`, `slurmctld`, `slurmd` and `slurm-client`
packages are enough: this module writes a minimal slurm.conf (one node named after this host, 127.0.0.1,
free ports, no cgroups, no accounting, JobRequeue=1) and a munge key into a fresh temporary directory,
starts the three daemons in the foreground as children of this process, waits until the node is idle, and
at the end cancels every job and stops each daemon by its pid. Nothing outside that directory is written.

Clients (sbatch, srun, squeue, scontrol, scancel) find this cluster through SLURM_CONF: run them with
`cluster.env()`. The node daemon must be root (it starts job steps as the submitting user), as in CI.

    python tests/slurm_cluster.py   # starts one, runs `srun -n2 hostname`, prints how to use it, stops on ^C
"""

from __future__ import annotations

import getpass
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DAEMONS = ('munged', 'slurmctld', 'slurmd')
CLIENTS = ('sbatch', 'srun', 'squeue', 'scontrol', 'scancel', 'sinfo')
PACKAGES = 'munge slurmctld slurmd slurm-client'


def _which(name: str) -> str | None:
  # The daemons live in sbin, which a user's PATH may lack.
  return shutil.which(name) or shutil.which(name, path='/usr/sbin:/usr/local/sbin:/sbin')


def missing() -> list[str]:
  """The daemons and client commands this machine lacks (empty: a cluster can start)."""
  return [n for n in DAEMONS + CLIENTS if not _which(n)]


def unavailable() -> str:
  """Why no cluster can start here ('' if one can)."""
  absent = missing()
  if absent:
    return f'SLURM is not installed (no {", ".join(absent)}): apt-get install {PACKAGES}'
  if os.geteuid() != 0:
    return 'slurmd runs job steps as their user and must be root: run the SLURM tests as root (CI does)'
  return ''


def _free_port() -> int:
  """A free port below Linux's ephemeral range (32768-60999), so that no outgoing connection takes it before
  the daemon binds it. (jax.distributed's port under SLURM, 61440 + job id % 4096, lies above it.)"""
  for _ in range(200):
    port = random.randint(20000, 32000)
    with socket.socket() as s:
      try:
        s.bind(('0.0.0.0', port))
      except OSError:
        continue
      return port
  raise ClusterError('no free port in 20000-32000')


class ClusterError(RuntimeError):
  pass


class Cluster:
  """One node (`hostname`, CPUs=`cpus`) in one partition; start() brings it up, stop() tears it down."""

  def __init__(self, cpus: int = 2, root: str | None = None):
    self.cpus = cpus
    self.node = socket.gethostname().split('.')[0]
    # munged wants its socket's directory and every one above it searchable by all (a pytest tmp_path is
    # not), and its key readable by its owner only.
    self.root = root or tempfile.mkdtemp(prefix='vggjax-slurm-')
    os.chmod(self.root, 0o755)
    self.procs: dict[str, subprocess.Popen] = {}
    self.conf = os.path.join(self.root, 'slurm.conf')

  def path(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def env(self, base: dict | None = None) -> dict:
    """`base` (default os.environ) without any SLURM_* variables of an enclosing job, plus SLURM_CONF."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith('SLURM_')}
    env['SLURM_CONF'] = self.conf
    return env

  def _write_config(self) -> None:
    for d in ('state', 'spool', 'log', 'run'):
      os.makedirs(self.path(d), exist_ok=True)
    os.makedirs(self.path('munge'), mode=0o700, exist_ok=True)
    key = self.path('munge', 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    user = getpass.getuser()
    ctld_port, d_port = _free_port(), _free_port()
    lines = [
        'ClusterName=vggjaxtest',
        f'SlurmctldHost={self.node}(127.0.0.1)',
        f'SlurmUser={user}', f'SlurmdUser={user}',
        f'SlurmctldPort={ctld_port}', f'SlurmdPort={d_port}',
        'AuthType=auth/munge', 'CredType=cred/munge',
        # cred_expire also delays a requeued job's restart (120 s by default).
        f'AuthInfo=socket={self.path("run", "munge.sock")},cred_expire=10',
        f'StateSaveLocation={self.path("state")}', f'SlurmdSpoolDir={self.path("spool")}',
        f'SlurmctldPidFile={self.path("run", "slurmctld.pid")}',
        f'SlurmdPidFile={self.path("run", "slurmd.pid")}',
        f'SlurmctldLogFile={self.path("log", "slurmctld.log")}',
        f'SlurmdLogFile={self.path("log", "slurmd.log")}',
        f'PlugStackConfig={self.path("plugstack.conf")}',
        'ProctrackType=proctrack/linuxproc', 'TaskPlugin=task/none', 'MpiDefault=none',
        'SchedulerType=sched/backfill', 'SelectType=select/cons_tres', 'SelectTypeParameters=CR_Core',
        'AccountingStorageType=accounting_storage/none', 'JobCompType=jobcomp/none',
        'JobAcctGatherType=jobacct_gather/none',
        'JobRequeue=1', 'ReturnToService=2', 'MinJobAge=3600', 'KillWait=10',
        'SlurmctldTimeout=30', 'SlurmdTimeout=30', 'MessageTimeout=20',
        f'NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN',
        'PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP',
    ]
    with open(self.conf, 'w') as f:
      f.write('\n'.join(lines) + '\n')
    open(self.path('plugstack.conf'), 'w').close()

  def _spawn(self, name: str, *args: str) -> None:
    log = open(self.path('log', f'{name}.out'), 'wb')
    self.procs[name] = subprocess.Popen([_which(name), *args], stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=self.env())

  def logs(self, tail: int = 30) -> str:
    out = []
    for name in sorted(os.listdir(self.path('log'))):
      with open(self.path('log', name), errors='replace') as f:
        lines = f.read().splitlines()[-tail:]
      out.append(f'--- {name}\n' + '\n'.join(lines))
    return '\n'.join(out)

  def _wait(self, what: str, ready, timeout: float) -> None:
    t0 = time.time()
    while not ready():
      dead = [n for n, p in self.procs.items() if p.poll() is not None]
      if dead:
        raise ClusterError(f'{", ".join(dead)} exited while waiting for {what}\n{self.logs()}')
      if time.time() - t0 > timeout:
        raise ClusterError(f'no {what} after {timeout:.0f} s\n{self.logs()}')
      time.sleep(0.2)

  def start(self, timeout: float = 60) -> Cluster:
    why = unavailable()
    if why:
      raise ClusterError(why)
    try:
      socket.gethostbyname(self.node)
    except OSError as e:
      raise ClusterError(f'this host\'s name {self.node!r} does not resolve ({e}); jax.distributed reaches '
                         'process 0 by its node name') from None
    self._write_config()
    sock = self.path('run', 'munge.sock')
    try:
      self._spawn('munged', '--foreground', f'--socket={sock}',
                  f'--key-file={self.path("munge", "munge.key")}',
                  f'--pid-file={self.path("run", "munged.pid")}', f'--seed-file={self.path("munge", "seed")}',
                  f'--log-file={self.path("log", "munged.log")}')
      self._wait('munge socket', lambda: os.path.exists(sock), timeout)
      self._spawn('slurmctld', '-D', '-f', self.conf)
      self._spawn('slurmd', '-D', '-f', self.conf, '-N', self.node)
      self._wait('idle node', lambda: self.node_state() == 'idle', timeout)
    except BaseException:
      self.stop()
      raise
    return self

  def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> str:
    """A SLURM client command against this cluster; its stdout."""
    p = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
    if check and p.returncode:
      raise ClusterError(f'{" ".join(cmd)}: exit {p.returncode}: {p.stderr.strip()}')
    return p.stdout

  def node_state(self) -> str:
    try:
      return self.run('sinfo', '-h', '-n', self.node, '-o', '%T', check=False, timeout=10).strip()
    except subprocess.TimeoutExpired:
      return ''

  def job(self, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict: JobState, ExitCode, Restarts, ... ({} for an unknown job)."""
    out = self.run('scontrol', 'show', 'job', '-o', str(job_id), check=False)
    fields = {}
    for item in out.split():
      k, sep, v = item.partition('=')
      if sep:
        fields[k] = v
    return fields

  def wait_job(self, job_id: str, states=('COMPLETED',), timeout: float = 300, restarts: int = 0) -> dict:
    """Waits until the job is in a final state (after `restarts` requeues) and returns its fields; the
    state must be one of `states` (any final state if None)."""
    final = {'COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY', 'PREEMPTED',
             'BOOT_FAIL', 'DEADLINE'}
    t0 = time.time()
    while True:
      info = self.job(job_id)
      if info.get('JobState') in final and int(info.get('Restarts', 0)) >= restarts:
        break
      if time.time() - t0 > timeout:
        raise ClusterError(f'job {job_id} still {info.get("JobState")} after {timeout:.0f} s\n{self.logs()}')
      time.sleep(0.5)
    if states and info['JobState'] not in states:
      raise ClusterError(f'job {job_id} ended {info["JobState"]} (exit {info.get("ExitCode")}), '
                         f'not {"/".join(states)}')
    return info

  def stop(self) -> None:
    """Cancels every job, then stops each daemon this object started, by its pid (SIGTERM, then SIGKILL)."""
    if 'slurmctld' in self.procs and self.procs['slurmctld'].poll() is None:
      try:
        self.run('scancel', f'--user={getpass.getuser()}', check=False, timeout=20)
        t0 = time.time()
        while self.run('squeue', '-h', check=False, timeout=10).strip() and time.time() - t0 < 30:
          time.sleep(0.5)
      except (subprocess.TimeoutExpired, OSError):
        pass
    for name in ('slurmd', 'slurmctld', 'munged'):
      p = self.procs.pop(name, None)
      if p is None:
        continue
      if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
          p.wait(timeout=20)
        except subprocess.TimeoutExpired:
          p.kill()
          p.wait(timeout=20)
    shutil.rmtree(self.root, ignore_errors=True)

  def __enter__(self) -> Cluster:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


if __name__ == '__main__':
  with Cluster() as c:
    print(c.run('srun', '-n2', 'hostname'), end='')
    print(f'SLURM cluster up: export SLURM_CONF={c.conf}  (^C stops it)', file=sys.stderr)
    try:
      signal.pause()
    except KeyboardInterrupt:
      pass
