"""Images with bounding boxes, for the localisation nets (paper Appendix A): sources and batches.

A box source is a ``sources.Source`` (so it serves classification too) with one more method,
``boxes(i)`` -> float (K, 4) ``(x0, y0, x1, y1)`` in pixels of the stored image (``vggjax.boxes``'
conventions). Sources:

* ``folder`` with a boxes file: the image folder of ``sources.FolderSource`` (ROOT/train/<class>/...,
  ROOT/val/<class>/...) and ROOT/boxes.json (``data.boxes_file``), a JSON object from each image's path
  relative to ROOT to its list of boxes::

      {"train/bag/000001.jpg": [[12, 30, 57, 88]], "val/coat/000002.jpg": [[3, 4, 50, 60], [60, 8, 90, 41]]}

  or a CSV file (``.csv``) with the header ``path,x0,y0,x1,y1`` and one row per box. Every image needs at
  least one box (an error names the first that has none).
* ``tfds``: a TFDS dataset with one class label per image (``data.label_key``) whose boxes are a
  ``BBoxFeature`` (``data.bbox_key``: ``objects/bbox`` in stanford_dogs, ``bbox`` in caltech_birds2011),
  stored as (ymin, xmin, ymax, xmax) fractions of the image; read without TensorFlow like
  ``sources.TfdsSource``. (voc/2007 labels objects, not images: it has no per-image class to regress for.)

Batches. ``train_iterator`` and ``eval_iterator`` give exactly the batches of ``vggjax.data.pipeline`` (same
records, crops, flips, order, resumable state) plus, per example, ``box``: float32 (4,), the regression
target ``(cx, cy, w, h) / image_size`` of the crop, and ``box_valid``: bool, False when the crop kept no
visible box (that example is masked out of the loss; ``vggjax.boxes`` explains the choice). The pipeline
switches to these batches when ``data.boxes_file`` (or, for TFDS, ``data.bbox_key``) is set.
"""

from __future__ import annotations

import csv
import json
import logging
import pathlib

import numpy as np

from vggjax import boxes as boxes_lib
from vggjax.data import iterators, sources, transforms
from vggjax.settings import data_settings

log = logging.getLogger(__name__)


class BoxFolderSource(sources.FolderSource):
  """``sources.FolderSource`` plus a boxes file (JSON or CSV, see the module docstring)."""

  def __init__(self, root, split: str, boxes_file: str = 'boxes.json'):
    super().__init__(root, split)
    path = pathlib.Path(boxes_file).expanduser()
    path = path if path.is_absolute() else self.root / path
    if not path.is_file():
      raise FileNotFoundError(f'boxes file {str(path)!r} does not exist: set data.boxes_file to a JSON file '
                              f'{{"train/<class>/<image>": [[x0, y0, x1, y1], ...], ...}} or a CSV file with '
                              f'the columns path,x0,y0,x1,y1 (paths relative to {str(self.root)!r})')
    table = read_boxes_file(path)
    self._boxes = []
    for i in range(len(self)):
      rel = self.path(i).relative_to(self.root).as_posix()
      if rel not in table:
        raise ValueError(f'{path} has no box for {rel} (every image of the folder needs at least one)')
      self._boxes.append(boxes_lib.as_boxes(table[rel]).astype(np.float32))
    self.name = f'folder+boxes:{self.root.name}/{split}'

  def boxes(self, index: int) -> np.ndarray:
    return self._boxes[index].astype(np.float64)


def read_boxes_file(path) -> dict[str, list]:
  """A boxes file as {relative path: [[x0, y0, x1, y1], ...]} (JSON object, or CSV path,x0,y0,x1,y1)."""
  path = pathlib.Path(path)
  if path.suffix.lower() == '.csv':
    table: dict[str, list] = {}
    with open(path, newline='') as f:
      reader = csv.DictReader(f)
      need = ['path', 'x0', 'y0', 'x1', 'y1']
      if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
        raise ValueError(f'{path}: a CSV boxes file needs the header {",".join(need)}, got '
                         f'{reader.fieldnames}')
      for row in reader:
        table.setdefault(row['path'], []).append([float(row[c]) for c in need[1:]])
    return table
  with open(path) as f:
    table = json.load(f)
  if not isinstance(table, dict):
    raise ValueError(f'{path}: a JSON boxes file holds an object {{"path": [[x0, y0, x1, y1], ...]}}, got '
                     f'{type(table).__name__}')
  return table


class TfdsBoxSource(sources.TfdsSource):
  """A TFDS split with a BBoxFeature (``bbox_key``, e.g. 'objects/bbox'); boxes converted to pixels."""

  def __init__(self, name: str, split: str, data_dir: str = '', image_key: str = 'image',
               label_key: str = 'label', bbox_key: str = 'objects/bbox'):
    self.bbox_key = bbox_key
    super().__init__(name, split, data_dir, image_key, label_key)
    if not self._raw:
      raise ValueError(f'{self.name}: boxes need records this reader can parse without TensorFlow')
    self.name = f'tfds+boxes:{name}/{split}'

  def _example(self, index: int) -> dict:
    return self._parse(self._ds[index])

  def boxes(self, index: int) -> np.ndarray:
    example = self._example(index)
    value = example
    for part in self.bbox_key.split('/'):
      if not isinstance(value, dict) or part not in value:
        raise KeyError(f'{self.name} has no box feature {self.bbox_key!r}; set data.bbox_key')
      value = value[part]
    yx = np.asarray(value, np.float64).reshape(-1, 4)  # (ymin, xmin, ymax, xmax) fractions
    image = example[self.image_key]
    if isinstance(image, np.ndarray) and image.dtype == object:
      image = image.item()
    h, w = transforms.dimensions(image)
    return np.stack([yx[:, 1] * w, yx[:, 0] * h, yx[:, 3] * w, yx[:, 2] * h], axis=1)


