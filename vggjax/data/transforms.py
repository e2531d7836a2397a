"""Host-side image transforms: decode, isotropic rescale, crops and flips (paper sections 3.1 and 3.2).

Everything here works on uint8 RGB arrays (H, W, 3) and returns uint8: the cast, the mean subtraction and the
PCA colour shift run on the device (``vggjax.preprocessing``, docs/design.md, decision 4).

Semantics, exactly:

* ``rescale(image, s)``: isotropic; the smaller side becomes exactly ``s`` and the larger one
  ``floor(L * s / min(H, W) + 0.5)``. Interpolation: OpenCV bilinear (``INTER_LINEAR``, as Caffe's
  ``cv::resize``) when enlarging or shrinking by less than 2x; OpenCV ``INTER_AREA`` (pixel-area averaging, no
  aliasing) when shrinking by 2x or more.
* ``train_transform``: S ~ U{scale_min..scale_max} (integers, both ends included; fixed when equal),
  rescale to S, a crop of ``image_size`` whose top-left corner is uniform over all valid positions, then a
  horizontal flip with probability 1/2. The draws, in this order, come from the generator passed in, which
  the pipeline derives from (seed, epoch, index) with ``example_rng``.
* ``eval_transform``: rescale to Q, the central ``image_size`` crop (offsets ``(H - size) // 2``).

Fast decoding. ``decode`` reads JPEG with simplejpeg (libjpeg-turbo) and everything else, or what simplejpeg
refuses (CMYK, arithmetic coding, ...), with Pillow. When the transforms get encoded bytes and the JPEG's
smaller side is at least twice the target S, libjpeg decodes it directly at 1/2, 1/4 or 1/8 size (DCT-domain
scaling, an antialiased reduction) and bilinear finishes the rescale to the exact target size. The geometry is
identical to full decoding (same output size, same crop window, same flip, same random draws); pixel values
differ from a full decode + ``INTER_AREA`` by a few levels on average (about 1-5 of 255 on detailed photos).
Pass ``dct_scaling=False`` for a full decode every time.

Grayscale images are expanded to 3 channels, alpha is dropped, palette/CMYK images are converted to RGB.
"""

from __future__ import annotations

import io
from typing import Union

import cv2
import numpy as np
import simplejpeg
from PIL import Image

RngOrSeed = Union[np.random.Generator, int, tuple, list, None]
ImageOrBytes = Union[np.ndarray, bytes]

_JPEG_SOI = b'\xff\xd8'


class DecodeError(ValueError):
  """An image that cannot be decoded (corrupt, truncated, not an image)."""


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The generator of every random choice for one example: a pure function of (seed, epoch, index)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), int(index)])


def _as_rng(rng: RngOrSeed) -> np.random.Generator:
  if isinstance(rng, np.random.Generator):
    return rng
  return np.random.default_rng(rng)


# ----------------------------------------------------------------------------------------------------------
# Decoding.


def to_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to (H, W, 3): gray repeated, alpha dropped."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise TypeError(f'expected a uint8 image, got {image.dtype}')
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
    raise ValueError(f'expected an (H, W[, 1|3|4]) image, got shape {image.shape}')
  if image.shape[2] == 1:
    return np.repeat(image, 3, axis=2)
  if image.shape[2] == 4:
    return np.ascontiguousarray(image[:, :, :3])
  return image


def is_jpeg(data: bytes) -> bool:
  return data[:2] == _JPEG_SOI


def dimensions(data: ImageOrBytes) -> tuple[int, int]:
  """(height, width) of an array or of encoded bytes (from the header only, where the format allows)."""
  if isinstance(data, np.ndarray):
    return data.shape[0], data.shape[1]
  if is_jpeg(data):
    try:
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
      return h, w
    except ValueError:
      pass
  try:
    with Image.open(io.BytesIO(data)) as im:
      return im.height, im.width
  except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data
    raise DecodeError(f'not a readable image: {e}') from e


