"""Test set-up: 8 virtual CPU devices before any JAX operation, quiet TensorFlow, absl flags parsed."""

import os

os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_platforms', 'cpu')

import pathlib  # noqa: E402
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
