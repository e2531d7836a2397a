"""Random-access image sources: TFDS (array_record), a local image folder, and real datasets held in memory.

Why one module of about 400 lines: every source implements the same small interface below, and the
split-name rules are shared by all of them.

Every source has the same small interface:

* ``len(source)``; ``source[i]`` -> ``{'image': uint8 (H, W, 3), 'label': int}`` (grayscale expanded to RGB);
* ``source.record(i)`` -> ``(image, label)`` where image is either a uint8 array or the encoded bytes of the
  file (what the pipeline feeds to ``transforms.train_transform``: decoding late allows DCT-scaled JPEG
  decoding);
* ``source.describe(i)``: a path or a TFDS record reference, for error reports;
* ``source.name``, ``source.class_names`` (a list, or None) and ``source.num_classes``.

Sources pickle small (a TFDS source re-opens its files in each worker process; a folder source stores its
paths as one bytes blob), so Grain's worker processes start fast.

Split names. ``train`` and ``validation`` everywhere (``val`` and ``test`` are accepted as aliases where a
dataset has one held-out split); TFDS sources take TFDS split strings as they are (``train[:10%]``...); the
other sources take the same slicing syntax on whole numbers or percentages: ``train[:1000]``,
``validation[50%:]`` (a percentage p of n records is ``n * p // 100``).
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pathlib
import re
import struct
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from vggjax.data import transforms
from vggjax.settings import DataSettings, data_settings

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker',
                         'Bag', 'Ankle boot')
DEFAULT_DATA_DIRS = {'fashion_mnist': '/usr/share/datasets/fashion-mnist'}  # Debian's dataset-fashion-mnist
DIGITS_VALIDATION_PER_CLASS = 30  # 300 validation images, 1497 training images
DIGITS_SPLIT_SEED = 0


class Source:
  """Base class: subclasses implement __len__, record and describe."""
  name: str = ''
  class_names: Optional[list[str]] = None
  _num_classes: int = 0

  def __len__(self) -> int:
    raise NotImplementedError

  def record(self, index: int) -> tuple[transforms.ImageOrBytes, int]:
    raise NotImplementedError

  def describe(self, index: int) -> str:
    return f'{self.name}[{index}]'

  @property
  def num_classes(self) -> int:
    return len(self.class_names) if self.class_names else self._num_classes

  def _check_index(self, index: int) -> int:
    index = int(index)
    n = len(self)
    if not -n <= index < n:
      raise IndexError(f'index {index} out of range for {self.name} ({n} records)')
    return index % n

  def __getitem__(self, index: int) -> dict:
    image, label = self.record(self._check_index(index))
    return {'image': transforms.load(image), 'label': int(label)}

  def __repr__(self) -> str:
    return f'{type(self).__name__}({self.name!r}, {len(self)} records, {self.num_classes} classes)'


# ----------------------------------------------------------------------------------------------------------
# Split names and slices.

_SPLIT_RE = re.compile(r'^\s*([A-Za-z_][\w-]*)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$')
_ALIASES = {'val': 'validation', 'valid': 'validation', 'eval': 'validation'}


def parse_split(split: str) -> tuple[str, Optional[str], Optional[str]]:
  """'train[:10%]' -> ('train', None, '10%'). Raises ValueError for anything else."""
  m = _SPLIT_RE.match(split)
  if not m:
    raise ValueError(f'cannot parse split {split!r}: use a name with an optional [start:stop] slice, '
                     "e.g. 'train', 'validation', 'train[:1000]', 'train[10%:]'")
  return m.group(1), m.group(2), m.group(3)


def _bound(token: Optional[str], n: int, default: int) -> int:
  if token is None:
    return default
  v = n * int(token[:-1]) // 100 if token.endswith('%') else int(token)
  if v < 0:
    v += n
  return min(max(v, 0), n)


def split_indices(n: int, start: Optional[str], stop: Optional[str]) -> np.ndarray:
  return np.arange(_bound(start, n, 0), _bound(stop, n, n))


# ----------------------------------------------------------------------------------------------------------
# In-memory arrays: digits, MNIST, Fashion-MNIST.


class ArraySource(Source):
  """uint8 images (N, H, W) or (N, H, W, C) with integer labels, held in memory."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str,
               class_names: Optional[Sequence[str]] = None, num_classes: int = 0):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
      raise TypeError(f'{name}: images must be uint8, got {images.dtype}')
    if images.ndim not in (3, 4) or len(images) != len(labels):
      raise ValueError(f'{name}: need images (N, H, W[, C]) and N labels, got {images.shape} and '
                       f'{labels.shape}')
    self.images = images
    self.labels = labels.astype(np.int64)
    self.name = name
    self.class_names = list(class_names) if class_names else None
    self._num_classes = num_classes or (int(labels.max()) + 1 if len(labels) else 0)

  def __len__(self) -> int:
    return len(self.labels)

  def record(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])

  def subset(self, indices: np.ndarray, name: str) -> 'ArraySource':
    return ArraySource(self.images[indices], self.labels[indices], name, self.class_names, self._num_classes)


