"""The VGG model zoo of Simonyan & Zisserman (2014), Table 1, as one Flax linen module family.

Every configuration is one fully convolutional network: fc6 is a convolution whose kernel spans the final
feature map at the training resolution (7x7 at 224, 1x1 at 32) and fc7/fc8 are 1x1 convolutions. With one
set of parameters the network is

* the paper's FC classifier at the training size (the class score map has exactly one cell), and
* the paper's dense evaluation at any larger size: the class score map, averaged over space.

Layer names are those of the original Caffe release (conv1_1 ... conv5_4, fc6, fc7, fc8) so that warm starts
and imported weights are copies by name. Batch-norm layers of the ``_bn`` variants are called bn1_1 ...

This module imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

# The layer table (Table 1): per block, one (width, kernel size) pair per convolution.
_A = (((64, 3),), ((128, 3),), ((256, 3), (256, 3)), ((512, 3), (512, 3)), ((512, 3), (512, 3)))
_B = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2, ((512, 3),) * 2, ((512, 3),) * 2)
_C = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 2 + ((256, 1),), ((512, 3),) * 2 + ((512, 1),),
      ((512, 3),) * 2 + ((512, 1),))
_D = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 3, ((512, 3),) * 3, ((512, 3),) * 3)
_E = (((64, 3),) * 2, ((128, 3),) * 2, ((256, 3),) * 4, ((512, 3),) * 4, ((512, 3),) * 4)


@dataclasses.dataclass(frozen=True)
class Arch:
  """One row of Table 1: the conv stages and whether LRN or batch norm is used."""
  stages: tuple
  lrn: bool = False
  batch_norm: bool = False
  paper_name: str | None = None


ARCHS: dict[str, Arch] = {
    'vgg11': Arch(_A, paper_name='A'),
    'vgg11_lrn': Arch(_A, lrn=True, paper_name='A-LRN'),
    'vgg13': Arch(_B, paper_name='B'),
    'vgg16_c': Arch(_C, paper_name='C'),
    'vgg16': Arch(_D, paper_name='D'),
    'vgg19': Arch(_E, paper_name='E'),
    'vgg11_bn': Arch(_A, batch_norm=True),
    'vgg13_bn': Arch(_B, batch_norm=True),
    'vgg16_bn': Arch(_D, batch_norm=True),
    'vgg19_bn': Arch(_E, batch_norm=True),
}
PAPER_NAMES: dict[str, str] = {a.paper_name: n for n, a in ARCHS.items() if a.paper_name}
MODEL_NAMES: tuple[str, ...] = tuple(ARCHS) + tuple(PAPER_NAMES)
INIT_SCHEMES = ('paper', 'glorot', 'torchvision')
# Krizhevsky et al. (2012), section 3.3: b = a / (k + alpha * sum_window a^2) ** beta over 5 channels.
LRN_SIZE, LRN_ALPHA, LRN_BETA, LRN_K = 5, 1e-4, 0.75, 2.0
# Warm start (paper 3.1): "the first four convolutional layers and the last three fully-connected layers".
WARM_START_LAYERS = ('conv1_1', 'conv2_1', 'conv3_1', 'conv3_2', 'fc6', 'fc7', 'fc8')


def canonical_name(name: str) -> str:
  """Maps a model name or a paper letter ('A', 'A-LRN', 'B', 'C', 'D', 'E') to its vggjax name."""
  if name in ARCHS:
    return name
  if name in PAPER_NAMES:
    return PAPER_NAMES[name]
  upper = name.upper() if isinstance(name, str) else name
  if upper in PAPER_NAMES:
    return PAPER_NAMES[upper]
  raise ValueError(f'unknown model name {name!r}; valid names: {", ".join(MODEL_NAMES)}')


def conv_layer_names(name: str) -> list[str]:
  """Caffe names of the conv layers of a configuration, in order: conv1_1, conv1_2, conv2_1, ..."""
  stages = ARCHS[canonical_name(name)].stages
  return [f'conv{b + 1}_{i + 1}' for b, stage in enumerate(stages) for i in range(len(stage))]


def layer_names(name: str) -> list[str]:
  """All weight layers of a configuration in forward order (conv layers, then fc6, fc7, fc8)."""
  return conv_layer_names(name) + ['fc6', 'fc7', 'fc8']


def _scaled(features: int, width: float) -> int:
  return max(1, int(round(features * width)))


def local_response_norm(x: jax.Array, size: int = LRN_SIZE, alpha: float = LRN_ALPHA,
                        beta: float = LRN_BETA, k: float = LRN_K) -> jax.Array:
  """Across-channel LRN of Krizhevsky et al. (alpha is not divided by the window size, unlike Caffe)."""
  sq = jnp.square(x.astype(jnp.float32))
  half = size // 2
  padded = jnp.pad(sq, [(0, 0)] * (x.ndim - 1) + [(half, size - 1 - half)])
  channels = x.shape[-1]
  window = sum(padded[..., i:i + channels] for i in range(size))
  return (x.astype(jnp.float32) / jnp.power(k + alpha * window, beta)).astype(x.dtype)


def max_pool_2x2(x: jax.Array, ceil: bool = False) -> jax.Array:
  """The 2x2/2 max pool as a reshape and a max over the window axes (odd sizes drop the last row/column, as
  VALID pooling does). Its gradient is an elementwise select rather than XLA's select-and-scatter: faster on
  the CPU, the same values.

  ``ceil``: Caffe's rounding (the authors' framework and that of the released models): an odd size keeps its
  last row/column as a window of its own, so the output is ceil(h / 2) x ceil(w / 2). Identical at even
  sizes (every size of the training crop), different in dense evaluation of odd-sized maps."""
  n, h, w, c = x.shape
  if ceil and (h % 2 or w % 2):
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=-jnp.inf)
    n, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def dropout(x: jax.Array, rate: float, rng: jax.Array, example_ids: jax.Array | None = None) -> jax.Array:
  """Inverted dropout. With ``example_ids`` (N,) each example's mask is drawn from fold_in(rng, its id), so
  an example keeps its mask whatever batch it is computed in: the train step's gradient accumulation
  (micro-batches of one global batch) draws the same masks as the whole batch."""
  keep = 1.0 - rate
  if example_ids is None:
    mask = jax.random.bernoulli(rng, keep, x.shape)
  else:
    keys = jax.vmap(jax.random.fold_in, (None, 0))(rng, example_ids)
    mask = jax.vmap(lambda key: jax.random.bernoulli(key, keep, x.shape[1:]))(keys)
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


class _FC6(nn.Conv):
  """fc6: a convolution whose kernel spans the last feature map at the training size. There it is one
  matrix product with the same kernel (the FC layer it is); on larger maps (dense evaluation) the conv."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = tuple(self.kernel_size)
    if tuple(x.shape[1:3]) != k or k == (1, 1):
      return super().__call__(x)
    kernel = self.param('kernel', self.kernel_init, k + (x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,), self.param_dtype)
    y = jnp.dot(x.reshape(x.shape[0], -1).astype(self.dtype),
                kernel.reshape(-1, self.features).astype(self.dtype))
    return (y + bias.astype(self.dtype)).reshape(x.shape[0], 1, 1, self.features)


