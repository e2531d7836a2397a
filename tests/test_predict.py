"""vggjax.predict: the CLI's top-5 on converted torchvision weights equals PyTorch's with torchvision's
evaluation transform; the single-crop and dense protocols equal their definitions; training workdirs with and
without class names."""

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from conftest import reference_module, subprocess_env
from vggjax import checkpoints, convert, labels, models, predict
from vggjax.preprocessing import Normalization

TV_MEAN = [0.485, 0.456, 0.406]
TV_STD = [0.229, 0.224, 0.225]


def random_variables(model, seed=0, input_scale=1.0):
  """Random He-scaled weights and small random biases for ``model``, drawn with numpy (model.init would
  compile the whole network's initialisers: seconds on CPU). conv1_1 is divided by the inputs' scale."""
  rng = np.random.RandomState(seed)

  def draw(shape):
    if len(shape) == 4:  # a kernel (kh, kw, in, out)
      return (rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    return (rng.randn(*shape) * 0.1).astype(np.float32)

  variables = jax.tree_util.tree_map(lambda s: draw(s.shape), models.variable_shapes(model))
  variables['params']['conv1_1']['kernel'] /= input_scale
  return variables


def tv_resize(image, size):
  """torchvision's Resize(size) of a PIL image: smaller side to size, the other truncated, PIL bilinear."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  long = int(size * long / short)
  return image.resize((size, long) if w <= h else (long, size), Image.BILINEAR)


def tv_center_crop(image, size):
  """torchvision's CenterCrop(size) of a PIL image."""
  w, h = image.size
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


def test_reference_transforms_are_torchvisions(photo_files):
  """The references above are torchvision's eval transforms, pixel for pixel."""
  transforms = reference_module('torchvision.transforms')
  for f in photo_files:
    image = Image.open(f).convert('RGB')
    for size, crop in ((256, 224), (73, 64), (96, None)):
      tv = transforms.Resize(size)(image)
      ours = tv_resize(image, size)
      if crop:
        tv, ours = transforms.CenterCrop(crop)(tv), tv_center_crop(ours, crop)
      np.testing.assert_array_equal(np.asarray(ours), np.asarray(tv))


@pytest.fixture(scope='module')
def photo_files(real_photos, tmp_path_factory):
  """Three real photos of different sizes as lossless PNG files (427x640, 512x512, 300x451)."""
  directory = tmp_path_factory.mktemp('photos')
  files = []
  for i in (0, 2, 3):
    path = directory / f'photo{i}.png'
    Image.fromarray(real_photos[i]).save(path)
    files.append(str(path))
  return files


@pytest.mark.slow
def test_cli_top5_agrees_with_pytorch(photo_files, tmp_path):
  """The CLI's probabilities against an independent pipeline: torchvision's VGG16 and its evaluation
  transform (Resize(256), CenterCrop(224), ToTensor, Normalize) on the same files."""
  torch = reference_module('torch')
  torchvision = reference_module('torchvision')
  torch.manual_seed(0)
  net = torchvision.models.vgg16(weights=None).eval()
  with torch.no_grad():
    net.classifier[6].weight.mul_(30.0)  # random weights, but confident: top-5 gaps well above float noise
  torch.save(net.state_dict(), tmp_path / 'vgg16.pth')
  convert.convert('torchvision', tmp_path / 'vgg16.pth', tmp_path / 'vgg16', 'vgg16')
  files = photo_files[:2]
  result = subprocess.run(
      [sys.executable, '-m', 'vggjax.predict', f'--checkpoint={tmp_path / "vgg16"}', '--json', *files],
      env=subprocess_env(1), capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  got = json.loads(result.stdout)
  t = torchvision.transforms
  transform = t.Compose([t.Resize(256), t.CenterCrop(224), t.ToTensor(), t.Normalize(TV_MEAN, TV_STD)])
  x = torch.stack([transform(Image.open(f).convert('RGB')) for f in files])
  with torch.no_grad():
    want = torch.softmax(net(x), dim=1).numpy()
  names = labels.imagenet_names()
  assert [g['file'] for g in got] == files
  for g, w in zip(got, want):
    top5 = np.argsort(-w)[:5]
    assert g['indices'] == top5.tolist()
    assert g['names'] == [names[i] for i in top5]
    np.testing.assert_allclose(g['probabilities'], w[top5], rtol=1e-4, atol=1e-6)
    assert g['probabilities'][0] > 0.05  # not a near-uniform posterior


def narrow_weights(directory, normalization, class_names=None, name='vgg11'):
  """A narrow network at a 64x64 training size with random weights, as a weights directory."""
  model = models.get_model(name, width=1 / 16, fc_features=32, num_classes=10, image_size=64)
  variables = random_variables(model, input_scale=60.0 if normalization.scale == 1 else 1.0)
  meta = {'model': {'name': name, 'num_classes': 10, 'image_size': 64, 'width': 1 / 16, 'fc_features': 32},
          'normalization': normalization.to_dict(), 'source': 'test', 'labels': class_names}
  checkpoints.save_weights(directory, variables, meta)
  return model


def test_single_crop_and_dense_protocols(photo_files, tmp_path):
  caffe = Normalization(mean=(103.939, 116.779, 123.68), color_order='BGR')
  model = narrow_weights(tmp_path / 'w', caffe)
  variables, meta = checkpoints.load_weights(tmp_path / 'w')

  apply = jax.jit(model.apply)

  def posterior(pil_image):
    x = np.asarray(pil_image.convert('RGB'), np.float32)[None, :, :, ::-1] - np.float32(caffe.mean)
    return np.asarray(jax.nn.softmax(apply(variables, x)))[0]

  pils = [Image.open(f) for f in photo_files]
  # Single crop at the default Q = 64 * 256 / 224 = 73: rescale the smaller side, central 64x64 crop.
  got = predict.predict(variables, meta, photo_files)
  want = np.stack([posterior(tv_center_crop(tv_resize(p, 73), 64)) for p in pils])
  np.testing.assert_allclose(got, want, atol=2e-6)
  # Dense, two scales: whole image (score map averaged), averaged with its flip, then over scales.
  got = predict.predict(variables, meta, [np.asarray(p.convert('RGB')) for p in pils], protocol='dense',
                        scales=[64, 96], batch_size=2)
  want = np.stack([np.mean([(posterior(tv_resize(p, q)) +
                             posterior(tv_resize(p, q).transpose(Image.FLIP_LEFT_RIGHT))) / 2
                            for q in (64, 96)], axis=0) for p in pils])
  np.testing.assert_allclose(got, want, atol=2e-6)
  np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
  assert got.max() < 0.99  # posteriors far from saturated: the comparison means something
  with pytest.raises(ValueError, match='at least the training size 64'):
    predict.predict(variables, meta, photo_files, scales=[48])


def test_training_workdir_without_and_with_class_names(photo_files, tmp_path):
  """A training run's workdir: its latest checkpoint and config; indices unless the config names classes."""
  from configs import default
  model = models.get_model('vgg11', width=1 / 16, fc_features=32, num_classes=10, image_size=64)
  variables = random_variables(model, seed=1)  # the config normalises by std_rgb
  config = default.get_config().to_dict()
  config['model'].update(name='vgg11', num_classes=10, width=1 / 16, fc_features=32)
  config['data'].update(image_size=64, scale_min=64, scale_max=64, std_rgb=(58.4, 57.1, 57.4))
  workdir = tmp_path / 'run'
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(workdir / 'checkpoints' / '7' / 'state', {'step': 7, **variables})
  ckptr.wait_until_finished()
  for class_names in (None, [f'class {i}' for i in range(10)]):
    (workdir / 'config.json').write_text(json.dumps({**config, 'labels': class_names}))
    loaded, meta = checkpoints.load_weights(workdir)
    assert meta['step'] == 7 and predict.default_scale(meta) == 64  # Q = S for a fixed training scale
    probs = predict.predict(loaded, meta, photo_files[:1])
    names = labels.resolve(meta['labels'], meta['model']['num_classes'])
    (pred,) = predict.top_k(probs, photo_files[:1], names)
    assert probs[0].max() < 0.99
    assert pred.indices == np.argsort(-probs[0])[:5].tolist()
    assert pred.probabilities == sorted(pred.probabilities, reverse=True)
    text = predict.format_predictions([pred])
    first = text.splitlines()[1].split()
    assert first[0] == '1.' and float(first[1]) == pytest.approx(probs[0].max(), abs=1e-4)
    assert int(first[2]) == pred.indices[0]
    if class_names is None:
      assert pred.names is None and len(first) == 3
    else:
      assert pred.names[0] == f'class {pred.indices[0]}' and text.splitlines()[1].endswith(pred.names[0])
