"""Importing torchvision, timm and Keras VGG weights: every file layout, the logits of the source framework on
real photos (to 1e-4 relative), clear errors for the wrong model, and no pickled code ever run.

All weights are random and written by the tests themselves: nothing is downloaded.
"""

import os

os.environ['KERAS_BACKEND'] = 'jax'  # before keras is imported anywhere

import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from conftest import center_crop, randomize_batch_norm, reference_module, subprocess_env  # noqa: E402
from vggjax import checkpoints, convert, labels, models, weights  # noqa: E402
from vggjax.preprocessing import normalize  # noqa: E402

torch = reference_module('torch')
reference_module('safetensors')
from benchmarks.torch_vgg import TorchVGG  # noqa: E402

TV_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
TV_STD = np.array([0.229, 0.224, 0.225], np.float32)


def relative_error(got, want):
  return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


def assert_same_variables(a, b):
  flat_a = jax.tree_util.tree_leaves_with_path(a)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  assert len(flat_a) == len(flat_b)
  for path, leaf in flat_a:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]), err_msg=str(path))


def vggjax_logits(directory, crops):
  """Logits of a weights directory on uint8 RGB crops, normalised as its metadata says."""
  variables, meta = checkpoints.load_weights(directory)
  model = checkpoints.model_from_meta(meta)
  norm = checkpoints.normalization_from_meta(meta)
  fn = jax.jit(lambda v, x: model.apply(v, normalize(x, norm)))
  return np.asarray(fn(variables, crops)), meta


@pytest.fixture(scope='module')
def crops(real_photos):
  """Three real photos, smaller side rescaled to 224 and centre-cropped: uint8 RGB (3, 224, 224, 3)."""
  return np.stack([center_crop(p, 224) for p in real_photos[:3]])


# ------------------------------------------------------------------------------------------ torchvision


@pytest.fixture(scope='module')
def torch_vgg16(tmp_path_factory):
  """A random torchvision-layout VGG16 and its state dict saved as .pth and .safetensors."""
  torch.manual_seed(0)
  net = TorchVGG('vgg16').eval()
  directory = tmp_path_factory.mktemp('torch_vgg16')
  sd = net.state_dict()
  torch.save(sd, directory / 'vgg16.pth')
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()}, str(directory / 'vgg16.safetensors'))
  return net, directory


@pytest.mark.slow
def test_torchvision_pth_logits_equal_pytorch(torch_vgg16, crops, tmp_path):
  net, directory = torch_vgg16
  meta = convert.convert('torchvision', directory / 'vgg16.pth', tmp_path / 'vgg16', 'vgg16')
  assert meta['source'] == 'torchvision' and meta['source_file'] == 'vgg16.pth'
  assert meta['normalization'] == {'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225],
                                   'scale': 1 / 255, 'color_order': 'RGB'}
  assert meta['model'] == {'name': 'vgg16', 'num_classes': 1000, 'image_size': 224, 'width': 1.0,
                           'fc_features': 4096}
  assert meta['labels'][0] == 'tench, Tinca tinca' and len(meta['labels']) == 1000
  got, loaded = vggjax_logits(tmp_path / 'vgg16', crops)
  assert loaded == meta
  x = (crops.astype(np.float32) / 255.0 - TV_MEAN) / TV_STD  # torchvision's ToTensor + Normalize
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert relative_error(got, want) < 1e-4
  np.testing.assert_array_equal(np.argsort(-got, 1)[:, :5], np.argsort(-want, 1)[:, :5])


