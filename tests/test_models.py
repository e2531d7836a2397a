"""The model zoo: Table 1 and 2 of the paper, torchvision's counts, full convolutionality, inits, FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from vggjax import models

TORCHVISION_COUNTS = {
    'vgg11': 132_863_336, 'vgg13': 133_047_848, 'vgg16': 138_357_544, 'vgg19': 143_667_240,
    'vgg11_bn': 132_868_840, 'vgg13_bn': 133_053_736, 'vgg16_bn': 138_365_992, 'vgg19_bn': 143_678_248,
}
TABLE2_MILLIONS = {'A': 133, 'A-LRN': 133, 'B': 133, 'C': 134, 'D': 138, 'E': 144}


@pytest.mark.parametrize('name', sorted(TORCHVISION_COUNTS))
def test_param_count_equals_torchvision(name):
  assert models.param_count(name, num_classes=1000, image_size=224) == TORCHVISION_COUNTS[name]


@pytest.mark.parametrize('letter', sorted(TABLE2_MILLIONS))
def test_param_count_matches_table2(letter):
  assert round(models.param_count(letter) / 1e6) == TABLE2_MILLIONS[letter]


# Table 1: weight layers per configuration, and per conv block.
TABLE1_BLOCKS = {'A': (1, 1, 2, 2, 2), 'B': (2, 2, 2, 2, 2), 'C': (2, 2, 3, 3, 3), 'D': (2, 2, 3, 3, 3),
                 'E': (2, 2, 4, 4, 4)}


def test_every_name_builds_and_unknown_name_lists_valid_ones():
  letters = {'vgg11': 'A', 'vgg11_lrn': 'A', 'vgg13': 'B', 'vgg16_c': 'C', 'vgg16': 'D', 'vgg19': 'E'}
  for name in models.MODEL_NAMES:
    model = models.get_model(name, width=1 / 16, fc_features=16, num_classes=3, image_size=32)
    canonical = models.canonical_name(name)
    blocks = TABLE1_BLOCKS[letters[canonical.replace('_bn', '')]]
    assert isinstance(model, models.VGG)
    assert tuple(len(stage) for stage in model.stages) == blocks, name
    assert model.lrn == (canonical == 'vgg11_lrn') and model.batch_norm == canonical.endswith('_bn'), name
    shapes = models.variable_shapes(model)
    weight_layers = [k for k in shapes['params'] if not k.startswith('bn')]
    assert weight_layers == models.layer_names(name)
    assert len(weight_layers) == sum(blocks) + 3 == int(canonical[3:5]), name
    bn = {n.replace('conv', 'bn') for n in models.conv_layer_names(name)} if model.batch_norm else set()
    assert set(shapes.get('batch_stats', {})) == bn and set(shapes['params']) - set(weight_layers) == bn
    assert shapes['params']['fc8']['kernel'].shape == (1, 1, 16, 3)
  assert models.canonical_name('a-lrn') == 'vgg11_lrn' and models.canonical_name('D') == 'vgg16'
  with pytest.raises(ValueError, match='vgg16_c') as e:
    models.get_model('vgg17')
  assert "'vgg17'" in str(e.value) and 'A-LRN' in str(e.value)
  with pytest.raises(ValueError, match='unknown model option'):
    models.get_model('vgg11', widht=0.5)
  with pytest.raises(ValueError, match='glorot'):
    models.get_model('vgg11', init='he')


def test_caffe_layer_names_and_config_c_has_1x1_convs():
  shapes = models.variable_shapes(models.get_model('C'))['params']
  assert list(shapes) == models.layer_names('C')
  assert models.layer_names('E')[:3] == ['conv1_1', 'conv1_2', 'conv2_1']
  assert 'conv5_4' in models.layer_names('E') and 'conv5_4' not in models.layer_names('D')
  for layer in ('conv3_3', 'conv4_3', 'conv5_3'):
    assert shapes[layer]['kernel'].shape[:2] == (1, 1)
  for layer in ('conv3_2', 'conv4_2', 'conv5_2', 'conv1_1'):
    assert shapes[layer]['kernel'].shape[:2] == (3, 3)
  assert shapes['fc6']['kernel'].shape == (7, 7, 512, 4096)
  bn = models.variable_shapes(models.get_model('vgg11_bn'))
  assert set(bn['batch_stats']) == {n.replace('conv', 'bn') for n in models.conv_layer_names('vgg11')}


def test_fc6_spans_final_map_at_training_size():
  shapes = models.variable_shapes(models.get_model('vgg11', image_size=32, width=0.25, num_classes=10))
  assert shapes['params']['fc6']['kernel'].shape == (1, 1, 128, 1024)


def _fc6_torch_reference(pool5: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """fc6 as PyTorch's VGG computes it: the NCHW map flattened (channel-major) times a (out, C*kh*kw)
  weight. The HWIO kernel becomes that weight as weight conversion does (O, I, H, W), then flattened."""
  n = pool5.shape[0]
  weight = kernel.transpose(3, 2, 0, 1).reshape(kernel.shape[-1], -1)
  return pool5.transpose(0, 3, 1, 2).reshape(n, -1) @ weight.T + bias


def test_fc6_at_the_training_size_is_pytorchs_linear_layer():
  """At the training size fc6 is one matmul (not the conv path): it must flatten as PyTorch's Linear does,
  and equal the convolution it replaces in values and gradients; the dense path agrees window by window."""
  shapes = models.variable_shapes(models.get_model('vgg11', width=1 / 16, fc_features=24, image_size=96))
  assert shapes['params']['fc6']['kernel'].shape == (3, 3, 32, 24)  # spans the 3x3 pool5 map at 96
  rng = np.random.RandomState(0)
  pool5 = rng.randn(2, 3, 3, 32).astype(np.float32)
  kernel = (rng.randn(3, 3, 32, 24) / 17).astype(np.float32)
  bias = rng.randn(24).astype(np.float32)
  fc6 = models._FC6(24, (3, 3), padding='VALID')
  fc6_vars = {'params': {'kernel': kernel, 'bias': bias}}
  got = np.asarray(fc6.apply(fc6_vars, pool5))[:, 0, 0]
  np.testing.assert_allclose(got, _fc6_torch_reference(pool5, kernel, bias), rtol=1e-5, atol=1e-5)
  # The matmul path equals flax's VALID convolution with the same kernel, forward and backward.
  conv = nn.Conv(24, (3, 3), padding='VALID')
  loss = lambda module: lambda v, y: jnp.sum(jnp.sin(module.apply(v, y)))  # noqa: E731
  (gv, gx), (cv, cx) = (jax.grad(loss(m), argnums=(0, 1))(fc6_vars, pool5) for m in (fc6, conv))
  for a, b in ((gv['params']['kernel'], cv['params']['kernel']), (gv['params']['bias'], cv['params']['bias']),
               (gx, cx)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Dense: on a larger map every cell of fc6 is the FC layer on its 3x3 window.
  big = jnp.asarray(rng.randn(1, 5, 4, 32), jnp.float32)
  dense = np.asarray(fc6.apply(fc6_vars, big))
  assert dense.shape == (1, 3, 2, 24)
  for i in range(3):
    for j in range(2):
      window = np.asarray(big[:, i:i + 3, j:j + 3])
      np.testing.assert_allclose(dense[:, i, j], _fc6_torch_reference(window, kernel, bias),
                                 rtol=1e-4, atol=1e-4)


def test_max_pool_equals_flax_max_pool_values_and_gradients():
  """The reshape-and-max pool against XLA's reduce_window pool (BENCHMARKS.md: gradients differ by 0)."""
  x = jnp.asarray(np.random.RandomState(0).randn(2, 7, 6, 5), jnp.float32)  # odd: the last row is dropped
  ref = lambda y: nn.max_pool(y, (2, 2), strides=(2, 2), padding='VALID')  # noqa: E731
  np.testing.assert_array_equal(np.asarray(models.max_pool_2x2(x)), np.asarray(ref(x)))
  weights = jnp.asarray(np.random.RandomState(1).randn(2, 3, 3, 5), jnp.float32)
  grad = lambda f: jax.grad(lambda y: jnp.sum(f(y) * weights))(x)  # noqa: E731
  np.testing.assert_array_equal(np.asarray(grad(models.max_pool_2x2)), np.asarray(grad(ref)))


