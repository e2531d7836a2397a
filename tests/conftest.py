"""Test set-up: 8 virtual CPU devices before any JAX operation, quiet TensorFlow, absl flags parsed."""

import os

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')

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


def subprocess_env(num_devices: int = 8, **extra) -> dict:
  """Environment for running the real CLI in a subprocess on `num_devices` CPU devices."""
  env = dict(os.environ)
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
