"""Device-side preprocessing (docs/design.md, decision 4): the host ships uint8, the jitted step does arithmetic.

* ``Normalization``: what turns uint8 RGB pixels into the network's input. The paper subtracts the mean RGB
  of the training set (0-255 scale); torchvision's weights expect [0, 1] with mean/std; Keras' and Caffe's
  expect BGR with the mean subtracted. Imported weights record theirs and vggjax applies it.
* ``pca_lighting``: the random RGB colour shift of Krizhevsky et al. (2012) that the paper uses (3.1).
* ``single_test_scale`` / ``test_scales``: the paper's test scales Q (4.1, 4.2), the one definition that
  validation during training, evaluate, predict and features use.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
# ImageNet's RGB covariance as AlexNet's lighting uses it: eigenvalues of the covariance of pixels on the 0-1
# scale (0.2175, 0.0188, 0.0045), times 255 for images on the 0-255 scale, and eigenvectors (columns).
IMAGENET_EIGVAL = (55.46, 4.794, 1.148)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


@dataclasses.dataclass(frozen=True)
class Normalization:
  """input = (reorder(uint8 RGB) * scale - mean) / std; mean and std are in the network's channel order."""
  mean: tuple[float, float, float] = IMAGENET_MEAN_RGB
  std: tuple[float, float, float] = (1.0, 1.0, 1.0)
  scale: float = 1.0
  color_order: str = 'RGB'

  def __post_init__(self):
    if self.color_order not in ('RGB', 'BGR'):
      raise ValueError(f'color_order must be RGB or BGR, got {self.color_order!r}')
    for field in ('mean', 'std'):
      value = getattr(self, field)
      if len(value) != 3:
        raise ValueError(f'{field} needs 3 values (one per channel), got {value!r}')
      object.__setattr__(self, field, tuple(float(v) for v in value))
    if any(s <= 0 for s in self.std):
      raise ValueError(f'std must be positive, got {self.std}')

  @classmethod
  def from_rgb(cls, mean_rgb, std_rgb=(1.0, 1.0, 1.0), color_order: str = 'RGB') -> 'Normalization':
    """From a mean and std given in R, G, B order (as configs give them), for a network fed `color_order`."""
    if color_order == 'BGR':
      mean_rgb, std_rgb = tuple(mean_rgb)[::-1], tuple(std_rgb)[::-1]
    return cls(mean=tuple(mean_rgb), std=tuple(std_rgb), color_order=color_order)

  def equivalent(self, other: 'Normalization', rtol: float = 1e-3) -> bool:
    """The same input function up to rounding: compares mean and std on the 0-255 scale."""
    return (self.color_order == other.color_order and
            np.allclose(np.divide(self.mean, self.scale), np.divide(other.mean, other.scale), rtol=rtol) and
            np.allclose(np.divide(self.std, self.scale), np.divide(other.std, other.scale), rtol=rtol))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> 'Normalization':
    return cls(**{k: d[k] for k in ('mean', 'std', 'scale', 'color_order') if k in d})


def normalize(images: jax.Array, norm: Normalization = Normalization()) -> jax.Array:
  """uint8 (or float 0-255) RGB images (..., 3) to the network's float32 input."""
  x = images.astype(jnp.float32)
  if norm.color_order == 'BGR':
    x = x[..., ::-1]
  x = x * norm.scale - jnp.asarray(norm.mean, jnp.float32)
  if norm.std != (1.0, 1.0, 1.0):
    x = x / jnp.asarray(norm.std, jnp.float32)
  return x


def pca_lighting(rng: jax.Array, images: jax.Array, alpha_std: float = 0.1,
                 eigval: Sequence[float] = IMAGENET_EIGVAL,
                 eigvec: Sequence[Sequence[float]] = IMAGENET_EIGVEC) -> jax.Array:
  """AlexNet's colour shift: adds eigvec @ (alpha * eigval), alpha ~ N(0, alpha_std) per image, to every
  pixel of float RGB images (N, H, W, 3) on the 0-255 scale. The shift's covariance is
  alpha_std^2 * V diag(eigval^2) V^T."""
  if alpha_std == 0:
    return images
  alpha = alpha_std * jax.random.normal(rng, (images.shape[0], 3), jnp.float32)
  shift = (alpha * jnp.asarray(eigval, jnp.float32)) @ jnp.asarray(eigvec, jnp.float32).T
  return images + shift[:, None, None, :].astype(images.dtype)


def rgb_covariance_eig(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """A dataset's own lighting statistics in IMAGENET_EIGVAL's convention: the eigenvalues (descending) of the
  RGB covariance of pixels on the 0-1 scale, times 255, and the eigenvectors (columns)."""
  pixels = np.asarray(images, np.float64).reshape(-1, 3) / 255.0
  w, v = np.linalg.eigh(np.cov(pixels, rowvar=False))
  order = np.argsort(w)[::-1]
  return np.maximum(w[order], 0) * 255.0, v[:, order]


def single_test_scale(scale_min: int, scale_max: int) -> int:
  """The paper's single test scale (4.1): Q = S for a fixed S, Q = 0.5 (Smin + Smax) for a jittered S,
  rounded half up when the sum is odd ([256, 511] -> 384)."""
  return (int(scale_min) + int(scale_max) + 1) // 2


def test_scales(scale_min: int, scale_max: int, multiscale: bool = False) -> tuple[int, ...]:
  """The paper's test scales: (Q,), or with ``multiscale`` (4.2) {S - 32, S, S + 32} for a fixed S and
  {Smin, Q, Smax} for a jittered S. Callers drop scales below their net's training size."""
  smin, smax = int(scale_min), int(scale_max)
  q = single_test_scale(smin, smax)
  if not multiscale:
    return (q,)
  return (smin - 32, smin, smin + 32) if smin == smax else (smin, q, smax)