@pytest.mark.slow
def test_lrn_matches_krizhevsky_formula():
  x = np.random.RandomState(0).randn(2, 3, 4, 9).astype(np.float32) * 10
  got = np.asarray(models.local_response_norm(jnp.asarray(x)))
  want = np.empty_like(x)
  for c in range(9):
    lo, hi = max(0, c - 2), min(9, c + 3)
    want[..., c] = x[..., c] / (2 + 1e-4 * np.sum(x[..., lo:hi] ** 2, axis=-1)) ** 0.75
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A-LRN applies it after conv1_1: outputs differ from A with the same params.
  opts = dict(width=1 / 16, fc_features=32, init='glorot')
  a, alrn = models.get_model('A', **opts), models.get_model('A-LRN', **opts)
  img = jnp.asarray(np.random.RandomState(1).rand(1, 224, 224, 3) * 255, jnp.float32)
  v = a.init(jax.random.key(0), img)
  la, lb = np.asarray(a.apply(v, img)), np.asarray(alrn.apply(v, img))
  assert np.abs(la - lb).max() > 0.1 * np.abs(la).max()


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vgg11', 'vgg16_c', 'vgg13_bn'])
def test_fully_convolutional_one_set_of_params(name):
  model = models.get_model(name, width=1 / 16, fc_features=64, num_classes=7)
  rng = np.random.RandomState(0)
  x224 = jnp.asarray(rng.randn(2, 224, 224, 3), jnp.float32)
  variables = model.init(jax.random.key(0), x224)
  logits = model.apply(variables, x224)
  smap = model.apply(variables, x224, method='score_map')
  assert logits.shape == (2, 7) and smap.shape == (2, 1, 1, 7)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(smap[:, 0, 0]))
  for size, cells in ((256, 2), (384, 6)):
    x = jnp.asarray(rng.randn(2, size, size + 32, 3), jnp.float32)
    smap = model.apply(variables, x, method='score_map')
    assert smap.shape == (2, cells, cells + 1, 7)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), np.asarray(smap.mean(axis=(1, 2))),
                               rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='below the training size 224'):
    model.apply(variables, x224[:, :200])


