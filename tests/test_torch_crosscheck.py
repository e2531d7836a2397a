"""An independent cross-check: with the same random weights, vggjax's logits equal PyTorch's on real photos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import center_crop, randomize_batch_norm, reference_module
from vggjax import models, weights

torch = reference_module('torch')
from benchmarks.torch_vgg import TorchVGG  # noqa: E402

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.fixture(scope='module')
def photo_batch(real_photos):
  crops = np.stack([center_crop(p, 224) for p in real_photos[:3]]).astype(np.float32) / 255.0
  return (crops - MEAN) / STD  # NHWC, torchvision's preprocessing


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vgg11', 'vgg16', 'vgg16_bn'])
def test_logits_equal_pytorch(name, photo_batch):
  torch.manual_seed(0)
  net = TorchVGG(name).eval()
  if name.endswith('_bn'):
    randomize_batch_norm(net)
  with torch.no_grad():
    want = net(torch.from_numpy(photo_batch.transpose(0, 3, 1, 2).copy())).numpy()
  variables = weights.torch_to_variables(net.state_dict(), name)
  model = models.get_model(name)
  got = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(photo_batch)))
  rel = np.abs(got - want).max() / np.abs(want).max()
  assert rel < 1e-4, rel
  assert (got.argmax(1) == want.argmax(1)).all()
  # The round trip reproduces torchvision's state dict exactly.
  back = weights.variables_to_torch(variables, name)
  for k, v in net.state_dict().items():
    if not k.endswith('num_batches_tracked'):
      np.testing.assert_array_equal(back[k], v.numpy())


def test_wrong_model_names_mismatching_tensors():
  net = TorchVGG('vgg11')
  with pytest.raises(weights.ConversionError, match='8 conv layers in the state dict, 13 in vgg16'):
    weights.torch_to_variables(net.state_dict(), 'vgg16')
  sd = net.state_dict()
  sd['classifier.6.weight'] = sd['classifier.6.weight'][:10]
  with pytest.raises(weights.ConversionError, match='fc8/kernel'):
    weights.torch_to_variables(sd, 'vgg11', num_classes=1000)
