"""The image conventions of vggjax, in one module: decode (EXIF orientation applied), isotropic rescale of
the smaller side, crops and flips (paper sections 3.1 and 3.2). Training, validation, ``vggjax.evaluate``,
``vggjax.predict``, ``vggjax.features``, transfer and localisation all read and rescale images here
(docs/design.md, decision 30).
It is a little over 400 lines on purpose: decoding, EXIF, geometry and the paper's transforms are one
convention, and splitting them would bring back the two stacks this module replaced.

Everything here works on uint8 RGB arrays (H, W, 3) and returns uint8: the cast, the mean subtraction and the
PCA colour shift run on the device (``vggjax.preprocessing``, docs/design.md, decision 4).

Two styles of rescaling and cropping, chosen with ``style=``:

* ``'caffe'`` (the default; training, validation, evaluate, localisation): OpenCV, as Caffe's data layer;
* ``'torchvision'`` (predict, features, transfer): Pillow bilinear, antialiased when shrinking, the longer
  side truncated (``int(L * s / min(H, W))``) and the central crop at ``round((H - size) / 2)``: exactly
  torchvision's ``Resize(s)`` + ``CenterCrop(size)`` of a PIL image, what converted torchvision weights saw.

EXIF orientation. A photo whose EXIF orientation tag says it was taken rotated or mirrored is turned upright
when decoded (as Pillow's ``ImageOps.exif_transpose``), and ``dimensions`` reports the upright size: every
path that decodes an image file (training, evaluation, predict, features) sees the same upright pixels.

Semantics of the Caffe style, exactly:

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
import os
import pathlib
from collections.abc import Iterable
from typing import Union

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from vggjax import cli

RngOrSeed = Union[np.random.Generator, int, tuple, list, None]
ImageOrBytes = Union[np.ndarray, bytes]

STYLES = ('caffe', 'torchvision')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')

_JPEG_SOI = b'\xff\xd8'


class DecodeError(cli.UnreadableInput):
  """An image that cannot be decoded (corrupt, truncated, not an image); a ValueError, and for the commands
  an unreadable input (exit status cli.EXIT_UNREADABLE)."""


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


# ----------------------------------------------------------------------------------------------------------
# EXIF orientation.

_ORIENTATION_TAG = 0x0112


def jpeg_orientation(data: bytes) -> int:
  """The EXIF orientation (1-8; 1 = upright, also when there is no tag) of JPEG bytes, from the APP1 segment
  before the image data (a few hundred bytes read; malformed EXIF counts as upright)."""
  pos, n = 2, len(data)
  try:
    while pos + 4 <= n and data[pos] == 0xFF:
      marker = data[pos + 1]
      if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
        pos += 2
        continue
      if marker == 0xFF:  # fill byte
        pos += 1
        continue
      if marker in (0xDA, 0xD9):  # start of scan / end of image: no EXIF after this
        return 1
      length = int.from_bytes(data[pos + 2:pos + 4], 'big')
      if marker == 0xE1 and data[pos + 4:pos + 10] == b'Exif\x00\x00':
        return _tiff_orientation(data[pos + 10:pos + 2 + length])
      pos += 2 + length
  except (IndexError, ValueError):
    pass
  return 1


def _tiff_orientation(tiff: bytes) -> int:
  order = {b'II': 'little', b'MM': 'big'}.get(tiff[:2])
  if order is None:
    return 1
  u16 = lambda b: int.from_bytes(b, order)  # noqa: E731
  ifd = int.from_bytes(tiff[4:8], order)
  count = u16(tiff[ifd:ifd + 2])
  for k in range(count):
    entry = tiff[ifd + 2 + 12 * k:ifd + 14 + 12 * k]
    if len(entry) < 12:
      break
    if u16(entry[:2]) == _ORIENTATION_TAG:
      value = u16(entry[8:10])
      return value if 1 <= value <= 8 else 1
  return 1


def _pillow_orientation(im) -> int:
  try:
    value = int(im.getexif().get(_ORIENTATION_TAG, 1))
  except Exception:  # noqa: BLE001 - malformed EXIF: upright
    return 1
  return value if 1 <= value <= 8 else 1


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
  """The upright image of one stored with EXIF `orientation` (1-8), as Pillow's ImageOps.exif_transpose."""
  if orientation == 2:
    return image[:, ::-1]
  if orientation == 3:
    return image[::-1, ::-1]
  if orientation == 4:
    return image[::-1]
  if orientation == 5:  # transpose
    return np.swapaxes(image, 0, 1)
  if orientation == 6:  # rotate 90 degrees clockwise
    return np.swapaxes(image, 0, 1)[:, ::-1]
  if orientation == 7:  # transverse
    return np.swapaxes(image, 0, 1)[::-1, ::-1]
  if orientation == 8:  # rotate 90 degrees counter-clockwise
    return np.swapaxes(image, 0, 1)[::-1]
  return image