def _decode_pillow(data: bytes, min_side: int = 0) -> np.ndarray:
  try:
    with Image.open(io.BytesIO(data)) as im:
      if min_side and im.format == 'JPEG':
        # Pillow's DCT scaling (the same libjpeg feature) for JPEGs simplejpeg could not read.
        scale = min(im.width, im.height) / min_side
        if scale >= 2:
          im.draft('RGB', (int(np.ceil(im.width / scale)), int(np.ceil(im.height / scale))))
      if im.mode not in ('RGB', 'L'):
        im = im.convert('RGBA' if 'A' in im.mode or im.mode == 'P' else 'RGB')
      image = np.asarray(im)
  except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data
    raise DecodeError(f'not a readable image: {e}') from e
  if image.dtype != np.uint8:  # 16-bit or float images (rare): scale to 0-255
    image = np.clip(image.astype(np.float64) / max(1.0, float(image.max())) * 255.0, 0, 255)
    image = image.round().astype(np.uint8)
  return to_rgb(image)


def decode(data: bytes, min_side: int = 0) -> np.ndarray:
  """Encoded bytes to uint8 RGB (H, W, 3). Raises DecodeError for corrupt, truncated or unknown data.

  min_side > 0 allows DCT-domain scaling of a JPEG to 1/2, 1/4 or 1/8 size as long as the smaller side stays
  >= min_side (see the module docstring); 0 decodes at full size.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f'decode expects encoded bytes, got {type(data).__name__}')
  data = bytes(data)
  if is_jpeg(data):
    try:
      kwargs = {}
      if min_side:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data)
        factor = _dct_factor(min(h, w), min_side)
        if factor > 1:
          kwargs = dict(min_height=-(-h // factor), min_width=-(-w // factor))
      return simplejpeg.decode_jpeg(data, colorspace='RGB', strict=True, **kwargs)
    except ValueError:
      pass  # CMYK, progressive oddities, truncated data: Pillow decides (and raises for real corruption)
  return _decode_pillow(data, min_side)


def _dct_factor(smaller_side: int, target: int) -> int:
  """The largest of 8, 4, 2 that keeps the smaller side >= target after DCT scaling (1 if none)."""
  for factor in (8, 4, 2):
    if -(-smaller_side // factor) >= target:
      return factor
  return 1


def load(data: ImageOrBytes, min_side: int = 0, dct_scaling: bool = True) -> np.ndarray:
  """An array (returned as RGB) or encoded bytes (decoded, with DCT scaling if allowed) to uint8 RGB."""
  if isinstance(data, np.ndarray):
    return to_rgb(data)
  return decode(data, min_side if dct_scaling else 0)


# ----------------------------------------------------------------------------------------------------------
# Geometry.


def rescaled_size(height: int, width: int, smaller_side: int) -> tuple[int, int]:
  """(height, width) after an isotropic rescale that makes the smaller side `smaller_side`."""
  m = min(height, width)
  if height <= width:
    return smaller_side, max(smaller_side, int(width * smaller_side / m + 0.5))
  return max(smaller_side, int(height * smaller_side / m + 0.5)), smaller_side


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (H, W, 3) to (height, width, 3): bilinear, or pixel-area averaging when shrinking by 2x or more."""
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image
  shrink = min(h / height, w / width)
  interp = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
  out = cv2.resize(image, (width, height), interpolation=interp)
  return out if out.ndim == 3 else out[:, :, None]