@pytest.mark.slow
def test_safetensors_and_timm_naming_give_the_same_variables(torch_vgg16, tmp_path):
  net, directory = torch_vgg16
  sd = weights.read_torch_file(directory / 'vgg16.safetensors')
  want = net.state_dict()
  assert set(sd) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k], v.numpy(), err_msg=k)
  reference = weights.torch_to_variables(sd, 'vgg16')
  # timm (vgg16.tv_in1k): the same features.*, then pre_logits.fc1 (Conv2d 7x7), pre_logits.fc2 (Conv2d
  # 1x1) and head.fc (Linear).
  timm = {k: v for k, v in sd.items() if k.startswith('features.')}
  timm['pre_logits.fc1.weight'] = sd['classifier.0.weight'].reshape(4096, 512, 7, 7)
  timm['pre_logits.fc1.bias'] = sd['classifier.0.bias']
  timm['pre_logits.fc2.weight'] = sd['classifier.3.weight'].reshape(4096, 4096, 1, 1)
  timm['pre_logits.fc2.bias'] = sd['classifier.3.bias']
  timm['head.fc.weight'] = sd['classifier.6.weight']
  timm['head.fc.bias'] = sd['classifier.6.bias']
  from safetensors.numpy import save_file
  save_file(timm, str(tmp_path / 'model.safetensors'))
  from_timm, name = weights.load_file('torchvision', tmp_path / 'model.safetensors')  # model inferred
  assert name == 'vgg16'
  assert_same_variables(reference, from_timm)
  # A file for the wrong model names the mismatching tensors.
  with pytest.raises(weights.ConversionError, match='13 conv layers in the state dict, 16 in vgg19'):
    weights.torch_to_variables(sd, 'vgg19')
  with pytest.raises(weights.ConversionError, match=r'0 batch-norm layers in the state dict, 13 in vgg16_bn'):
    weights.torch_to_variables(sd, 'vgg16_bn')
  with pytest.raises(weights.ConversionError, match=r'fc8/kernel: got shape \(1, 1, 4096, 1000\)'):
    weights.torch_to_variables(sd, 'vgg16', num_classes=10)


def narrow_torch_state_dict(name='vgg11'):
  model = models.get_model(name, width=1 / 16, fc_features=8, num_classes=3)
  v = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), models.variable_shapes(model))
  return weights.variables_to_torch(v, name)


def test_training_checkpoint_wrappers_are_unwrapped(tmp_path):
  sd = narrow_torch_state_dict()
  wrapped = {'epoch': 3, 'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in sd.items()}}
  torch.save(wrapped, tmp_path / 'checkpoint.pth')
  got = weights.read_torch_file(tmp_path / 'checkpoint.pth')
  assert set(got) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])