def has_boxes(data) -> bool:
  """Whether the data settings (or a config's data block) ask for batches with boxes (data.boxes_file for
  folders, data.bbox_key for TFDS)."""
  return data_settings(data).has_boxes


def open_source(data, split: str) -> sources.Source:
  """The box source of a split (data.source folder or tfds)."""
  data = data_settings(data)
  if data.source == 'folder' and data.boxes_file:
    if not data.data_dir:
      raise FileNotFoundError('data.source=folder needs data.data_dir=ROOT (ROOT/train/<class>/<images>, '
                              'ROOT/val/<class>/<images> and the boxes file)')
    return BoxFolderSource(data.data_dir, split, data.boxes_file)
  if data.source == 'tfds' and data.bbox_key:
    return TfdsBoxSource(data.name, split, data.data_dir, data.image_key, data.label_key, data.bbox_key)
  raise ValueError(f'data.source={data.source!r} has no boxes: use source=folder with data.boxes_file, '
                   f'or source=tfds with data.bbox_key (a BBoxFeature such as objects/bbox)')


# ----------------------------------------------------------------------------------------------------------
# Batches with boxes: the pipeline's batch functions, with each record's boxes carried through.


def train_example(image, boxes, rng, *, image_size: int, scale_min: int, scale_max: int,
                  random_flip: bool, dct_scaling: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
  """``transforms.train_transform_view`` (the same draws, the same crop) and the regression target of its
  box: (crop view, target (cx, cy, w, h) / image_size, valid)."""
  h0, w0 = transforms.dimensions(image)
  s, top, left, flipped = transforms.train_params(h0, w0, rng, image_size=image_size, scale_min=scale_min,
                                                  scale_max=scale_max, random_flip=random_flip)
  h, w = transforms.rescaled_size(h0, w0, s)
  out = transforms.resize(transforms.load(image, s, dct_scaling), h, w)[top:top + image_size,
                                                                         left:left + image_size]
  b, visible = boxes_lib.train_boxes(boxes, (h0, w0), (h, w), top, left, image_size, flipped)
  box, valid = boxes_lib.target_box(b, visible)
  return (out[:, ::-1] if flipped else out), boxes_lib.to_target(box, image_size), valid


def eval_example(image, boxes, *, image_size: int, scale: int,
                 dct_scaling: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
  """``transforms.eval_transform`` (rescale to Q, central crop) and the target of its box."""
  h0, w0 = transforms.dimensions(image)
  h, w = transforms.rescaled_size(h0, w0, scale)
  top, left = boxes_lib.center_crop_offsets((h, w), image_size)
  crop = transforms.eval_transform(image, image_size=image_size, scale=scale, dct_scaling=dct_scaling)
  b, visible = boxes_lib.train_boxes(boxes, (h0, w0), (h, w), top, left, image_size, False)
  box, valid = boxes_lib.target_box(b, visible)
  return crop, boxes_lib.to_target(box, image_size), valid


class BoxTrainBatchFn(iterators.TrainBatchFn):

  def __call__(self, step: int) -> dict:
    epoch, indices = self.indices(step)
    n = len(indices)
    images = np.empty((n, self.image_size, self.image_size, 3), np.uint8)
    labels = np.empty((n,), np.int32)
    targets = np.zeros((n, 4), np.float32)
    valid = np.zeros((n,), bool)
    bad = []

    def transform(image, i):
      rng = transforms.example_rng(self.seed, epoch, i)
      return train_example(image, self.source.boxes(i), rng, **self.kw)

    for j, index in enumerate(indices):
      (images[j], targets[j], valid[j]), labels[j], b = self._read(int(index), transform)
      bad += b
    return {'image': images, 'label': labels, 'box': targets, 'box_valid': valid, '_bad': bad}


class BoxEvalBatchFn(iterators.EvalBatchFn):
  """The eval batches with each central crop's box target ('box', 'box_valid': a box overlaps the crop)."""

  def extra_fields(self, lb: int) -> dict:
    return {'box': np.zeros((lb, 4), np.float32), 'box_valid': np.zeros((lb,), bool)}

  def fill(self, batch: dict, j: int, index: int, image) -> None:
    batch['image'][j], batch['box'][j], batch['box_valid'][j] = eval_example(
        image, self.source.boxes(index), image_size=self.image_size, scale=self.scale,
        dct_scaling=self.dct_scaling)

  def __call__(self, step: int) -> dict:
    batch = super().__call__(step)
    batch['box_valid'] &= batch['mask']  # a row whose example failed after its box was read: no target
    return batch


def train_iterator(data, *, global_batch_size: int, seed: int, process_index: int = 0,
                   process_count: int = 1) -> iterators.TrainIterator:
  """``pipeline.train_iterator`` whose batches also carry 'box' and 'box_valid'."""
  data = data_settings(data)
  return iterators.TrainIterator(data, global_batch_size=global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count,
                                 source=open_source(data, data.train_split), batch_fn=BoxTrainBatchFn)


def eval_iterator(data, *, global_batch_size: int, process_index: int = 0, process_count: int = 1,
                  scale=None, split=None) -> iterators.EvalIterator:
  """``pipeline.eval_iterator`` whose batches also carry 'box' and 'box_valid' (central crop at Q)."""
  data = data_settings(data)
  return iterators.EvalIterator(data, global_batch_size=global_batch_size, process_index=process_index,
                                process_count=process_count, scale=scale, split=split,
                                source=open_source(data, split or data.eval_split), batch_fn=BoxEvalBatchFn)