def _sliced(source: ArraySource, split: str, start, stop) -> ArraySource:
  if start is None and stop is None:
    return source
  return source.subset(split_indices(len(source), start, stop), f'{source.name.split(":")[0]}:{split}')


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits: (1797, 8, 8) float pixels 0-16 and int64 labels, as load_digits() returns them.
  Read from the CSV file that ships inside scikit-learn, without importing scikit-learn (over a second, paid
  by every short run on the digits); scikit-learn's own loader where the file is not found."""
  spec = importlib.util.find_spec('sklearn')
  where = (spec.submodule_search_locations or []) if spec else []
  path = pathlib.Path(where[0]) / 'datasets' / 'data' / 'digits.csv.gz' if where else None
  if path is not None and path.is_file():
    data = np.loadtxt(path, delimiter=',')
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images, d.target.astype(np.int64)


def digits_source(split: str) -> ArraySource:
  """scikit-learn's digits (1797 8x8 grayscale images, values 0-16) as uint8 0-255 (x * 255 / 16, rounded).

  The split is fixed and stratified: for each class, a permutation seeded with DIGITS_SPLIT_SEED puts its
  first DIGITS_VALIDATION_PER_CLASS images in 'validation' (300 in all) and the rest in 'train' (1497).
  'test' and 'val' are aliases of 'validation'.
  """
  name, start, stop = parse_split(split)
  name = _ALIASES.get(name, 'validation' if name == 'test' else name)
  if name not in ('train', 'validation'):
    raise ValueError(f"digits has the splits 'train' and 'validation' (alias 'test'), not {split!r}")
  pixels, labels = _load_digits()
  images = np.round(pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
  rng = np.random.default_rng(DIGITS_SPLIT_SEED)
  is_val = np.zeros(len(labels), bool)
  for c in range(10):
    members = np.flatnonzero(labels == c)
    is_val[rng.permutation(members)[:DIGITS_VALIDATION_PER_CLASS]] = True
  keep = np.flatnonzero(is_val if name == 'validation' else ~is_val)
  src = ArraySource(images[keep], labels[keep], f'digits:{name}', [str(i) for i in range(10)])
  return _sliced(src, split, start, stop)


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """An IDX file (the MNIST format; gzip-compressed if the name ends in .gz) as a numpy array."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0:
    raise ValueError(f'{path} is not an IDX file (bad magic number)')
  dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
  if data[2] not in dtypes:
    raise ValueError(f'{path}: unknown IDX data type 0x{data[2]:02x}')
  ndim = data[3]
  shape = struct.unpack(f'>{ndim}I', data[4:4 + 4 * ndim])
  array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f'{path}: header says {shape} but the file holds {array.size} values (truncated?)')
  return array.reshape(shape)


def _idx_file(data_dir: pathlib.Path, prefix: str, kind: str) -> pathlib.Path:
  ndim = 3 if kind == 'images' else 1
  names = [f'{prefix}-{kind}-idx{ndim}-ubyte', f'{prefix}-{kind}.idx{ndim}-ubyte']
  for name in names:
    for candidate in (data_dir / name, data_dir / (name + '.gz')):
      if candidate.exists():
        return candidate
  raise FileNotFoundError(
      f'no {prefix} {kind} IDX file in {data_dir} (looked for {names[0]}[.gz] and {names[1]}[.gz])')


def idx_source(dataset: str, data_dir: str, split: str) -> ArraySource:
  """MNIST or Fashion-MNIST from the four IDX files in data_dir: 'train' reads train-*, 'test' (alias
  'validation', 'val') reads t10k-*."""
  data_dir = data_dir or DEFAULT_DATA_DIRS.get(dataset, '')
  if not data_dir:
    raise FileNotFoundError(
        f"{dataset}: set data.data_dir to the directory holding train-images-idx3-ubyte[.gz], "
        f"train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
  root = pathlib.Path(data_dir).expanduser()
  if not root.is_dir():
    hint = (" (Debian/Ubuntu: apt-get install dataset-fashion-mnist)" if dataset == 'fashion_mnist' else '')
    raise FileNotFoundError(f'{dataset}: data_dir {str(root)!r} does not exist; it should hold the IDX files '
                            f'train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...{hint}')
  name, start, stop = parse_split(split)
  name = _ALIASES.get(name, name)
  prefix = {'train': 'train', 'test': 't10k', 'validation': 't10k'}.get(name)
  if prefix is None:
    raise ValueError(f"{dataset} has the splits 'train' and 'test' (alias 'validation'), not {split!r}")
  images = read_idx(_idx_file(root, prefix, 'images'))
  labels = read_idx(_idx_file(root, prefix, 'labels'))
  if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
    raise ValueError(f'{dataset} in {root}: expected uint8 images (N, H, W) and N labels, got '
                     f'{images.shape} {images.dtype} and {labels.shape}')
  classes = list(FASHION_MNIST_CLASSES) if dataset == 'fashion_mnist' else [str(i) for i in range(10)]
  src = ArraySource(images, labels, f'{dataset}:{prefix}', classes)
  return _sliced(src, split, start, stop)


# ----------------------------------------------------------------------------------------------------------
# A local image folder.

_FOLDER_SPLITS = {'train': ('train',), 'validation': ('val', 'validation', 'valid'), 'test': ('test',)}


def _image_extensions() -> frozenset[str]:
  return frozenset(ext.lower() for ext in Image.registered_extensions())


class FolderSource(Source):
  """ROOT/<split>/<class>/**/<image> (any format Pillow reads); classes are the sorted subdirectory names of
  ROOT/train, so every split uses the training labels. Files are found recursively, sorted by path; hidden
  files and files whose extension Pillow does not know are ignored. 'validation' reads ROOT/val (or
  ROOT/validation, ROOT/valid). Images are read and decoded when a record is requested: a corrupt file
  fails there (and the pipeline skips it), not here."""

  def __init__(self, root: str | os.PathLike, split: str):
    self.root = pathlib.Path(root).expanduser()
    if not self.root.is_dir():
      raise FileNotFoundError(f'image folder {str(self.root)!r} does not exist: expected ROOT/train/<class>/'
                              f'<images> and ROOT/val/<class>/<images> (set data.data_dir to ROOT)')
    name, start, stop = parse_split(split)
    name = _ALIASES.get(name, name)
    split_dir = self._split_dir(name)
    train_dir = self._split_dir('train')
    self.class_names = sorted(p.name for p in train_dir.iterdir()
                              if p.is_dir() and not p.name.startswith('.'))
    if not self.class_names:
      raise FileNotFoundError(f'{train_dir} has no class subdirectories (expected '
                              f'{train_dir}/<class>/<images>)')
    class_index = {c: i for i, c in enumerate(self.class_names)}
    extensions = _image_extensions()
    paths, labels = [], []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith('.')):
      if class_dir.name not in class_index:
        raise ValueError(f'{class_dir} is a class that {train_dir} does not have; the classes are those of '
                         f'the training split: {self.class_names[:10]}...')
      for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        for f in sorted(filenames):
          if not f.startswith('.') and os.path.splitext(f)[1].lower() in extensions:
            paths.append(os.path.relpath(os.path.join(dirpath, f), self.root))
            labels.append(class_index[class_dir.name])
    if not paths:
      raise FileNotFoundError(f'no image files in {split_dir}/<class>/ (extensions Pillow reads)')
    keep = split_indices(len(paths), start, stop)
    encoded = [paths[i].encode('utf-8', 'surrogateescape') for i in keep]
    self._blob = b''.join(encoded)
    self._offsets = np.cumsum([0] + [len(e) for e in encoded]).astype(np.int64)
    self.labels = np.asarray(labels, np.int64)[keep]
    self.name = f'folder:{self.root.name}/{split}'

  def _split_dir(self, name: str) -> pathlib.Path:
    candidates = _FOLDER_SPLITS.get(name, (name,))
    for c in candidates:
      if (self.root / c).is_dir():
        return self.root / c
    raise FileNotFoundError(f'image folder {str(self.root)!r} has no split directory for {name!r} (looked '
                            f'for '
                            f'{", ".join(str(self.root / c) for c in candidates)}); expected '
                            f'ROOT/train/<class>/<images> and ROOT/val/<class>/<images>')

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, index: int) -> pathlib.Path:
    rel = self._blob[self._offsets[index]:self._offsets[index + 1]].decode('utf-8', 'surrogateescape')
    return self.root / rel

  def record(self, index: int) -> tuple[bytes, int]:
    return self.path(index).read_bytes(), int(self.labels[index])

  def describe(self, index: int) -> str:
    return str(self.path(index))


# ----------------------------------------------------------------------------------------------------------
# TFDS (array_record), read without TensorFlow.


def _tfds_prepared_splits(builder) -> list[str]:
  try:
    return sorted(builder.info.splits) if builder is not None and builder.is_prepared() else []
  except Exception:  # noqa: BLE001
    return []


def _tfds_missing_message(name: str, data_dir: str, builder, error: BaseException) -> str:
  where = data_dir or '~/tensorflow_datasets (or $TFDS_DATA_DIR)'
  prepare = (f'Prepare it as array_record (needs the tf extra: pip install "vggjax[tf]"):\n'
             f'  tfds build {name.split("/")[0]} --data_dir={where} --file_format=array_record\n'
             f'(imagenet2012 first needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
             f'{where}/downloads/manual), or convert a copy prepared as tfrecord:\n'
             f'  python -m vggjax.data.prepare convert --name={name} --data_dir={where}')
  looked = f'{builder.data_dir}' if builder is not None else f'{where}/{name}'
  try:
    prepared = builder is not None and builder.is_prepared()
  except Exception:  # noqa: BLE001
    prepared = False
  if prepared and str(builder.info.file_format).lower().endswith('tfrecord'):
    return (f'TFDS dataset {name!r} in {looked} is prepared as tfrecord, which random access (and so this '
            f'pipeline) cannot read. Convert it to array_record:\n'
            f'  python -m vggjax.data.prepare convert --name={name} --data_dir={where}')
  return (f'TFDS dataset {name!r} not found in {looked} ({type(error).__name__}: {str(error)[:300]}).\n'
          f'{prepare}')


class TfdsSource(Source):
  """A TFDS split through ``tfds`` data sources (array_record). Records are read as raw bytes and parsed
  with TFDS' numpy example parser; the image stays encoded so the pipeline decodes it (simplejpeg, DCT
  scaling). Where the raw record cannot be parsed without TensorFlow (TFDS' mock data), TFDS decodes."""

  def __init__(self, name: str, split: str, data_dir: str = '', image_key: str = 'image',
               label_key: str = 'label'):
    self.tfds_name, self.split, self.data_dir = name, split, data_dir
    self.image_key, self.label_key = image_key, label_key
    self.name = f'tfds:{name}/{split}'
    self._open()

  def _open(self):
    import tensorflow_datasets as tfds
    builder = None
    try:
      builder = tfds.builder(self.tfds_name, data_dir=self.data_dir or None)
      raw = builder.as_data_source(split=self.split,
                                   deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    except Exception as e:  # noqa: BLE001 - TFDS raises many types for a missing dataset
      splits = _tfds_prepared_splits(builder)
      base = re.split(r'[\[+]', self.split)[0].strip()
      if splits and base not in splits:
        raise ValueError(f'TFDS dataset {self.tfds_name!r} has no split {self.split!r}; its splits: '
                         f'{", ".join(splits)} (set data.train_split / data.eval_split)') from e
      raise FileNotFoundError(_tfds_missing_message(self.tfds_name, self.data_dir, builder, e)) from e
    features = builder.info.features
    for key in (self.image_key, self.label_key):
      if key not in features:
        raise KeyError(f'{self.name} has no feature {key!r} (features: {list(features)}); set '
                       f'data.image_key / data.label_key')
    label = features[self.label_key]
    # A sequence of class labels (VOC's 'labels'): several classes per image (``label_targets``).
    self.multilabel = type(label).__name__ == 'Sequence' and hasattr(label.feature, 'num_classes')
    label = label.feature if self.multilabel else label
    self.class_names = list(label.names) if getattr(label, 'names', None) else None
    self._num_classes = int(getattr(label, 'num_classes', 0) or 0)
    self._skip = {self.image_key: tfds.decode.SkipDecoding()}
    self._features = features
    self._ds = raw
    self._raw = True
    if len(raw):
      try:
        example = self._parse(raw[0])
        parsed = isinstance(example, dict) and self.image_key in example
      except ImportError:  # parsing these records needs TensorFlow (TFDS' mock data)
        parsed = False
      if not parsed:  # records this parser cannot take apart (TFDS' mock data): let TFDS decode them
        self._ds = builder.as_data_source(split=self.split)
        self._raw = False

  def _parse(self, record) -> dict:
    return self._features.deserialize_example_np(record, decoders=self._skip)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ('_ds', '_features', '_skip')}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._ds)

  def example(self, index: int) -> dict:
    """The record's features, the image left encoded (bytes) where TFDS stores it so."""
    example = self._parse(self._ds[index]) if self._raw else self._ds[index]
    image = example[self.image_key]
    if isinstance(image, np.ndarray) and image.dtype == object:
      example = {**example, self.image_key: image.item()}
    return example

  def record(self, index: int) -> tuple[transforms.ImageOrBytes, int]:
    if self.multilabel:
      raise ValueError(f'{self.name}: {self.label_key!r} holds several classes per image; read them with '
                       'label_targets() (a single-label task needs a single-label data.label_key)')
    example = self.example(index)
    return example[self.image_key], int(example[self.label_key])

  def image(self, index: int) -> np.ndarray:
    """The decoded image, uint8 (H, W, 3), of a single- or multi-label record."""
    return transforms.load(self.example(index)[self.image_key])

  def label_targets(self) -> np.ndarray:
    """(N, num_classes) bool: each record's classes (a multi-label source; one per row for a single-label
    one)."""
    out = np.zeros((len(self), self.num_classes), bool)
    for i in range(len(self)):
      out[i, np.asarray(self.example(i)[self.label_key], np.int64)] = True
    return out

  def describe(self, index: int) -> str:
    return f'tfds {self.tfds_name} split {self.split!r} record {index}'


# ----------------------------------------------------------------------------------------------------------


def open_source(data: DataSettings, split: str) -> Source:
  """The source of a split as the data settings describe it (or a config's ``data`` block)."""
  data = data_settings(data)
  kind, data_dir = data.source, data.data_dir
  if kind == 'digits':
    return digits_source(split)
  if kind in ('mnist', 'fashion_mnist'):
    return idx_source(kind, data_dir, split)
  if kind == 'folder':
    if not data_dir:
      raise FileNotFoundError('data.source=folder needs data.data_dir=ROOT with ROOT/train/<class>/<images> '
                              'and ROOT/val/<class>/<images>')
    return FolderSource(data_dir, split)
  if kind == 'tfds':
    return TfdsSource(data.name, split, data_dir, data.image_key, data.label_key)
  raise ValueError(f"unknown data.source {kind!r}: use tfds, folder, digits, mnist or fashion_mnist")