def dimensions(data: ImageOrBytes) -> tuple[int, int]:
  """(height, width) of an array or of encoded bytes, upright (EXIF orientation applied), from the header
  only where the format allows."""
  if isinstance(data, np.ndarray):
    return data.shape[0], data.shape[1]
  if is_jpeg(data):
    try:
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
      return (w, h) if jpeg_orientation(data) >= 5 else (h, w)
    except ValueError:
      pass
  try:
    with Image.open(io.BytesIO(data)) as im:
      return (im.width, im.height) if _pillow_orientation(im) >= 5 else (im.height, im.width)
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
      orientation = _pillow_orientation(im)
      if im.mode not in ('RGB', 'L'):
        im = im.convert('RGBA' if 'A' in im.mode or im.mode == 'P' else 'RGB')
      image = np.asarray(im)
  except Exception as e:  # noqa: BLE001 - Pillow raises many types on bad data
    raise DecodeError(f'not a readable image: {e}') from e
  if image.dtype != np.uint8:  # 16-bit or float images (rare): scale to 0-255
    image = np.clip(image.astype(np.float64) / max(1.0, float(image.max())) * 255.0, 0, 255)
    image = image.round().astype(np.uint8)
  return _upright(to_rgb(image), orientation)


def _upright(image: np.ndarray, orientation: int) -> np.ndarray:
  return image if orientation == 1 else np.ascontiguousarray(orient(image, orientation))


def decode(data: bytes, min_side: int = 0) -> np.ndarray:
  """Encoded bytes to upright uint8 RGB (H, W, 3) (EXIF orientation applied). Raises DecodeError for corrupt,
  truncated or unknown data.

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
      image = simplejpeg.decode_jpeg(data, colorspace='RGB', strict=True, **kwargs)
      return _upright(image, jpeg_orientation(data))
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
# Image files.


def load_image(path: str | os.PathLike) -> np.ndarray:
  """An image file as upright uint8 RGB (H, W, 3) (its EXIF orientation applied)."""
  with open(path, 'rb') as f:
    return decode(f.read())


def as_image(image) -> np.ndarray:
  """A uint8 RGB array (H, W, 3) from an array or an image file's path."""
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'expected an RGB image (H, W, 3), got shape {image.shape}')
  return image


def list_images(paths: Iterable[str | os.PathLike]) -> list[str]:
  """Image files among ``paths``: files as given, folders searched recursively (sorted)."""
  out = []
  for p in paths:
    p = pathlib.Path(p)
    if p.is_dir():
      out += sorted(str(f) for f in p.rglob('*') if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    elif p.is_file():
      out.append(str(p))
    else:
      raise FileNotFoundError(f'no image or folder {p}')
  return out


# ----------------------------------------------------------------------------------------------------------
# Geometry.


def check_style(style: str) -> None:
  if style not in STYLES:
    raise ValueError(f'unknown image style {style!r}; valid: {", ".join(STYLES)}')


def rescaled_size(height: int, width: int, smaller_side: int, style: str = 'caffe') -> tuple[int, int]:
  """(height, width) after an isotropic rescale that makes the smaller side `smaller_side`: the longer side
  rounded (caffe) or truncated as torchvision's Resize does (torchvision)."""
  check_style(style)
  m = min(height, width)
  if style == 'torchvision':
    long = int(smaller_side * max(height, width) / m)
    return (smaller_side, long) if height <= width else (long, smaller_side)
  if height <= width:
    return smaller_side, max(smaller_side, int(width * smaller_side / m + 0.5))
  return max(smaller_side, int(height * smaller_side / m + 0.5)), smaller_side


def resize(image: np.ndarray, height: int, width: int, style: str = 'caffe') -> np.ndarray:
  """uint8 (H, W, 3) to (height, width, 3). caffe: OpenCV bilinear, or pixel-area averaging when shrinking by
  2x or more; torchvision: Pillow bilinear (antialiased when shrinking, as torchvision's Resize of a PIL
  image)."""
  check_style(style)
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image
  if style == 'torchvision':
    return np.asarray(Image.fromarray(np.asarray(image, np.uint8)).resize((width, height), Image.BILINEAR))
  shrink = min(h / height, w / width)
  interp = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
  out = cv2.resize(image, (width, height), interpolation=interp)
  return out if out.ndim == 3 else out[:, :, None]


def rescale(image: np.ndarray, smaller_side: int, style: str = 'caffe') -> np.ndarray:
  """Isotropic rescale of a uint8 RGB image so that its smaller side is `smaller_side`."""
  if smaller_side < 1:
    raise ValueError(f'smaller_side must be positive, got {smaller_side}')
  h, w = image.shape[:2]
  return resize(image, *rescaled_size(h, w, smaller_side, style), style=style)


def crop(image: np.ndarray, top: int, left: int, size: int) -> np.ndarray:
  h, w = image.shape[:2]
  if not (0 <= top <= h - size and 0 <= left <= w - size):
    raise ValueError(f'a {size}x{size} crop at ({top}, {left}) does not fit a {h}x{w} image')
  return image[top:top + size, left:left + size]


def center_crop(image: np.ndarray, size: int, style: str = 'caffe') -> np.ndarray:
  """The central size x size crop: top = (H - size) // 2, left = (W - size) // 2 (caffe), or
  round((H - size) / 2) and round((W - size) / 2) (torchvision's CenterCrop)."""
  check_style(style)
  h, w = image.shape[:2]
  if min(h, w) < size:
    raise ValueError(f'cannot take a {size}x{size} crop of a {h}x{w} image')
  if style == 'torchvision':
    return crop(image, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size)
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