class _Payload:
  """Unpickling this would create a marker file: weights_only loading must refuse it instead."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def test_pickled_code_is_never_run(tmp_path):
  marker = tmp_path / 'executed'
  path = tmp_path / 'evil.pth'
  torch.save({'features.0.weight': torch.zeros(64, 3, 3, 3), 'payload': _Payload(str(marker))}, path)
  with pytest.raises(weights.ConversionError, match='weights_only'):
    weights.read_torch_file(path)
  assert not marker.exists()


@pytest.mark.slow
def test_torchvision_bn_model_via_the_cli(crops, tmp_path):
  """torchvision.models.vgg11_bn (weights=None), random batch-norm statistics, converted by the CLI with the
  model inferred from the file. torchvision's own net: never the project's TorchVGG in its place."""
  torchvision = reference_module('torchvision')
  torch.manual_seed(1)
  net = torchvision.models.vgg11_bn(weights=None).eval()
  randomize_batch_norm(net)
  torch.save(net.state_dict(), tmp_path / 'vgg11_bn.pth')
  out = tmp_path / 'vgg11_bn'
  result = subprocess.run(
      [sys.executable, '-m', 'vggjax.convert', f'--src={tmp_path / "vgg11_bn.pth"}', f'--out={out}'],
      env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'vgg11_bn (132,868,840 parameters, 1000 classes) from torchvision' in result.stdout
  got, meta = vggjax_logits(out, crops[:2])
  assert meta['model']['name'] == 'vgg11_bn' and meta['source'] == 'torchvision'
  x = (crops[:2].astype(np.float32) / 255.0 - TV_MEAN) / TV_STD
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  assert relative_error(got, want) < 1e-4


@pytest.mark.slow
def test_cli_names_the_mismatch_for_the_wrong_model(tmp_path):
  torch.save({k: torch.from_numpy(v) for k, v in narrow_torch_state_dict('vgg11_bn').items()},
             tmp_path / 'small.pth')
  result = subprocess.run(
      [sys.executable, '-m', 'vggjax.convert', '--from=torchvision', '--model=vgg16',
       f'--src={tmp_path / "small.pth"}', f'--out={tmp_path / "wrong"}'],
      env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert '8 conv layers in the state dict, 13 in vgg16' in result.stderr
  assert not (tmp_path / 'wrong').exists()


# ------------------------------------------------------------------------------------------ Keras


def write_published_h5(path, model):
  """The layout of the Keras applications' published files (vgg16_weights_tf_dim_ordering_tf_kernels.h5):
  one group per layer at the root, attrs layer_names / weight_names, datasets named as block1_conv1_W_1:0."""
  import h5py
  with h5py.File(path, 'w') as f:
    f.attrs['layer_names'] = [layer.name.encode() for layer in model.layers]
    for layer in model.layers:
      g = f.create_group(layer.name)
      arrays = [np.asarray(w) for w in layer.get_weights()]
      names = [f'{layer.name}_{s}_1:0' for s in ('W', 'b')][:len(arrays)]
      g.attrs['weight_names'] = [n.encode() for n in names]
      for n, a in zip(names, arrays):
        g.create_dataset(n, data=a)


@pytest.fixture(scope='module')
def keras_vgg16(tmp_path_factory):
  """keras.applications.VGG16 (random weights, logits out) as Keras 3 writes it and as published."""
  keras = reference_module('keras')
  reference_module('h5py')
  if keras.backend.backend() != 'jax':
    pytest.skip(f'Keras was imported with the {keras.backend.backend()} backend before this module')
  keras.utils.set_random_seed(0)
  model = keras.applications.VGG16(weights=None, classifier_activation=None)
  directory = tmp_path_factory.mktemp('keras_vgg16')
  files = {
      'keras3': directory / 'vgg16.weights.h5',  # model.save_weights (Keras 3)
      'published': directory / 'vgg16_weights_tf_dim_ordering_tf_kernels.h5',
  }
  model.save_weights(files['keras3'])
  write_published_h5(files['published'], model)
  return model, files


@pytest.mark.slow
def test_keras_vgg16_logits_equal_keras(keras_vgg16, crops, tmp_path):
  from keras.applications import vgg16
  model, files = keras_vgg16
  meta = convert.convert('keras', files['published'], tmp_path / 'vgg16', 'vgg16')
  assert meta['source'] == 'keras'
  assert meta['normalization'] == {'mean': [103.939, 116.779, 123.68], 'std': [1.0, 1.0, 1.0], 'scale': 1.0,
                                   'color_order': 'BGR'}
  got, _ = vggjax_logits(tmp_path / 'vgg16', crops)
  want = np.asarray(model(vgg16.preprocess_input(crops.astype(np.float32)), training=False))
  assert relative_error(got, want) < 1e-4
  np.testing.assert_array_equal(np.argsort(-got, 1)[:, :5], np.argsort(-want, 1)[:, :5])


@pytest.mark.slow
def test_keras3_and_published_files_hold_the_same_layers(keras_vgg16):
  model, files = keras_vgg16
  published, order = weights.read_keras_file(files['published'])
  keras3, order3 = weights.read_keras_file(files['keras3'])
  assert order == order3 == 'HWC'
  want = {layer.name: layer.get_weights() for layer in model.layers if layer.get_weights()}
  for layers in (published, keras3):
    assert set(layers) == set(want)
    for name, arrays in want.items():
      for got, w in zip(layers[name], arrays):
        np.testing.assert_array_equal(got, np.asarray(w), err_msg=name)
  assert weights.infer_model_name('keras', keras3) == 'vgg16'
  assert weights.source_from_path(files['keras3']) == 'keras'


@pytest.mark.slow
def test_keras_file_for_the_wrong_model_names_the_layers(keras_vgg16):
  _, files = keras_vgg16
  with pytest.raises(weights.ConversionError,
                     match='missing Keras layers: block3_conv4, block4_conv4, block5_conv4'):
    weights.load_file('keras', files['keras3'], 'vgg19')
  with pytest.raises(weights.ConversionError, match=r'fc8/kernel: got shape .* \(Keras predictions\)'):
    weights.load_file('keras', files['keras3'], 'vgg16', num_classes=10)
  with pytest.raises(weights.ConversionError, match='unexpected Keras layers: block3_conv3, block4_conv3'):
    weights.load_file('keras', files['keras3'], 'vgg13')
  layers, _ = weights.read_keras_file(files['keras3'])
  notop = {k: v for k, v in layers.items() if k.startswith('block')}  # as in ..._kernels_notop.h5
  with pytest.raises(weights.ConversionError, match=r'missing Keras layers: fc1, fc2, predictions \(a _no'):
    weights.keras_to_variables(notop, 'vgg16')


@pytest.mark.slow
def test_keras_vgg19_logits_equal_keras(crops, tmp_path):
  keras = reference_module('keras')
  from keras.applications import vgg19
  if keras.backend.backend() != 'jax':
    pytest.skip('Keras runs another backend')
  keras.utils.set_random_seed(1)
  model = keras.applications.VGG19(weights=None, classifier_activation=None)
  model.save_weights(tmp_path / 'vgg19.weights.h5')
  convert.convert('keras', tmp_path / 'vgg19.weights.h5', tmp_path / 'vgg19')
  got, meta = vggjax_logits(tmp_path / 'vgg19', crops[:2])
  assert meta['model']['name'] == 'vgg19'
  want = np.asarray(model(vgg19.preprocess_input(crops[:2].astype(np.float32)), training=False))
  assert relative_error(got, want) < 1e-4


def narrow_keras_vgg11(keras, conv_format, flatten_format, seed=0):
  """VGG-A at 1/16 width in Keras, with the applications' layer names and random (He-scaled) weights."""
  from keras import layers as kl
  shape = (3, 224, 224) if conv_format == 'channels_first' else (224, 224, 3)
  cheap = {'kernel_initializer': 'zeros'}  # set below with numpy: Keras' random initialisers compile slowly
  stack = [keras.Input(shape)]
  for block, convs in enumerate(models.ARCHS['vgg11'].stages):
    for i, (features, _) in enumerate(convs):
      stack.append(kl.Conv2D(features // 16, 3, padding='same', activation='relu', data_format=conv_format,
                             name=f'block{block + 1}_conv{i + 1}', **cheap))
    stack.append(kl.MaxPooling2D(2, data_format=conv_format, name=f'block{block + 1}_pool'))
  stack += [kl.Flatten(data_format=flatten_format, name='flatten'),
            kl.Dense(16, activation='relu', name='fc1', **cheap),
            kl.Dense(16, activation='relu', name='fc2', **cheap), kl.Dense(5, name='predictions', **cheap)]
  model = keras.Sequential(stack)
  rng = np.random.RandomState(seed)
  model.set_weights([(rng.randn(*w.shape) * (np.sqrt(2 / np.prod(w.shape[:-1])) if w.ndim > 1 else 0.1))
                     .astype(np.float32) for w in model.get_weights()])
  return model


