"""Host transforms (paper 3.1/3.2) and the colour shift's statistics, on real photographs."""

import io

import jax
import numpy as np
import pytest
from PIL import Image

from vggjax import preprocessing
from vggjax.data import transforms


def _jpeg(image: np.ndarray, quality: int = 92, **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'JPEG', quality=quality, **kw)
  return buf.getvalue()


def _png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'PNG')
  return buf.getvalue()


@pytest.mark.parametrize('shape,s,expected', [((427, 640), 256, (256, 384)), ((640, 427), 256, (384, 256)),
                                              ((375, 500), 224, (224, 299)), ((8, 8), 36, (36, 36)),
                                              ((300, 301), 150, (150, 151))])
def test_rescale_is_isotropic_with_the_smaller_side_exact(shape, s, expected):
  image = np.zeros(shape + (3,), np.uint8)
  assert transforms.rescaled_size(*shape, s) == expected
  assert transforms.rescale(image, s).shape == expected + (3,)


def test_rescale_interpolation_keeps_the_picture(real_photos):
  photo = real_photos[0]
  small = transforms.rescale(photo, 64)  # shrink >= 2x: pixel-area averaging
  pil = np.asarray(Image.fromarray(photo).resize(small.shape[1::-1], Image.BILINEAR), np.float64)
  assert np.abs(small - pil).mean() < 4  # both antialiased: close to Pillow's
  mild = transforms.rescale(photo, 300)  # shrink < 2x: bilinear
  assert np.abs(mild.astype(np.float64).mean((0, 1)) - photo.mean((0, 1))).max() < 2
  # Pixel by pixel against Pillow's bilinear (a wrong axis, offset or interpolation moves edges by pixels).
  pil = np.asarray(Image.fromarray(photo).resize(mild.shape[1::-1], Image.BILINEAR), np.float64)
  assert np.abs(mild - pil).mean() < 4 and np.percentile(np.abs(mild - pil), 99) < 40
  shifted = np.roll(pil, 1, axis=1)
  assert np.abs(mild - shifted).mean() > 1.5 * np.abs(mild - pil).mean()  # the bound tells a 1-pixel shift


def test_crops_and_flip():
  image = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
  np.testing.assert_array_equal(transforms.center_crop(image, 4), image[1:5, 2:6])
  np.testing.assert_array_equal(transforms.flip(image)[:, 0], image[:, -1])
  crop = transforms.random_crop(image, 4, 0)
  assert crop.shape == (4, 4, 3)
  with pytest.raises(ValueError):
    transforms.center_crop(image, 7)


def test_train_params_statistics():
  """S uniform over [Smin, Smax] (both ends), crops inside the rescaled image and every position reachable,
  flips with probability 1/2."""
  n, smin, smax, size = 4000, 256, 264, 224
  params = [transforms.train_params(375, 500, transforms.example_rng(7, 0, i), image_size=size,
                                    scale_min=smin, scale_max=smax) for i in range(n)]
  s = np.array([p[0] for p in params])
  assert s.min() == smin and s.max() == smax
  counts = np.bincount(s - smin, minlength=smax - smin + 1)
  expected = n / (smax - smin + 1)
  assert ((counts - expected) ** 2 / expected).sum() < 30  # chi-square, 8 dof: p ~ 2e-4 at 30
  for (si, top, left, _) in params:
    h, w = transforms.rescaled_size(375, 500, si)
    assert 0 <= top <= h - size and 0 <= left <= w - size
  fixed = [p for p in params if p[0] == smin]
  h, w = transforms.rescaled_size(375, 500, smin)
  assert {p[1] for p in fixed} == set(range(h - size + 1))  # all 33 tops reached
  flips = np.mean([p[3] for p in params])
  assert abs(flips - 0.5) < 4 * np.sqrt(0.25 / n)
  assert not any(transforms.train_params(375, 500, i, scale_min=256, random_flip=False)[3] for i in range(50))