def rescale(image: np.ndarray, smaller_side: int) -> np.ndarray:
  """Isotropic rescale of a uint8 RGB image so that its smaller side is `smaller_side`."""
  if smaller_side < 1:
    raise ValueError(f'smaller_side must be positive, got {smaller_side}')
  h, w = image.shape[:2]
  return resize(image, *rescaled_size(h, w, smaller_side))


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  if not (0 <= top <= h - size and 0 <= left <= w - size):
    raise ValueError(f'a {size}x{size} crop at ({top}, {left}) does not fit a {h}x{w} image')
  return image[top:top + size, left:left + size]


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """The central size x size crop (top = (H - size) // 2, left = (W - size) // 2)."""
  h, w = image.shape[:2]
  if min(h, w) < size:
    raise ValueError(f'cannot take a {size}x{size} crop of a {h}x{w} image')
  return crop(image, (h - size) // 2, (w - size) // 2, size)


def random_crop(image: np.ndarray, size: int, rng: RngOrSeed) -> np.ndarray:
  """A size x size crop whose top-left corner is uniform over the valid positions (top drawn first)."""
  h, w = image.shape[:2]
  if min(h, w) < size:
    raise ValueError(f'cannot take a {size}x{size} crop of a {h}x{w} image')
  rng = _as_rng(rng)
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return crop(image, top, left, size)


def flip(image: np.ndarray) -> np.ndarray:
  """Horizontal (left-right) flip."""
  return image[:, ::-1]


# ----------------------------------------------------------------------------------------------------------
# The paper's transforms.


def validate_scales(image_size: int, scale_min: int, scale_max: int) -> None:
  if not 1 <= image_size <= scale_min <= scale_max:
    raise ValueError(f'need 1 <= image_size <= scale_min <= scale_max, got image_size={image_size}, '
                     f'scale_min={scale_min}, scale_max={scale_max}: the crop must fit the rescaled image')


def train_params(height: int, width: int, rng: RngOrSeed, *, image_size: int = 224, scale_min: int = 256,
                 scale_max: int = 256, random_flip: bool = True) -> tuple[int, int, int, bool]:
  """The random choices of ``train_transform`` for an image of height x width: (S, top, left, flipped).

  Draws, in order: S ~ U{scale_min..scale_max} (only if scale_min < scale_max), the crop's top and left
  (uniform over the valid positions of the image rescaled to S), the flip (probability 1/2, only if
  random_flip)."""
  validate_scales(image_size, scale_min, scale_max)
  rng = _as_rng(rng)
  s = scale_min if scale_min == scale_max else int(rng.integers(scale_min, scale_max + 1))
  h, w = rescaled_size(height, width, s)
  top = int(rng.integers(0, h - image_size + 1))
  left = int(rng.integers(0, w - image_size + 1))
  flipped = bool(random_flip) and bool(rng.random() < 0.5)
  return s, top, left, flipped


def train_transform(image: ImageOrBytes, rng: RngOrSeed, *, image_size: int = 224, scale_min: int = 256,
                    scale_max: int = 256, random_flip: bool = True, dct_scaling: bool = True) -> np.ndarray:
  """The paper's training crop (section 3.1) as uint8 (image_size, image_size, 3):
  ``crop(rescale(image, S), top, left, image_size)``, flipped or not, with ``train_params``' choices.

  image: uint8 (H, W[, C]) or encoded bytes. rng: a Generator, or a seed for one.
  """
  return np.ascontiguousarray(train_transform_view(image, rng, image_size=image_size, scale_min=scale_min,
                                                   scale_max=scale_max, random_flip=random_flip,
                                                   dct_scaling=dct_scaling))


def train_transform_view(image: ImageOrBytes, rng: RngOrSeed, *, image_size: int = 224,
                         scale_min: int = 256, scale_max: int = 256, random_flip: bool = True,
                         dct_scaling: bool = True) -> np.ndarray:
  """``train_transform`` as a (possibly non-contiguous) view, for copying straight into a batch."""
  h0, w0 = dimensions(image)
  s, top, left, flipped = train_params(h0, w0, rng, image_size=image_size, scale_min=scale_min,
                                       scale_max=scale_max, random_flip=random_flip)
  h, w = rescaled_size(h0, w0, s)
  out = resize(load(image, s, dct_scaling), h, w)[top:top + image_size, left:left + image_size]
  return out[:, ::-1] if flipped else out


def eval_transform(image: ImageOrBytes, *, image_size: int = 224, scale: int = 256,
                   dct_scaling: bool = True) -> np.ndarray:
  """Rescale so the smaller side is Q = scale, then the central image_size crop (uint8)."""
  validate_scales(image_size, scale, scale)
  h, w = rescaled_size(*dimensions(image), scale)
  out = resize(load(image, scale, dct_scaling), h, w)
  return np.ascontiguousarray(center_crop(out, image_size))

