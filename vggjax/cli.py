"""What every command-line entry point does first: config files made importable, the chatter of the
checkpointing and data libraries kept out of the console, and virtual CPU devices set up. Imports nothing
heavy: it runs before JAX is touched."""

from __future__ import annotations

import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def add_config_roots(argv) -> None:
  """Config files import their base as `from configs import default`: put each one's root on sys.path."""
  roots = [REPO]
  for arg in argv:
    if arg.startswith('--config=') and (arg.endswith('.py') or '.py:' in arg):
      roots.append(pathlib.Path(arg.split('=', 1)[1].split(':', 1)[0]).resolve().parent.parent)
  for root in roots:
    if (root / 'configs').is_dir() and str(root) not in sys.path:
      sys.path.insert(0, str(root))


class QuietLibraries:
  """An absl log filter dropping the INFO chatter of Orbax, Grain and etils (a line per checkpoint file)
  unless --verbosity >= 1."""

  def filter(self, record) -> bool:
    from absl import logging
    if record.levelno >= 30 or logging.get_verbosity() >= 1:
      return True
    path = record.pathname.replace('\\', '/')
    return '/orbax/' not in path and '/grain/' not in path and '/etils/' not in path


def quiet_libraries() -> None:
  from absl import logging
  logging.get_absl_handler().addFilter(QuietLibraries())


def set_cpu_devices(num_cpu_devices: int = 0) -> None:
  """Virtual CPU devices for CPU runs and tests: the flag's value, else VGGJAX_NUM_CPU_DEVICES (before any
  device is queried)."""
  n = num_cpu_devices or int(os.environ.get('VGGJAX_NUM_CPU_DEVICES', '0') or 0)
  if n:
    import jax
    jax.config.update('jax_num_cpu_devices', n)