def test_train_transform_is_its_params_applied(real_photos):
  photo = real_photos[1]
  for seed in range(6):
    s, top, left, flipped = transforms.train_params(*photo.shape[:2], seed, image_size=224, scale_min=256,
                                                    scale_max=384)
    expected = transforms.crop(transforms.rescale(photo, s), top, left, 224)
    if flipped:
      expected = transforms.flip(expected)
    got = transforms.train_transform(photo, seed, image_size=224, scale_min=256, scale_max=384)
    assert got.dtype == np.uint8 and got.shape == (224, 224, 3)
    np.testing.assert_array_equal(got, expected)


def test_train_transform_on_jpeg_bytes_matches_decoded_geometry(real_photos):
  """Bytes in (decoded late, DCT-scaled when S <= half the smaller side): same geometry, close pixels."""
  photo = real_photos[0]
  data = _jpeg(photo)
  decoded = transforms.decode(data)
  for seed, (smin, smax) in enumerate([(256, 256), (64, 100), (32, 40)]):
    size = min(smin, 224) if smin >= 224 else smin - 8
    a = transforms.train_transform(data, seed, image_size=size, scale_min=smin, scale_max=smax)
    full = transforms.train_transform(data, seed, image_size=size, scale_min=smin, scale_max=smax,
                                      dct_scaling=False)
    ref = transforms.train_transform(decoded, seed, image_size=size, scale_min=smin, scale_max=smax)
    np.testing.assert_array_equal(full, ref)
    assert a.shape == ref.shape
    # DCT scaling happens exactly when S <= half the smaller side (427 / 2): another decode, other pixels.
    assert np.array_equal(a, full) == (smin > 427 // 2), smin
    assert np.abs(a.astype(np.float64) - ref).mean() < 10  # DCT scaling: a different antialiasing filter
    corr = np.corrcoef(a.ravel(), ref.ravel())[0, 1]
    assert corr > 0.9


def test_decode_formats_and_failures(real_photos):
  photo = real_photos[2][:120, :160]
  np.testing.assert_allclose(transforms.decode(_jpeg(photo, 98)).astype(float), photo, atol=40)
  np.testing.assert_array_equal(transforms.decode(_png(photo)), photo)
  gray = photo.mean(-1).astype(np.uint8)
  g = transforms.decode(_png(gray))
  assert g.shape == photo.shape and (g[..., 0] == gray).all() and (g[..., 2] == gray).all()
  assert transforms.decode(_jpeg(gray)).shape == photo.shape
  rgba = np.concatenate([photo, np.full(photo.shape[:2] + (1,), 128, np.uint8)], -1)
  np.testing.assert_array_equal(transforms.decode(_png(rgba)), photo)
  cmyk = Image.fromarray(photo).convert('CMYK')  # simplejpeg refuses CMYK: Pillow decodes it
  buf = io.BytesIO()
  cmyk.save(buf, 'JPEG', quality=95)
  assert np.abs(transforms.decode(buf.getvalue()).astype(float) - photo).mean() < 12
  data = _jpeg(photo)
  for bad in (data[:len(data) // 2], b'\xff\xd8garbage' * 10, b'not an image', b''):
    with pytest.raises(transforms.DecodeError):
      transforms.decode(bad)


def test_eval_transform_is_rescale_then_center_crop(real_photos):
  photo = real_photos[1]
  got = transforms.eval_transform(photo, image_size=224, scale=256)
  np.testing.assert_array_equal(got, transforms.center_crop(transforms.rescale(photo, 256), 224))
  digit = np.eye(8, dtype=np.uint8) * 255
  assert transforms.eval_transform(digit, image_size=32, scale=36).shape == (32, 32, 3)


def test_example_rng_depends_on_seed_epoch_index():
  draws = {k: transforms.example_rng(*k).integers(0, 2**62) for k in [(0, 0, 0), (1, 0, 0), (0, 1, 0),
                                                                      (0, 0, 1)]}
  assert len(set(draws.values())) == 4
  again = [transforms.example_rng(3, 4, 5).integers(0, 2**62) for _ in range(2)]
  assert again[0] == again[1]


# ----------------------------------------------------------------------------------------------------------
# The colour shift (vggjax.preprocessing, applied on the device) against its eigen-decomposition.


def test_colour_shift_constants_are_the_published_imagenet_ones():
  """AlexNet's ImageNet RGB eigen-decomposition as fb.resnet.torch publishes it (0-1 pixel scale; vggjax's
  eigenvalues are on the 0-255 scale), typed in here rather than read from the module."""
  published_eigval = np.array([0.2175, 0.0188, 0.0045]) * 255
  published_eigvec = np.array([[-0.5675, 0.7192, 0.4009],
                               [-0.5808, -0.0045, -0.8140],
                               [-0.5836, -0.6948, 0.4203]])
  np.testing.assert_allclose(preprocessing.IMAGENET_EIGVAL, published_eigval, rtol=2e-3)
  np.testing.assert_array_equal(np.asarray(preprocessing.IMAGENET_EIGVEC), published_eigvec)
  # Orthonormal to the 4 published digits (that the columns are the eigenvectors: the covariance test below).
  v = np.asarray(preprocessing.IMAGENET_EIGVEC)
  np.testing.assert_allclose(v.T @ v, np.eye(3), atol=2e-3)


def test_pca_lighting_shift_covariance_matches_the_eigendecomposition():
  n, alpha_std = 20000, 0.1
  zeros = jax.numpy.zeros((n, 1, 1, 3), jax.numpy.float32)
  shifts = np.asarray(preprocessing.pca_lighting(jax.random.key(0), zeros, alpha_std)).reshape(n, 3)
  v = np.asarray(preprocessing.IMAGENET_EIGVEC, np.float64)
  lam = np.asarray(preprocessing.IMAGENET_EIGVAL, np.float64)
  expected = alpha_std ** 2 * v @ np.diag(lam ** 2) @ v.T
  got = np.cov(shifts, rowvar=False)
  # In the eigenbasis: variances alpha^2 lambda_i^2 (sampling error ~ sqrt(2/n) = 1%), no correlations.
  in_basis = v.T @ got @ v
  np.testing.assert_allclose(np.diag(in_basis), np.diag(v.T @ expected @ v), rtol=0.05)
  off = in_basis - np.diag(np.diag(in_basis))
  assert np.abs(off).max() < 0.05 * np.sqrt(np.outer(np.diag(in_basis), np.diag(in_basis))).max()
  assert np.abs(shifts.mean(0)).max() < 4 * alpha_std * lam[0] / np.sqrt(n)
  # The same shift is added to every pixel of an image.
  images = jax.numpy.ones((4, 5, 6, 3)) * 100
  out = np.asarray(preprocessing.pca_lighting(jax.random.key(1), images, alpha_std))
  assert np.allclose(out, out[:, :1, :1, :])
  assert preprocessing.pca_lighting(jax.random.key(1), images, 0.0) is images


def test_rgb_covariance_eig_of_real_photos(real_photos):
  pixels = np.concatenate([p.reshape(-1, 3) for p in real_photos]).astype(np.float64)
  eigval, eigvec = preprocessing.rgb_covariance_eig(pixels.reshape(-1, 1, 3).astype(np.uint8))
  assert np.all(np.diff(eigval) <= 0) and eigval[-1] >= 0
  np.testing.assert_allclose(eigvec.T @ eigvec, np.eye(3), atol=1e-9)
  cov = np.cov(pixels / 255.0, rowvar=False)
  np.testing.assert_allclose(eigvec @ np.diag(eigval / 255.0) @ eigvec.T, cov, rtol=1e-6, atol=1e-9)
  # Natural photos: one dominant, all-positive (brightness) component, like ImageNet's.
  assert eigval[0] > 3 * eigval[1]
  assert abs(abs(eigvec[:, 0] @ np.ones(3) / np.sqrt(3)) - 1) < 0.1


def _with_orientation(image: np.ndarray, orientation: int, fmt: str = 'JPEG') -> bytes:
  """The image saved with an EXIF orientation tag (the pixels stored as they are, the tag saying how to turn
  them upright), as a camera does."""
  pil = Image.fromarray(image)
  exif = pil.getexif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  pil.save(buf, fmt, exif=exif.tobytes(), **({'quality': 92} if fmt == 'JPEG' else {}))
  return buf.getvalue()


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_decode_applies_every_exif_orientation_as_pillow(real_photos, fmt):
  from PIL import ImageOps
  photo = transforms.rescale(real_photos[0], 60)  # 60x90: not square, so rotations change the shape
  for orientation in range(1, 9):
    data = _with_orientation(photo, orientation, fmt)
    with Image.open(io.BytesIO(data)) as im:
      upright = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
    assert transforms.dimensions(data) == upright.shape[:2], orientation
    np.testing.assert_array_equal(transforms.decode(data), upright, err_msg=f'orientation {orientation}')
    if fmt == 'JPEG':
      assert transforms.jpeg_orientation(data) == orientation


def test_a_rotated_photo_is_upright_in_training_evaluation_and_predict(real_photos, tmp_path):
  """A real photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise), read from an image
  folder: training's crop, the evaluation's rescaled image and predict's decoded file are those of the upright
  photo."""
  from PIL import ImageOps

  from vggjax.data import sources
  from vggjax.evaluation import planning
  photo = real_photos[1]  # 427x640, landscape
  (tmp_path / 'train' / 'flower').mkdir(parents=True)
  path = tmp_path / 'train' / 'flower' / 'sideways.jpg'
  path.write_bytes(_with_orientation(photo, 6))
  with Image.open(path) as im:
    upright = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
  assert upright.shape[:2] == photo.shape[1::-1]  # portrait once turned
  source = sources.FolderSource(tmp_path, 'train')
  data, _ = source.record(0)

  # Training: the random crop of the decoded file is the crop of the upright photo (same draws).
  kw = dict(image_size=96, scale_min=128, scale_max=160, dct_scaling=False)
  for seed in range(3):
    np.testing.assert_array_equal(transforms.train_transform(data, seed, **kw),
                                  transforms.train_transform(upright, seed, **kw))
  np.testing.assert_array_equal(transforms.eval_transform(data, image_size=96, scale=128, dct_scaling=False),
                                transforms.eval_transform(upright, image_size=96, scale=128))
  assert transforms.train_transform(data, 0, **dict(kw, dct_scaling=True)).shape == (96, 96, 3)

  # Evaluation: the reader's dimensions and rescaled image are the upright photo's.
  reader = planning._Reader(source, dct_scaling=False)  # noqa: SLF001
  h, w, _ = reader.dims(0)
  assert (h, w) == upright.shape[:2]
  np.testing.assert_array_equal(reader.rescaled(0, 128, h, w), transforms.rescale(upright, 128))

  # predict and features: the decoded file.
  np.testing.assert_array_equal(transforms.as_image(path), upright)
  np.testing.assert_array_equal(transforms.as_image(str(path)), upright)


def test_torchvision_style_is_torchvisions_resize_and_center_crop(real_photos):
  photo = real_photos[0]
  pil = Image.fromarray(photo)
  w, h = pil.size
  size = 100
  long = int(size * max(w, h) / min(w, h))
  expected = np.asarray(pil.resize((long, size) if h <= w else (size, long), Image.BILINEAR))
  got = transforms.rescale(photo, size, style='torchvision')
  np.testing.assert_array_equal(got, expected)
  crop = transforms.center_crop(got, 64, style='torchvision')
  top, left = int(round((got.shape[0] - 64) / 2.0)), int(round((got.shape[1] - 64) / 2.0))
  np.testing.assert_array_equal(crop, got[top:top + 64, left:left + 64])
  with pytest.raises(ValueError, match="unknown image style 'pillow'; valid: caffe, torchvision"):
    transforms.rescale(photo, size, style='pillow')
