"""What every command-line entry point does first: config files made importable, the chatter of the
checkpointing and data libraries kept out of the console, and virtual CPU devices set up. Imports nothing
heavy: it runs before JAX is touched."""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import importlib.util
import logging as std_logging
import os
import pathlib
import re
import sys

from absl import app, flags, logging

from vggjax import __version__

REPO = pathlib.Path(__file__).resolve().parents[1]
# The shipped configs: the repository's top-level configs/ in a checkout (vggjax/configs links to it), a
# directory of the vggjax package in a wheel (never a top-level `configs` module, which would collide with
# users' own). Config files import their base as `from vggjax.configs import default`.
CONFIG_DIR = pathlib.Path(__file__).resolve().parent / 'configs'




# Exit statuses of every command (the plan's 3 and 4 and training's 3 are the commands' own):
EXIT_BAD_INPUT = 2  # a bad flag, a bad config field, stray arguments (absl's UsageError)
EXIT_UNREADABLE = 65  # an undecodable image; predict/features: some images skipped (sysexits' DATAERR)
EXIT_NO_INPUT = 66  # a missing file or folder, an empty data_dir, a workdir with no run (sysexits' NOINPUT)


class CommandError(ValueError):
  """Bad input to a command (a flag or config value): reported as one line on stderr, exit status 2."""


class ConfigNotFound(CommandError):
  """A --config names no file in the working directory and no installed config."""


class UnreadableInput(ValueError):
  """An input file that does not decode (transforms.DecodeError, an image): exit status EXIT_UNREADABLE."""


def installed_configs() -> list[str]:
  """The names of the shipped configs (demo, vgg11, ..., vgg19)."""
  return sorted(p.stem for p in CONFIG_DIR.glob('*.py') if not p.stem.startswith('_') and p.stem != 'common')


def config_file(name: str = 'demo') -> pathlib.Path:
  """The path of a shipped config file by its name."""
  return CONFIG_DIR / f'{name}.py'


def resolve_config(spec: str) -> str:
  """A --config value PATH[:ARG] as a file config_flags can load: PATH relative to the working directory (or
  absolute) first, then among the installed configs, where `configs/vgg16.py`, `vgg16.py` and `vgg16` all
  name the shipped vgg16 config. ARG (`:jitter`, `:384`) is kept."""
  path, sep, arg = spec.partition(':')
  if not path or os.path.isfile(path):  # a file only: a run directory named `demo` is not the demo config
    return spec
  name = path[len('configs/'):] if path.startswith(('configs/', 'configs' + os.sep)) else path
  name = name[:-3] if name.endswith('.py') else name
  if name and '/' not in name and os.sep not in name and config_file(name).is_file():
    return f'{config_file(name)}{sep}{arg}'
  raise ConfigNotFound(f'--config={spec}: {path} is neither a file (relative to {os.getcwd()}) nor an '
                       f'installed config ({", ".join(installed_configs())}; e.g. --config=vgg16:jitter)')


def resolve_config_args(argv: list[str]) -> None:
  """Rewrites --config=PATH[:ARG] (or --config PATH[:ARG]) in `argv`, in place, to a loadable file
  (resolve_config). A config that cannot be found exits with status 2 and a message naming what exists."""
  for i, arg in enumerate(argv):
    if i == 0:
      continue
    try:
      if arg.startswith('--config='):
        argv[i] = '--config=' + resolve_config(arg.split('=', 1)[1])
      elif arg == '--config' and i + 1 < len(argv):
        argv[i + 1] = resolve_config(argv[i + 1])
    except ConfigNotFound as e:
      fail(e)


def add_config_roots(argv) -> None:
  """Resolves --config (resolve_config_args), then puts the root of each config directory on sys.path, so
  that config files of one's own that import their base as `from configs import base` keep working."""
  if isinstance(argv, list):
    resolve_config_args(argv)
  roots = [REPO]
  for arg in argv:
    if arg.startswith('--config=') and (arg.endswith('.py') or '.py:' in arg):
      directory = pathlib.Path(arg.split('=', 1)[1].split(':', 1)[0]).resolve().parent
      if directory != CONFIG_DIR.resolve():  # the shipped configs import vggjax.configs (and their root
        roots.append(directory.parent)       # may be the vggjax package itself, never a sys.path entry)
  for root in roots:
    if (root / 'configs').is_dir() and str(root) not in sys.path:
      sys.path.insert(0, str(root))