@pytest.mark.slow
def test_bfloat16_compute_float32_params():
  model = models.get_model('vgg11', width=1 / 8, fc_features=64, num_classes=5, image_size=32,
                           dtype='bfloat16', init='glorot')
  x = jnp.asarray(np.random.RandomState(0).rand(4, 32, 32, 3), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  out, captured = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  assert out.dtype == jnp.float32  # logits leave the net in float32
  for layer in models.layer_names('vgg11'):  # every layer computes in bfloat16
    assert {a.dtype for a in jax.tree_util.tree_leaves(captured['intermediates'][layer])} == {jnp.dtype(jnp.bfloat16)}, layer
  f32 = models.get_model('vgg11', width=1 / 8, fc_features=64, num_classes=5, image_size=32, init='glorot')
  ref = np.asarray(f32.apply(variables, x))
  # The same function to bfloat16's precision: 8 mantissa bits round each op by up to 2^-9 ~ 2e-3, which
  # compounds over 8 layers to about 1% (measured 0.95%). Float32 compute (dtype ignored) gives 0, float16
  # ~7e-4, a wrong layer or a bfloat16 accumulation over a whole layer far more than 3%.
  relative = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
  assert 2e-3 < relative < 3e-2, relative


def test_dropout_only_in_training():
  model = models.get_model('vgg11', width=1 / 8, fc_features=64, num_classes=5, image_size=32,
                           init='glorot')
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))
  a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(1)})
  b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)})
  assert not np.allclose(a, b)


@pytest.mark.parametrize('init,conv_std,fc_std', [
    ('paper', 0.01, 0.01),
    ('torchvision', np.sqrt(2 / (9 * 128)), 0.01),  # fan-out of conv2_1 at full width: 3*3*128
    ('glorot', np.sqrt(2 / (9 * 64 + 9 * 128)), np.sqrt(2 / (25088 + 4096))),
])
@pytest.mark.slow
def test_init_schemes(init, conv_std, fc_std):
  model = models.get_model('vgg11', init=init)
  x = jnp.zeros((1, 224, 224, 3))
  # Initialise only what is needed to look at two layers, without a 0.5 GB allocation for all of them.
  params = jax.jit(lambda k: model.init(k, x)['params'])(jax.random.key(0))
  conv, fc = np.asarray(params['conv2_1']['kernel']), np.asarray(params['fc6']['kernel'])
  assert abs(conv.mean()) < 0.1 * conv_std and abs(conv.std() - conv_std) < 0.02 * conv_std
  assert abs(fc.std() - fc_std) < 0.01 * fc_std
  assert all(not np.any(np.asarray(params[k]['bias'])) for k in params)
  literal = models.get_model('vgg11', init='paper', init_std=0.1)  # "variance 1e-2" read literally
  p = jax.jit(lambda k: literal.init(k, x)['params']['fc8']['kernel'])(jax.random.key(0))
  assert abs(float(p.std()) - 0.1) < 0.002


def test_flops():
  f = models.flops('vgg16', 224)
  assert f.score_map == (1, 1) and f.flops == 2 * f.macs
  assert round(f.macs / 1e9, 2) == 15.47  # torchvision's published 15.47 G(MAC) for vgg16
  assert round(models.flops('vgg19').macs / 1e9, 2) == 19.63
  assert round(models.flops('vgg11').macs / 1e9, 2) == 7.61
  assert models.flops('vgg16', 384).score_map == (6, 6)
  # Dense evaluation at 384: convs cost the area ratio (2.94x), the FC layers run on 6x6 cells.
  fc = 25088 * 4096 + 4096 * 4096 + 4096 * 1000
  assert models.flops('vgg16', 384).macs == (f.macs - fc) * 384 ** 2 // 224 ** 2 + 36 * fc
  with pytest.raises(ValueError):
    models.flops('vgg16', 200)