def _initializers(init: str, std: float):
  """(conv kernel init, fc kernel init) for an init scheme. Biases are always zero."""
  if init == 'paper':
    gauss = jax.nn.initializers.normal(std)
    return gauss, gauss
  if init == 'glorot':
    # FC layers are convolutions here; their fans are those of the FC layer (fc6: 7*7*512 in, 4096 out).
    fc = jax.nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=(0, 1, 2), out_axis=3)
    return jax.nn.initializers.glorot_uniform(), fc
  if init == 'torchvision':
    return (jax.nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
            jax.nn.initializers.normal(0.01))
  raise ValueError(f'unknown init {init!r}; valid: {", ".join(INIT_SCHEMES)}')


class VGG(nn.Module):
  """A VGG network, fully convolutional, with Caffe layer names.

  Attributes:
    stages: the layer table, per block a tuple of (width, kernel size) pairs.
    num_classes: the size of fc8.
    lrn: LRN after conv1_1 (configuration A-LRN).
    batch_norm: batch norm after every conv (the torchvision ``_bn`` variants).
    width: multiplier of the conv widths (and of the FC widths unless ``fc_features`` is given).
    fc_features: width of fc6 and fc7 (4096 * width by default).
    image_size: the training resolution; fc6's kernel is image_size // 32.
    dropout_rate: dropout after fc6 and fc7 in training.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32, logits float32.
    init_scheme: 'paper' (zero-mean Gaussian of std ``init_std``, biases 0), 'glorot' (Glorot uniform,
      biases 0) or 'torchvision' (Kaiming normal fan-out convs, N(0, 0.01) FC).
    pool_ceil: Caffe-style ceil rounding in max pooling (see max_pool_2x2), for dense evaluation of weights
      trained in Caffe; the default rounds down (identical at the training size).
    init_std: the std of the 'paper' init. 0.01 by default, for a measured reason (docs/design.md,
      decision 16): at 0.1 (the text's "variance 1e-2" read literally) activations grow about 4x per layer
      and training diverges; at 0.01 net A trains. Set 0.1 to read the text literally.
  """
  stages: tuple
  num_classes: int = 1000
  lrn: bool = False
  batch_norm: bool = False
  width: float = 1.0
  fc_features: int | None = None
  image_size: int = 224
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  init_scheme: str = 'paper'
  init_std: float = 0.01
  pool_ceil: bool = False

  @property
  def fc6_kernel(self) -> int:
    return max(1, self.image_size // 32)

  @nn.compact
  def _forward(self, x: jax.Array, train: bool, output: str,
               example_ids: jax.Array | None = None) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'expected images of shape (N, H, W, 3), got {x.shape}')
    if x.shape[1] < self.image_size or x.shape[2] < self.image_size:  # not min(): symbolic sizes (export)
      raise ValueError(f'input size {x.shape[1]}x{x.shape[2]} is below the training size {self.image_size}; '
                       f'the network takes any size >= {self.image_size}')
    conv_init, fc_init = _initializers(self.init_scheme, self.init_std)
    zeros = jax.nn.initializers.zeros
    x = x.astype(self.dtype)
    for b, stage in enumerate(self.stages):
      for i, (features, k) in enumerate(stage):
        name = f'conv{b + 1}_{i + 1}'
        x = nn.Conv(_scaled(features, self.width), (k, k), padding=k // 2, dtype=self.dtype,
                    kernel_init=conv_init, bias_init=zeros, name=name)(x)
        if self.batch_norm:
          x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                           name=f'bn{b + 1}_{i + 1}')(x)
        x = nn.relu(x)
        if self.lrn and name == 'conv1_1':
          x = local_response_norm(x)
      x = max_pool_2x2(x, self.pool_ceil)
      x = checkpoint_name(x, 'block_out')  # what remat keeps (see vggjax.train)
    if output == 'pool5':
      return x.astype(jnp.float32)
    fc = self.fc_features or _scaled(4096, self.width)
    k6 = self.fc6_kernel
    x = _FC6(fc, (k6, k6), padding='VALID', dtype=self.dtype, kernel_init=fc_init, bias_init=zeros,
             name='fc6')(x)
    x = self._dropout(nn.relu(x), train, example_ids)
    x = nn.Conv(fc, (1, 1), dtype=self.dtype, kernel_init=fc_init, bias_init=zeros, name='fc7')(x)
    x = nn.relu(x)
    if output == 'fc7':
      return x.astype(jnp.float32)
    x = self._dropout(x, train, example_ids)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=fc_init, bias_init=zeros,
                name='fc8')(x)
    return x.astype(jnp.float32)

  def _dropout(self, x: jax.Array, train: bool, example_ids: jax.Array | None) -> jax.Array:
    if not train or self.dropout_rate == 0:
      return x
    return dropout(x, self.dropout_rate, self.make_rng('dropout'), example_ids)

  def __call__(self, x: jax.Array, train: bool = False, example_ids: jax.Array | None = None) -> jax.Array:
    """Class logits (N, classes): the FC net at the training size, the averaged score map above it.
    ``example_ids``: per-example dropout masks (see ``dropout``; the train step passes them)."""
    return jnp.mean(self._forward(x, train, 'fc8', example_ids), axis=(1, 2))

  def score_map(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The class score map (N, h, w, classes); h = w = 1 at the training size."""
    return self._forward(x, train, 'fc8')

  def fc7_map(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The fc7 activations (after ReLU) as a map (N, h, w, fc_features): the paper's image descriptor."""
    return self._forward(x, train, 'fc7')

  def pool5(self, x: jax.Array, train: bool = False) -> jax.Array:
    """The last conv block's pooled output (N, H/32, W/32, 512*width)."""
    return self._forward(x, train, 'pool5')


def get_model(name: str, **options) -> VGG:
  """Builds a VGG configuration by name: vgg11, vgg11_lrn, vgg13, vgg16_c, vgg16, vgg19, the _bn variants,
  or the paper's letters A, A-LRN, B, C, D, E. ``options`` are VGG's attributes (num_classes, width, ...);
  ``init`` is accepted for ``init_scheme`` (a Flax module cannot have an attribute called init)."""
  arch = ARCHS[canonical_name(name)]
  if 'weights' in options:  # a module has no weights: the published ones come with their own model
    raise ValueError(f'get_model builds an untrained VGG; for published weights use vggjax.hub.get_model('
                     f'{name!r}, weights={options["weights"]!r}), which returns (model, variables)')
  if 'init' in options:
    options['init_scheme'] = options.pop('init')
  fields = {f.name for f in dataclasses.fields(VGG)} - {'stages', 'lrn', 'batch_norm', 'parent', 'name'}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f'unknown model option(s) {unknown}; valid: {sorted(fields)}')
  if 'init_scheme' in options:
    _initializers(options['init_scheme'], 0.01)  # validates the name
  if 'dtype' in options and isinstance(options['dtype'], str):
    options['dtype'] = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}[
        options['dtype']]
  return VGG(stages=arch.stages, lrn=arch.lrn, batch_norm=arch.batch_norm, **options)


