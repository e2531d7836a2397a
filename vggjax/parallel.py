"""Data parallelism over every device of every process (docs/design.md, decision 3).

One Mesh with a single 'data' axis over all devices, ordered by (process, device id), so that process p's
devices hold the p-th contiguous slice of the global batch: exactly the slice the input pipeline gives
process p. The batch is sharded on 'data', parameters are replicated, and jax.jit partitions the step: the
mean loss over the global batch gives the paper's synchronous averaged gradients (3.3) and the result
equals one device.

``jax.distributed.initialize`` runs only when the run spans several processes: explicit flags, or a detected
cluster (a Cloud TPU pod slice, SLURM with several tasks, Open MPI); never on a single host.
"""

from __future__ import annotations

import faulthandler
import glob
import logging
import os
import signal
import threading
import urllib.request
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vggjax import cli

DATA_AXIS = 'data'


def _env_int(name: str, default: int = 0) -> int:
  try:
    return int(os.environ.get(name, default))
  except ValueError:
    return default


def _cloud_tpu_vm_workers() -> int:
  """Workers of this Cloud TPU VM slice, from the GCE metadata server (0 elsewhere, without asking it)."""
  if not (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    return 0
  req = urllib.request.Request('http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
                               'worker-network-endpoints', headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(req, timeout=2) as r:
      return len([w for w in r.read().decode().split(',') if w])
  except OSError:
    return 0


def detect_cluster() -> str | None:
  """The multi-process environment this process runs in, if any: 'tpu_pod', 'slurm', 'mpi' or None.
  A TPU pod slice is seen from GKE's TPU_WORKER_HOSTNAMES, multislice's MEGASCALE_NUM_SLICES, or, on a
  Cloud TPU VM, the metadata server's worker list; jax.distributed.initialize() then fills in the rest."""
  hosts = [h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]
  if len(hosts) > 1 or _env_int('MEGASCALE_NUM_SLICES') > 1 or _cloud_tpu_vm_workers() > 1:
    return 'tpu_pod'
  if os.environ.get('SLURM_JOB_ID') and _env_int('SLURM_NTASKS') > 1 and 'SLURM_PROCID' in os.environ:
    return 'slurm'
  if _env_int('OMPI_COMM_WORLD_SIZE') > 1:
    return 'mpi'
  return None


_STARTED: list[bool] = []  # the result of the first `initialize` in this process


def initialize(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1) -> bool:
  """Joins the processes of a multi-process run; returns True if it did. Call before any device query. A
  second call (a command's start, then a library function's) returns the first call's result."""
  if not _STARTED:
    _STARTED.append(_initialize(coordinator_address, num_processes, process_id))
    if _STARTED[0]:
      dump_stacks_on_signal()
  return _STARTED[0]


def join_processes(values: Mapping[str, Any]) -> None:
  """A command's process flags (cli.define_process_flags) acted on, from cli.start_command(join=...) after
  its checks: this process joins the others (`initialize`: the flags, or a detected cluster's), and all but
  process 0 keep to warnings. A bad combination of the flags is the command's one-line error."""
  try:
    initialize(values['coordinator_address'], values['num_processes'], values['process_id'])
  except ValueError as e:
    raise cli.CommandError(str(e)) from None
  if jax.process_index() != 0:
    absl_logging.set_verbosity(absl_logging.WARNING)


def dump_stacks_on_signal(signum: int = signal.SIGUSR1) -> None:
  """`kill -USR1 PID` makes a process of a multi-process run print every thread's Python stack to stderr and
  go on: where a hung job's processes wait (a collective, a checkpoint's barrier, the data loader) without
  stopping it. The tests send it to every process of a run that outlives its time limit before killing them."""
  if threading.current_thread() is threading.main_thread():
    faulthandler.register(signum, all_threads=True, chain=False)


def _initialize(coordinator_address: str, num_processes: int, process_id: int) -> bool:
  if coordinator_address or num_processes > 1:
    if not (coordinator_address and num_processes > 1 and 0 <= process_id < num_processes):
      raise ValueError(
          'a multi-process run needs --coordinator_address=HOST:PORT, --num_processes=N (>1) and '
          f'--process_id in [0, N); got {coordinator_address!r}, {num_processes}, {process_id}')
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
    return True
  cluster = detect_cluster()
  if cluster:
    logging.info('detected a %s cluster: joining with jax.distributed.initialize()', cluster)
    jax.distributed.initialize()
    return True
  return False


def devices_in_order() -> list:
  return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh with axis 'data' (Auto axis type: jit partitions; no explicit sharding in types)."""
  devices = devices or devices_in_order()
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  n = mesh.devices.size
  if global_batch_size % n or global_batch_size % jax.process_count():
    raise ValueError(f'the global batch size {global_batch_size} must be a multiple of the number of '
                     f'devices ({n}) and of processes ({jax.process_count()})')


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded on 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def sum_over_processes(count: int) -> int:
  """The sum of an integer over all processes (each must call it at the same point); itself on one."""
  if jax.process_count() == 1:
    return int(count)
  return int(np.sum(multihost_utils.process_allgather(np.asarray(count, np.int64))))


def to_host(tree: Any) -> Any:
  """Fully replicated (or fully addressable) arrays to numpy on every process."""
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
