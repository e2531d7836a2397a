"""ImageNet class names, read from the files tensorflow-datasets ships (without importing it).

* ``imagenet2012/labels.txt``: the 1000 WordNet synset ids (n01440764, ...) in class-index order, the order of
  TFDS' imagenet2012 labels, torchvision's and Keras' weights (sorted synset ids);
* the human-readable names ("tench, Tinca tinca", ...) in the same order, which TFDS keeps as the Python list
  ``IMAGENET_LABELS_LIST`` in ``datasets/siscore/labels.py``; it is read as data (``ast.literal_eval``), never
  imported or executed.

Weights metadata (vggjax.json's 'labels') holds a list of class names, the string 'imagenet2012', or None;
``resolve`` turns any of them into a list of names, or None when only indices can be printed.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import os
import pathlib
from typing import Any, Sequence

IMAGENET = 'imagenet2012'
NUM_IMAGENET_CLASSES = 1000
_SYNSETS = ('datasets', 'imagenet2012', 'labels.txt')
_NAMES = ('datasets', 'siscore', 'labels.py')
_NAMES_VARIABLE = 'IMAGENET_LABELS_LIST'


def _tfds_root() -> pathlib.Path:
  spec = importlib.util.find_spec('tensorflow_datasets')
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError('tensorflow-datasets is not installed; it ships the ImageNet label files')
  return pathlib.Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=None)
def imagenet_synsets() -> tuple[str, ...]:
  """The 1000 ImageNet synset ids in class-index order (n01440764 tench ... n15075141 toilet tissue)."""
  path = _tfds_root().joinpath(*_SYNSETS)
  synsets = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
  if len(synsets) != NUM_IMAGENET_CLASSES:
    raise ValueError(f'{path}: expected {NUM_IMAGENET_CLASSES} synsets, found {len(synsets)}')
  return synsets


@functools.lru_cache(maxsize=None)
def imagenet_names() -> tuple[str, ...]:
  """The 1000 human-readable ImageNet class names in class-index order ('tench, Tinca tinca', ...)."""
  path = _tfds_root().joinpath(*_NAMES)
  tree = ast.parse(path.read_text(), filename=str(path))
  for node in tree.body:
    if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        and node.targets[0].id == _NAMES_VARIABLE):
      names = tuple(str(n) for n in ast.literal_eval(node.value))
      if len(names) != NUM_IMAGENET_CLASSES:
        raise ValueError(f'{path}: {_NAMES_VARIABLE} has {len(names)} names, expected {NUM_IMAGENET_CLASSES}')
      return names
  raise ValueError(f'{path} holds no {_NAMES_VARIABLE}')


def read_labels_file(path: str | os.PathLike) -> list[str]:
  """Class names from a text file, one per line, in class-index order."""
  return [line.strip() for line in pathlib.Path(path).read_text().splitlines() if line.strip()]


def resolve(labels: Any, num_classes: int) -> list[str] | None:
  """Class names for weights metadata's 'labels': a list of names, 'imagenet2012', a path to a text file
  (one name per line), or None. None (with a warning) when the names are unavailable or their number
  differs from num_classes: callers then print class indices."""
  if labels is None:
    return None
  try:
    if isinstance(labels, str):
      if labels == IMAGENET:
        names: Sequence[str] = imagenet_names()
      elif os.path.exists(labels):
        names = read_labels_file(labels)
      else:
        logging.warning('unknown labels %r; printing class indices', labels)
        return None
    else:
      names = [str(n) for n in labels]
  except (OSError, ValueError) as e:
    logging.warning('class names unavailable (%s); printing class indices', e)
    return None
  if len(names) != num_classes:
    logging.warning('%d class names for %d classes; printing class indices', len(names), num_classes)
    return None
  return list(names)


def short_name(name: str) -> str:
  """The first synonym of an ImageNet class name: 'tabby, tabby cat' -> 'tabby'."""
  return name.split(',')[0].strip()