def variable_shapes(model: VGG, image_size: int | None = None) -> Any:
  """The model's variables as jax.ShapeDtypeStructs, computed with jax.eval_shape (nothing allocated)."""
  size = image_size or model.image_size
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def param_count(name_or_model: str | VGG, **options) -> int:
  """The number of parameters (trainable only: batch-norm statistics excluded)."""
  model = get_model(name_or_model, **options) if isinstance(name_or_model, str) else name_or_model
  params = variable_shapes(model)['params']
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


@dataclasses.dataclass(frozen=True)
class Flops:
  macs: int  # multiply-accumulates of one forward pass of one image
  flops: int  # 2 * macs
  score_map: tuple[int, int]  # spatial size of the class score map


def flops(name: str, image_size: int | Sequence[int] = 224, *, train_size: int = 224,
          num_classes: int = 1000, width: float = 1.0, fc_features: int | None = None) -> Flops:
  """Analytic multiply-accumulates and FLOPs of one forward pass (convolutions and FC layers; pooling,
  ReLU and normalisation are negligible and not counted). ``image_size`` above ``train_size`` counts the
  dense (fully convolutional) evaluation over the whole image."""
  arch = ARCHS[canonical_name(name)]
  h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if min(h, w) < train_size:
    raise ValueError(f'image size {(h, w)} is below the training size {train_size}')
  cin, macs = 3, 0
  for stage in arch.stages:
    for features, k in stage:
      cout = _scaled(features, width)
      macs += h * w * k * k * cin * cout
      cin = cout
    h, w = h // 2, w // 2
  k6 = max(1, train_size // 32)
  fc = fc_features or _scaled(4096, width)
  h, w = h - k6 + 1, w - k6 + 1
  macs += h * w * (k6 * k6 * cin * fc + fc * fc + fc * num_classes)
  return Flops(macs=macs, flops=2 * macs, score_map=(h, w))
