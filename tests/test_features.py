"""vggjax.features (the paper's Appendix B): fc7 averaged over the map and with the flipped image, per scale,
averaged or stacked over scales, L2-normalised; the CLI over a folder of images."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import subprocess_env
from vggjax import checkpoints, features, models
from vggjax.preprocessing import Normalization

FC = 32  # fc6/fc7 width of the narrow test network


def random_variables(model, seed=0):
  """Random He-scaled weights and small random biases for ``model``, drawn with numpy (model.init would
  compile the whole network's initialisers: seconds on CPU)."""
  rng = np.random.RandomState(seed)

  def draw(shape):
    if len(shape) == 4:  # a kernel (kh, kw, in, out)
      return (rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    return (rng.randn(*shape) * 0.1).astype(np.float32)

  return jax.tree_util.tree_map(lambda s: draw(s.shape), models.variable_shapes(model))


@pytest.fixture(scope='module')
def weights_dir(tmp_path_factory):
  """A narrow VGG-A at a 64x64 training size with random weights, torchvision's normalisation."""
  directory = tmp_path_factory.mktemp('narrow')
  model = models.get_model('vgg11', width=1 / 16, fc_features=FC, num_classes=10, image_size=64)
  variables = random_variables(model)
  norm = Normalization(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=1 / 255)
  meta = {'model': {'name': 'vgg11', 'num_classes': 10, 'image_size': 64, 'width': 1 / 16, 'fc_features': FC},
          'normalization': norm.to_dict(), 'source': 'test', 'labels': None}
  checkpoints.save_weights(directory, variables, meta)
  return directory


@pytest.fixture(scope='module')
def photos(real_photos):
  """Two real photos, shrunk (smaller side 100) to keep the test fast."""
  out = []
  for p in real_photos[:2]:
    h, w = p.shape[:2]
    out.append(np.asarray(Image.fromarray(p).resize((round(w * 100 / min(h, w)), round(h * 100 / min(h, w))),
                                                     Image.BILINEAR)))
  return out


def rescale(image, q):
  """Smaller side to q with Pillow bilinear, the longer side truncated (torchvision's Resize(q))."""
  h, w = image.shape[:2]
  size = (int(q * w / h), q) if h <= w else (q, int(q * h / w))
  return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


def test_descriptor_follows_appendix_b(weights_dir, photos):
  variables, meta = checkpoints.load_weights(weights_dir)
  model = checkpoints.model_from_meta(meta)
  norm = checkpoints.normalization_from_meta(meta)
  fc7 = jax.jit(lambda v, x: model.apply(v, x, method='fc7_map'))

  def per_scale(image, q):  # fc7 map averaged over space, then with the flipped image's
    x = rescale(image, q)[None].astype(np.float32) * norm.scale
    x = (x - np.float32(norm.mean)) / np.float32(norm.std)
    pooled = np.asarray(fc7(variables, x)).mean((1, 2))
    pooled_flipped = np.asarray(fc7(variables, x[:, :, ::-1])).mean((1, 2))
    return (pooled + pooled_flipped)[0] / 2

  scales = (64, 96)
  want = np.stack([np.mean([per_scale(p, q) for q in scales], axis=0) for p in photos])
  want /= np.linalg.norm(want, axis=1, keepdims=True)
  got = features.extract(variables, meta, photos, scales)
  assert got.shape == (2, FC) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Stacked: per-scale descriptors side by side, normalised together; their sum is the average's direction.
  stacked = features.extract(variables, meta, photos, scales, combine='stack')
  assert stacked.shape == (2, 2 * FC)
  np.testing.assert_allclose(np.linalg.norm(stacked, axis=1), 1.0, atol=1e-6)
  summed = stacked[:, :FC] + stacked[:, FC:]
  np.testing.assert_allclose(summed / np.linalg.norm(summed, axis=1, keepdims=True), got, atol=1e-5)
  block = np.stack([per_scale(p, 96) for p in photos])
  np.testing.assert_allclose(stacked[:, FC:] / np.linalg.norm(stacked[:, FC:], axis=1, keepdims=True),
                             block / np.linalg.norm(block, axis=1, keepdims=True), atol=1e-5)


def test_shape_norm_and_flip_invariance(weights_dir, photos):
  variables, meta = checkpoints.load_weights(weights_dir)
  images = [photos[0], photos[0][:, ::-1], photos[1]]
  feats = features.extract(variables, meta, images, scales=(64, 96, 128), batch_size=2)
  assert feats.shape == (3, FC)
  np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-6)
  np.testing.assert_allclose(feats[0], feats[1], atol=1e-5)  # an image and its mirror image
  assert np.abs(feats[0] - feats[2]).max() > 1e-3  # two different photos
  with pytest.raises(ValueError, match='combine'):
    features.extract(variables, meta, images, combine='max')
  with pytest.raises(ValueError, match='training size 64'):
    features.extract(variables, meta, images, scales=(32,))


@pytest.mark.slow
def test_cli_writes_features_of_a_folder(weights_dir, photos, tmp_path):
  folder = tmp_path / 'images'
  (folder / 'sub').mkdir(parents=True)
  Image.fromarray(photos[0]).save(folder / 'a.png')
  Image.fromarray(photos[0][:, ::-1]).save(folder / 'b.png')  # same size as a.png: one batch
  Image.fromarray(photos[1]).save(folder / 'sub' / 'c.jpg', quality=95)
  (folder / 'notes.txt').write_text('not an image')
  out = tmp_path / 'feats.npz'
  result = subprocess.run(
      [sys.executable, '-m', 'vggjax.features', f'--checkpoint={weights_dir}', f'--out={out}',
       '--scales=64,96', str(folder)],
      env=subprocess_env(1), capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  saved = np.load(out)
  files = [str(folder / 'a.png'), str(folder / 'b.png'), str(folder / 'sub' / 'c.jpg')]
  assert saved['files'].tolist() == files
  assert saved['scales'].tolist() == [64, 96] and str(saved['combine']) == 'average'
  variables, meta = checkpoints.load_weights(weights_dir)
  np.testing.assert_allclose(saved['features'], features.extract(variables, meta, files, (64, 96)), atol=1e-6)
  np.testing.assert_allclose(saved['features'][0], saved['features'][1], atol=1e-5)
  # .npy: the features, and the file names beside them.
  path = features.save(tmp_path / 'feats.npy', saved['features'], files)
  np.testing.assert_array_equal(np.load(path), saved['features'])
  assert (tmp_path / 'feats.files.txt').read_text().splitlines() == files