@pytest.mark.parametrize('flatten_format,filename,order', [
    ('channels_first', 'narrow.keras', 'HWC'),  # Keras' Flatten moves channels last: the usual case
    ('channels_last', 'narrow.h5', 'CHW'),  # the map flattened as it lies: (C, H, W)
])
@pytest.mark.slow
def test_keras_channels_first_models(flatten_format, filename, order, crops, tmp_path):
  """Narrow channels_first Keras models in a .keras archive and a legacy full-model .h5: the model config
  tells fc1's flatten order and the logits equal Keras'."""
  keras = reference_module('keras')
  if keras.backend.backend() != 'jax':
    pytest.skip('Keras runs another backend')
  model = narrow_keras_vgg11(keras, 'channels_first', flatten_format)
  x = (crops[:2].astype(np.float32) - 100.0) / 60.0
  want = np.asarray(model(x.transpose(0, 3, 1, 2), training=False))
  model.save(tmp_path / filename)
  layers, flatten_order = weights.read_keras_file(tmp_path / filename)
  assert flatten_order == order
  narrow = models.get_model('vgg11', width=1 / 16, fc_features=16, num_classes=5)
  variables = weights.keras_to_variables(layers, 'vgg11', flatten_order=flatten_order, width=1 / 16)
  assert relative_error(narrow.apply(variables, x), want) < 1e-4
  other = {'HWC': 'CHW', 'CHW': 'HWC'}[order]  # the other order permutes fc1: the logits differ
  wrong = weights.keras_to_variables(layers, 'vgg11', flatten_order=other, width=1 / 16)
  assert relative_error(narrow.apply(wrong, x), want) > 1e-2
  with pytest.raises(weights.ConversionError, match=r'conv1_1/kernel: got shape \(3, 3, 3, 4\)'):
    weights.keras_to_variables(layers, 'vgg11')  # the full-width model


def test_model_inference_and_labels():
  for name in ('vgg13_bn', 'vgg16_c', 'vgg19'):
    assert weights.infer_model_name('torchvision', narrow_torch_state_dict(name)) == name
  assert labels.imagenet_synsets()[281] == 'n02123045'
  assert labels.imagenet_names()[281] == 'tabby, tabby cat'
  assert labels.resolve('imagenet2012', 1000)[0] == 'tench, Tinca tinca'
  assert labels.resolve(['cat', 'dog'], 2) == ['cat', 'dog']
  assert labels.resolve(['cat', 'dog'], 3) is None and labels.resolve(None, 3) is None