class QuietLibraries:
  """An absl log filter dropping the INFO chatter of Orbax, Grain and etils (a line per checkpoint file)
  unless --verbosity >= 1."""

  def filter(self, record) -> bool:
    if record.levelno >= 30 or logging.get_verbosity() >= 1:
      return True
    path = record.pathname.replace('\\', '/')
    return '/orbax/' not in path and '/grain/' not in path and '/etils/' not in path


def quiet_libraries() -> None:
  """Adds the filter to absl's handler and to the root logger's (a notebook's logging set-up)."""
  for handler in [logging.get_absl_handler(), *std_logging.getLogger().handlers]:
    if not any(isinstance(f, QuietLibraries) for f in handler.filters):
      handler.addFilter(QuietLibraries())


def program() -> str:
  """The command's name for messages: 'vggjax train' (set by `main`), 'python -m vggjax.data.prepare' (a
  module of the package run with -m) or the script's file name."""
  name = sys.argv[0] if sys.argv else 'vggjax'
  if name.startswith('vggjax'):
    return name
  path = pathlib.Path(name).resolve()
  package = pathlib.Path(__file__).resolve().parent
  if path.suffix == '.py' and package in path.parents:
    return 'python -m ' + '.'.join(('vggjax', *path.relative_to(package).with_suffix('').parts))
  return os.path.basename(name)


def fail(message, status: int = EXIT_BAD_INPUT) -> None:
  """Exits with `status` (EXIT_BAD_INPUT) after one line on stderr naming the command and what was wrong
  (no traceback, no usage text: the line says what is allowed)."""
  line = ' '.join(str(message).split()) or type(message).__name__
  sys.stderr.write(f'{program()}: error: {line}\n')
  sys.stderr.flush()
  sys.exit(status)


