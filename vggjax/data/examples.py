"""The labelled images of a split, for protocols that read every image of it once (the transfer protocol,
Appendix B): labels up front (without decoding images where the source keeps them apart), images on demand.

    ex = examples.open_examples(data, 'train')   # data: settings.DataSettings (or a config's data block)
    ex.labels       # (N,) int, or (N, C) bool for a multi-label TFDS source (VOC's 'labels')
    ex.image(i)     # uint8 (H, W, 3)
    examples.fingerprint(ex)   # what the split holds, for cache keys
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from vggjax.data import sources
from vggjax.settings import data_settings


@dataclasses.dataclass
class Examples:
  """The images and labels of one split: ``image(i)`` uint8 RGB, ``labels`` (N,) int or (N, C) bool."""
  source: Any
  labels: np.ndarray
  class_names: list[str]
  name: str
  multilabel: bool = False

  def __len__(self) -> int:
    return len(self.labels)

  def image(self, index: int) -> np.ndarray:
    if self.multilabel:
      return self.source.image(index)
    return self.source[index]['image']

  def describe(self, index: int) -> str:
    return self.source.describe(index) if hasattr(self.source, 'describe') else f'{self.name}[{index}]'


def source_labels(source: sources.Source) -> tuple[np.ndarray, bool]:
  """(labels, multilabel): a source's labels without decoding its images where it keeps them apart."""
  if isinstance(source, sources.TfdsSource):
    if source.multilabel:
      return source.label_targets(), True
  elif hasattr(source, 'labels'):
    return np.asarray(source.labels, np.int64), False
  return np.asarray([source.record(i)[1] for i in range(len(source))], np.int64), False


def open_examples(data, split: str) -> Examples:
  """The images and labels of a split of the data settings' source (or a config's data block)."""
  data = data_settings(data)
  source = sources.open_source(data, split)
  labels, multilabel = source_labels(source)
  if multilabel:
    num = labels.shape[1]
  else:
    num = max(source.num_classes, int(labels.max()) + 1 if len(labels) else 0)
  names = list(source.class_names) if source.class_names else [str(i) for i in range(num)]
  return Examples(source, labels, names, f'{getattr(source, "name", data.source)}', multilabel)


def fingerprint(examples: Examples) -> str:
  """A hash of what a split holds: its name, labels, and its images' contents (in-memory arrays) or their
  paths, sizes and modification times (folders) or record count (TFDS)."""
  h = hashlib.sha256()
  src = examples.source
  h.update(f'{type(src).__name__}|{examples.name}|{len(examples)}'.encode())
  h.update(np.ascontiguousarray(examples.labels).tobytes())
  if isinstance(src, sources.ArraySource):
    h.update(np.ascontiguousarray(src.images).tobytes())
  elif isinstance(src, sources.FolderSource):
    for i in range(len(src)):
      p = src.path(i)
      st = p.stat()
      h.update(f'{p}|{st.st_size}|{st.st_mtime_ns}\n'.encode('utf-8', 'surrogateescape'))
  else:
    h.update(repr((getattr(src, 'tfds_name', ''), getattr(src, 'split', ''), getattr(src, 'data_dir', ''))
                  ).encode())
  return h.hexdigest()[:16]
