"""Test set-up: 8 virtual CPU devices before any JAX operation, quiet TensorFlow, absl flags parsed, and one
persistent compilation cache for the whole session (every pytest-xdist worker and every single-process
subprocess of the session share it: the suite compiles the same tiny nets' steps in many tests)."""

import os
import tempfile

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

# SESSION_CACHE: the session's persistent compilation cache. The first process to load this file (pytest, or
# pytest-xdist's controller before it starts its workers, which inherit the variable) creates a fresh
# directory, so every session starts cold (a CI run measures what a clean machine does) and its tests share
# what they compiled. A cached executable is the one the compiler produced for the same program, flags and
# devices (XLA_FLAGS are part of the key), so results are unchanged. Multi-process runs never use it
# (cli_util.MULTIPROCESS_CACHE). VGGJAX_TEST_JAX_CACHE=DIR keeps one across sessions (a warm local loop).
_CREATED_CACHE = 'VGGJAX_TEST_JAX_CACHE' not in os.environ
if _CREATED_CACHE:
  os.environ['VGGJAX_TEST_JAX_CACHE'] = tempfile.mkdtemp(prefix='vggjax-test-jax-cache-')
SESSION_CACHE = os.environ['VGGJAX_TEST_JAX_CACHE']
CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': SESSION_CACHE, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.2',
             'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')
jax.config.update('jax_compilation_cache_dir', SESSION_CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

import importlib  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain's worker processes read absl flags; mark them parsed as absl.app.run would.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


# CI (.ci/run sets VGGJAX_CI=1) installs every independent reference the tests compare against: torch,
# torchvision, safetensors, Keras, shellcheck. There a missing one fails the tests that need it; elsewhere
# they are skipped. No test swaps in a weaker reference.
IN_CI = os.environ.get('VGGJAX_CI', '') == '1'


def reference_module(name: str):
  """Imports an optional reference package: skips the test without it, except in CI, where it fails."""
  if IN_CI:
    return importlib.import_module(name)
  return pytest.importorskip(name, reason=f'{name} is not installed (CI installs it: .ci/run)')


def reference_tool(name: str) -> str:
  """The path of an optional command-line tool: skips without it, except in CI, where it fails."""
  path = shutil.which(name)
  if path is None:
    if IN_CI:
      pytest.fail(f'{name} is not installed, and CI must run this test (.ci/run installs it)')
    pytest.skip(f'{name} is not installed (CI installs it: .ci/run)')
  return path


def pytest_unconfigure(config):
  """The session's compilation cache goes with the session that made it (xdist's workers leave it)."""
  if _CREATED_CACHE and not hasattr(config, 'workerinput'):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


# XLA's CPU backend at optimisation level 0 without LLVM's expensive passes: for subprocesses that compile
# tiny nets and hardly run them (a chain of 3-step runs, a harness check), where compiling is their time
# (design decision 42). Appended to XLA_FLAGS, so a forced instruction set stays.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def fast_compile_env() -> dict:
  return {'XLA_FLAGS': f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()}


def subprocess_env(num_devices: int = 8, cache: bool = True, **extra) -> dict:
  """Environment for running the real CLI in a subprocess on `num_devices` CPU devices; with the session's
  compilation cache unless ``cache=False`` (a process of a multi-process run: cli_util.MULTIPROCESS_CACHE)."""
  env = {k: v for k, v in os.environ.items() if k not in CACHE_ENV}
  if cache:
    env.update(CACHE_ENV)
  env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
  env['VGGJAX_NUM_CPU_DEVICES'] = str(num_devices)
  env['JAX_PLATFORMS'] = 'cpu'
  env.update({k: str(v) for k, v in extra.items()})
  return env


@pytest.fixture(scope='session')
def real_photos() -> list[np.ndarray]:
  """Real RGB photographs (uint8, HxWx3) that ship with scikit-learn and scikit-image."""
  from sklearn.datasets import load_sample_images
  photos = list(load_sample_images().images)
  try:
    import skimage.data
    photos += [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
  except ImportError:
    pass
  return photos


def randomize_batch_norm(net) -> None:
  """Random, non-trivial inference statistics and affine parameters for a torch net's BatchNorm2d layers."""
  import torch
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Rescale the smaller side to `size` (Pillow bilinear) and take the central size x size crop."""
  from PIL import Image
  h, w = image.shape[:2]
  s = size / min(h, w)
  im = Image.fromarray(image).resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
  a = np.asarray(im)
  top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
  return a[top:top + size, left:left + size]


# pytest-xdist (README's test command: -n 2 --dist loadgroup). A module whose tests share module-scoped
# fixtures (a trained run, a SLURM cluster, a storage emulator) or start servers runs on one worker, as one
# work unit, so its fixtures are built once; the modules below hold independent tests (each builds what it
# needs), which are spread over the workers one by one: they are the suite's longest.
SPREAD = frozenset({'test_recipe', 'test_localize', 'test_paper_chain', 'test_train_step', 'test_cli',
                    'test_models', 'test_notebook', 'test_structure', 'test_data_transforms', 'test_boxes'})


# The longest modules first (their summed test times in a CI run, longest first), so that no long group
# starts last while the other worker idles; the rest keep their order.
LONGEST_FIRST = ('test_study', 'test_paper_chain', 'test_e2e_runs', 'test_cli', 'test_preemption', 'test_slurm',
                 'test_localize', 'test_convert', 'test_knobs', 'test_recipe', 'test_transfer', 'test_train_step',
                 'test_models', 'test_plan', 'test_export', 'test_tracker', 'test_notebook', 'test_gcs')


def pytest_collection_modifyitems(config, items):
  rank = {m: i for i, m in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.module.__name__.rpartition('.')[2] if item.module else '',
                                       len(rank)))


def work_unit(nodeid: str) -> str:
  """The work unit of a test under `--dist loadgroup`: its module, or the test itself in a SPREAD module;
  an xdist_group mark (NODEID@GROUP, where pytest still lets xdist rename a test) is its group."""
  if '@' in nodeid:
    return nodeid.rpartition('@')[2]
  path = nodeid.split('::', 1)[0]
  return nodeid if pathlib.PurePosixPath(path).stem in SPREAD else path


# The units are the scheduler's, not xdist_group marks: xdist 3.8 groups marked tests by appending @GROUP to
# their node ids, which pytest 9.2 no longer lets a plugin change, so the marks were silently ignored and
# every test was scheduled on its own (each worker built a module's fixtures again: the SLURM cluster and its
# 2-process job, the TPU compiles, the Keras nets).
def pytest_xdist_make_scheduler(config, log):
  if config.getvalue('dist') != 'loadgroup':
    return None
  from xdist.scheduler import LoadGroupScheduling

  class ModuleScheduling(LoadGroupScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return work_unit(nodeid)

  return ModuleScheduling(config, log)