def last_sentence(text: str) -> str:
  """The message of a traceback flattened into an error (ml_collections' config loading: `vgg16:999`):
  its last line without the exception's name, else `text` as it is."""
  if 'Traceback (most recent call last)' not in text:
    return text
  last = [line for line in text.strip().splitlines() if line.strip()][-1].strip()
  name, sep, rest = last.partition(': ')
  return rest if sep and name.replace('.', '').replace('_', '').isalnum() else last


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flags_parser for every command: an unknown flag, a bad value or a missing required flag is one
  line (absl's own prints two and exits 1)."""
  with flag_errors():
    return flags.FLAGS(argv)


@contextlib.contextmanager
def flag_errors():
  """Defining and parsing flags: a bad one (ml_collections checks --config.FIELD overrides already when
  the config flag is defined) is `fail`'s one line."""
  try:
    yield
  except flags.Error as e:
    fail(last_sentence(str(e)))
  except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD names no field of the config
    text = str(e.args[0] if e.args else e)
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':  # a KeyError's repr of its message
      text = text[1:-1].replace('\\n', ' ').replace("\\'", "'")
    fail(f'a --config.FIELD override names no field of the config: {text}')


def verbose() -> bool:
  """--verbosity >= 1: errors a user caused come with their traceback."""
  return logging.get_verbosity() >= 1


def one_line_errors(main):
  """`main` with the errors a user causes turned into `fail`'s one line: bad input (absl's UsageError,
  CommandError and so config_lib.ConfigError) exit 2; a missing file, folder, run or dataset
  (FileNotFoundError, NotADirectoryError, IsADirectoryError) EXIT_NO_INPUT; an unreadable image
  (UnreadableInput and so transforms.DecodeError) EXIT_UNREADABLE. The messages are written for a person already; with --verbosity=1
  the missing-input errors keep their traceback."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except (app.UsageError, CommandError) as e:
      fail(e)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
      if verbose():
        raise
      fail(missing_message(e), EXIT_NO_INPUT)
    except UnreadableInput as e:
      if verbose():
        raise
      fail(e, EXIT_UNREADABLE)
  return wrapped


def readable_images(files: list[str], read_header) -> tuple[list[str], list[str]]:
  """The image files whose header decodes (`read_header(encoded_bytes)` raises UnreadableInput where it does
  not: transforms.dimensions), and one line per file that does not (`PATH: not a readable image: ...`), each
  also written to stderr: predict and features go on with the rest and exit with EXIT_UNREADABLE
  (`skipped_images`)."""
  ok, skipped = [], []
  for f in files:
    try:
      with open(f, 'rb') as fh:
        read_header(fh.read())
      ok.append(f)
    except (UnreadableInput, OSError) as e:
      skipped.append(f'{f}: {e.strerror if isinstance(e, OSError) and e.strerror else e}')
  if skipped and not ok:
    fail(f'no readable image among {len(files)} file(s) ({skipped[0]}{", ..." if len(skipped) > 1 else ""})',
         EXIT_UNREADABLE)
  for line in skipped:
    sys.stderr.write(f'{program()}: skipped {line}\n')
  return ok, skipped


def skipped_images(skipped: list[str], done: str) -> None:
  """The last line of a command that skipped unreadable images, and its exit status (EXIT_UNREADABLE)."""
  if skipped:
    sys.stderr.write(f'{program()}: {done}; {len(skipped)} unreadable image(s) skipped (named above)\n')
    sys.stderr.flush()
    sys.exit(EXIT_UNREADABLE)


def missing_message(e: OSError) -> str:
  """An OSError's sentence: the library's own message, or for one raised by the OS the path and what it
  is not (`[Errno 2] No such file or directory: 'x'` -> `x: no such file or directory`)."""
  if e.filename is None:
    return str(e)
  what = {FileNotFoundError: 'no such file or directory', NotADirectoryError: 'not a directory',
          IsADirectoryError: 'a directory, not a file'}.get(type(e), e.strerror or type(e).__name__)
  return f'{os.fsdecode(e.filename)}: {what}'


def run_command(define_flags, main, *, argv: list[str] | None = None) -> None:
  """The entry point of every command: --config resolved (a path or an installed name) and config roots
  on sys.path, the flags `define_flags()` returns as {name: holder} parsed (one line and exit 2 for a bad
  one), then `main(argv, flag_holders=holders)`, whose bad input is one line and exit 2 as well."""
  argv = sys.argv if argv is None else argv
  add_config_roots(argv)
  with flag_errors():
    holders = define_flags()
  app.run(functools.partial(one_line_errors(main), flag_holders=holders), argv=argv, flags_parser=parse_flags)


def define_cpu_flag() -> dict:
  """--num_cpu_devices, of a command that runs on one process (`start_command` acts on it)."""
  return {'num_cpu_devices': flags.DEFINE_integer(
      'num_cpu_devices', 0, 'Virtual CPU devices for CPU runs (0: VGGJAX_NUM_CPU_DEVICES or 1).')}


def define_process_flags() -> dict:
  """The flags of a command that runs on every process of a multi-process job (and on virtual CPU devices);
  `start_command` acts on them."""
  return {
      'coordinator_address': flags.DEFINE_string('coordinator_address', '',
                                                 'HOST:PORT of process 0 (multi-process runs).'),
      'num_processes': flags.DEFINE_integer('num_processes', 0, 'Number of processes (multi-process runs).'),
      'process_id': flags.DEFINE_integer('process_id', -1, 'This process\'s index (multi-process runs).'),
      **define_cpu_flag(),
  }


def start_command(argv, flag_holders, *, max_args: int = 0, check=None, join=None) -> dict:
  """What a command's main does first: refuse stray arguments (more than `max_args` positional ones), quiet
  the libraries, set up virtual CPU devices (its --num_cpu_devices flag), run `check(values)` (the config's
  validation: before anything waits for other processes or compiles) and then `join(values)` where given:
  a command with the process flags (define_process_flags) passes parallel.join_processes, which joins the
  other processes (or a detected cluster's) and keeps all but process 0 to warnings (passed in: this module
  imports nothing of JAX). Returns the flags' values by name."""
  if len(argv) > 1 + max_args:
    raise app.UsageError(f'unexpected arguments: {argv[1 + max_args:]}')
  quiet_libraries()
  values = {k: v.value for k, v in flag_holders.items()}
  set_cpu_devices(values.get('num_cpu_devices', 0))
  if check is not None:
    check(values)
  if join is not None:
    join(values)
  return values


def set_cpu_devices(num_cpu_devices: int = 0) -> None:
  """Virtual CPU devices for CPU runs and tests: the flag's value, else VGGJAX_NUM_CPU_DEVICES (before any
  device is queried)."""
  n = num_cpu_devices or int(os.environ.get('VGGJAX_NUM_CPU_DEVICES', '0') or 0)
  if n:
    import jax
    jax.config.update('jax_num_cpu_devices', n)


# The `vggjax` command (and `python -m vggjax`): one command, a subcommand per module's command line.
COMMANDS = {
    'train': ('vggjax.main', 'train (or resume) a run: --workdir=DIR [--config=vgg16:jitter]'),
    'evaluate': ('vggjax.evaluate', 'the paper\'s evaluation protocols: --workdir=DIR [--checkpoint=...]'),
    'predict': ('vggjax.predict', 'top-5 classes of images: --checkpoint=DIR IMAGE...'),
    'features': ('vggjax.features', 'Appendix B descriptors: --checkpoint=DIR --out=FILE.npz IMAGE...'),
    'convert': ('vggjax.convert', 'import published weights: --from=torchvision|keras --src=FILE --out=DIR'),
    'export': ('vggjax.export_command', 'a StableHLO or ONNX artefact for serving: --checkpoint=DIR --out=FILE'),
    'prepare': ('vggjax.data.prepare', 'dataset statistics or array_record conversion: stats|convert'),
    'benchmark': ('vggjax.benchmark', 'time the train and eval steps on the available devices'),
    'plan': ('vggjax.plan', 'compile a config for a TPU slice without one: memory, FLOPs, estimated time'),
    'transfer': ('vggjax.transfer', 'Appendix B: fc7 descriptors, linear SVMs, mean class recall / mAP'),
    'localize': ('vggjax.localize', 'Appendix A: localisation error of a box regressor and a classifier'),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f'  {name.ljust(width)}  {text}' for name, (_, text) in COMMANDS.items()]
  return ('usage: vggjax COMMAND [flags]   (vggjax COMMAND --help for its flags)\n\ncommands:\n' +
          '\n'.join(lines) +
          f'\n\ninstalled configs (--config=NAME[:ARG]): {", ".join(installed_configs())}\n')


HELP_FLAGS = ('-h', '--help', '--helpshort', '-?')
GPU_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm6_plugin', 'jax_rocm7_plugin')


def google_pci_devices() -> int:
  """PCI devices of Google's vendor id (0x1ae0): the TPU chips of a TPU VM, as JAX's own test counts them
  (jax._src.hardware_utils), without importing JAX."""
  n = 0
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      with open(vendor) as f:
        n += f.read().strip() == '0x1ae0'
    except OSError:
      continue
  return n


def cpu_only_without_a_tpu() -> bool:
  """JAX_PLATFORMS=cpu where libtpu is installed (the `tpu` extra, for `vggjax plan`) but no TPU is
  attached and no GPU plugin either: JAX would otherwise try libtpu as a backend, which prints five lines
  about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES before falling back to the CPU. On a TPU VM (TPU chips
  on the PCI bus, /dev/accel*), with a GPU plugin, or with JAX_PLATFORMS or JAX_FORCE_TPU_INIT set, nothing
  changes. The plan loads libtpu as a compiler only, with the environment its slice needs
  (vggjax.aot.target.libtpu_environment). Returns whether it set JAX_PLATFORMS."""
  if os.environ.get('JAX_PLATFORMS') or 'JAX_FORCE_TPU_INIT' in os.environ:
    return False
  if importlib.util.find_spec('libtpu') is None or glob.glob('/dev/accel*'):
    return False
  def installed(name: str) -> bool:
    try:
      return importlib.util.find_spec(name) is not None
    except ImportError:  # a parent package that is not there
      return False
  if any(installed(f'jax_plugins.{m}') or installed(m) for m in GPU_PLUGINS):
    return False
  if google_pci_devices():
    return False
  os.environ['JAX_PLATFORMS'] = 'cpu'  # before JAX is imported: it reads JAX_PLATFORMS then
  return True


def version() -> str:
  return __version__


def describe(doc: str, module: str, command: str) -> str:
  """A module's docstring as a command's description: `python -m MODULE` written `vggjax COMMAND`, and
  the paragraphs for maintainers (those opening with "Why ", which say why the code is laid out as it is)
  left to the source."""
  paragraphs = (doc or '').strip().split('\n\n')
  kept = [p for p in paragraphs if not p.lstrip().startswith('Why ')]
  return '\n\n'.join(kept).replace(f'python -m {module} ', f'vggjax {command} ').rstrip() + '\n'


def relative_paths(text: str) -> str:
  """Help text without this installation's paths: a shipped config file as its --config name (`demo`),
  the repository's files relative to it."""
  for directory in {str(CONFIG_DIR), str(CONFIG_DIR.resolve())}:
    text = re.sub(re.escape(directory + os.sep) + r'(\w+)\.py', r'\1', text)
  return text.replace(str(REPO) + os.sep, '')


def command_help(command: str) -> str:
  """`vggjax COMMAND --help`: the command's description and its own flags (not absl's logging flags)."""
  name = COMMANDS[command][0]
  module = importlib.import_module(name)
  with flag_errors():
    module._define_flags()
  text = [f'usage: vggjax {command} [flags]{" " + ARGUMENTS[command] if command in ARGUMENTS else ""}\n\n',
          describe(module.__doc__, name, command), '\nflags:\n']
  by_module = flags.FLAGS.flags_by_module_dict()
  for owner in (name, __name__):  # the command's flags, then the shared ones it defined (processes, devices)
    if by_module.get(owner):
      text.append(flags.FLAGS.module_help(owner).strip('\n').split('\n', 1)[-1] + '\n')  # no `module:` line
  if command == 'train':
    text.append('\nThe fields of --config: `vggjax train --workdir=DIR --dry_run` prints them all (their\n'
                'defaults: configs/default.py).\n')
  text.append('--verbosity=1 shows the traceback of an error; --helpfull lists absl\'s flags too.\n')
  return relative_paths(''.join(text))


ARGUMENTS = {'predict': 'IMAGE_OR_FOLDER...', 'features': 'IMAGE_OR_FOLDER...', 'prepare': 'stats|convert'}


def main(argv: list[str] | None = None) -> None:
  """`vggjax train --workdir=DIR` is `python -m vggjax.main --workdir=DIR`, and so on for every command."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ('-h', '--help', 'help'):
    sys.stdout.write(usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  if argv[1] in ('--version', 'version'):
    sys.stdout.write(f'vggjax {version()}\n')
    sys.exit(0)
  command = argv[1]
  if command not in COMMANDS:
    sys.stderr.write(f'vggjax: unknown command {command!r}; one of {", ".join(COMMANDS)}\n\n{usage()}')
    sys.exit(2)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
  sys.argv = [f'vggjax {command}', *argv[2:]]
  if not any(a in HELP_FLAGS for a in argv[2:]):
    cpu_only_without_a_tpu()
  if any(a in HELP_FLAGS for a in argv[2:]):
    sys.stdout.write(command_help(command))
    sys.exit(0)
  add_config_roots(sys.argv)
  module = importlib.import_module(COMMANDS[command][0])
  if hasattr(module, 'run'):
    module.run()  # run_command: one skeleton
  else:
    module._define_flags()
    app.run(one_line_errors(module.main), flags_parser=parse_flags)
