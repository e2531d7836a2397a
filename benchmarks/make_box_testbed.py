"""Builds the localisation test bed: real objects at random positions and sizes on real photographs.

No dataset with bounding boxes ships offline, so this one is made from real pictures that do:

* objects: Fashion-MNIST items (Debian/Ubuntu: ``apt-get install dataset-fashion-mnist``; 28x28 greyscale
  photographs of clothes on black), each cut out by its own intensity (a soft alpha mask), tinted with a
  random colour, resized to 35-70% of the picture's shorter side and pasted at a uniformly random position;
* backgrounds: the real photographs that ship with scikit-learn (china, flower) and scikit-image
  (astronaut, chelsea, coffee, rocket, the Hubble deep field, immunohistochemistry, grass, gravel, brick,
  camera), a random window of 40-100% of the photograph's shorter side each time, resized to the picture.

Each picture is 96 pixels on its shorter side and 96-144 on its longer (landscape or portrait), holds one
object, and is labelled with the object's class (the 10 Fashion-MNIST classes, in Fashion-MNIST's label
order: directory ``<label>_<name>``). The box is the tight box of
the object's mask (alpha > 0.1). The folder is what ``data.source=folder`` with ``data.boxes_file`` reads::

    ROOT/train/<class>/<n>.jpg, ROOT/val/<class>/<n>.jpg,
    ROOT/boxes.json {"train/<class>/<n>.jpg": [[x0, y0, x1, y1]], ...}

    python benchmarks/make_box_testbed.py --out=data/boxes_testbed [--train=2000 --val=300 --seed=0]

The same arguments build the same pictures, byte for byte (everything is drawn from one seeded generator).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import cv2
import numpy as np
from PIL import Image

FASHION_DIR = '/usr/share/datasets/fashion-mnist'
# The class directories in Fashion-MNIST's label order (an image folder's classes are its sorted directory
# names): class c of the test bed is Fashion-MNIST's label c, so a classifier of plain Fashion-MNIST
# (configs/boxes_testbed.py:pretrain) warm-starts the test bed's classifier, fc8 included.
CLASS_DIRS = ('0_tshirt_top', '1_trouser', '2_pullover', '3_dress', '4_coat', '5_sandal', '6_shirt', '7_sneaker',
              '8_bag', '9_ankle_boot')
SHORT_SIDE = 96
LONG_SIDES = (96, 112, 128, 144)
OBJECT_FRACTION = (0.35, 0.7)  # the object's longer side, as a fraction of the picture's shorter side


def photographs() -> list[np.ndarray]:
  """The real RGB photographs of scikit-learn and scikit-image (greyscale ones repeated to RGB)."""
  from sklearn.datasets import load_sample_images
  photos = [np.asarray(p) for p in load_sample_images().images]
  import skimage.data
  for name in ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry',
               'grass', 'gravel', 'brick', 'camera'):
    p = np.asarray(getattr(skimage.data, name)())
    photos.append(np.repeat(p[:, :, None], 3, axis=2) if p.ndim == 2 else p[:, :, :3])
  return photos


def fashion_items(data_dir: str = FASHION_DIR) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST's training images and labels (the IDX files of Debian's dataset-fashion-mnist)."""
  from vggjax.data import sources
  if not pathlib.Path(data_dir).is_dir():
    raise FileNotFoundError(f'Fashion-MNIST not found in {data_dir!r}: install Debian\'s '
                            f'dataset-fashion-mnist '
                            f'(apt-get install dataset-fashion-mnist) or pass --fashion_dir')
  src = sources.idx_source('fashion_mnist', data_dir, 'train')
  return src.images, src.labels


def compose(background: np.ndarray, item: np.ndarray, rng: np.random.Generator, height: int, width: int,
            fraction: tuple[float, float] = OBJECT_FRACTION) -> tuple[np.ndarray, list[float]]:
  """One picture: a window of the photograph resized to height x width, the item pasted on it, its longer
  side a uniformly random `fraction` of the picture's shorter side. Returns (uint8 (height, width, 3), box
  [x0, y0, x1, y1])."""
  ph, pw = background.shape[:2]
  side = int(rng.uniform(0.4, 1.0) * min(ph, pw))
  if height <= width:
    wh = (side, int(min(pw, side * width / height)))
  else:
    wh = (int(min(ph, side * height / width)), side)
  top = int(rng.integers(0, ph - wh[0] + 1))
  left = int(rng.integers(0, pw - wh[1] + 1))
  canvas = cv2.resize(background[top:top + wh[0], left:left + wh[1]], (width, height),
                      interpolation=cv2.INTER_AREA).astype(np.float32)
  # The item: tight crop of its pixels, resized so its longer side is a random fraction of the shorter side.
  ys, xs = np.nonzero(item > 25)
  item = item[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
  longer = rng.uniform(*fraction) * min(height, width)
  scale = longer / max(item.shape)
  ih, iw = max(2, int(round(item.shape[0] * scale))), max(2, int(round(item.shape[1] * scale)))
  item = cv2.resize(item, (iw, ih), interpolation=cv2.INTER_LINEAR if scale > 1 else cv2.INTER_AREA)
  alpha = np.clip(item / 255.0 * 3.0, 0.0, 1.0)[:, :, None]
  tint = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
  colour = (item[:, :, None] * tint)
  y, x = int(rng.integers(0, height - ih + 1)), int(rng.integers(0, width - iw + 1))
  region = canvas[y:y + ih, x:x + iw]
  canvas[y:y + ih, x:x + iw] = alpha * colour + (1 - alpha) * region
  ys, xs = np.nonzero(alpha[:, :, 0] > 0.1)
  box = [float(x + xs.min()), float(y + ys.min()), float(x + xs.max() + 1), float(y + ys.max() + 1)]
  return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), box


def build(out: str | pathlib.Path, num_train: int = 2000, num_val: int = 300, seed: int = 0,
          fashion_dir: str = FASHION_DIR, quality: int = 90, progress: bool = True) -> pathlib.Path:
  """Writes the test bed to `out` (see the module docstring) and returns its path."""
  out = pathlib.Path(out)
  photos = photographs()
  items, labels = fashion_items(fashion_dir)
  rng = np.random.default_rng(seed)
  table = {}
  total = num_train + num_val
  for n in range(total):
    split = 'train' if n < num_train else 'val'
    k = int(rng.integers(len(items)))
    label = int(labels[k])
    h, w = SHORT_SIDE, int(rng.choice(LONG_SIDES))
    if rng.random() < 0.5:
      h, w = w, h
    picture, box = compose(photos[int(rng.integers(len(photos)))], items[k], rng, h, w)
    rel = f'{split}/{CLASS_DIRS[label]}/{n:05d}.jpg'
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path, quality=quality)
    table[rel] = [box]
    if progress and (n + 1) % 500 == 0:
      print(f'{n + 1}/{total} pictures', file=sys.stderr, flush=True)
  for split in ('train', 'val'):  # every class has a directory, even one that drew no picture
    for c in CLASS_DIRS:
      (out / split / c).mkdir(parents=True, exist_ok=True)
  (out / 'boxes.json').write_text(json.dumps(table, indent=0, sort_keys=True))
  return out


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True,
                      help='the folder to write (ROOT/train, ROOT/val, ROOT/boxes.json)')
  parser.add_argument('--train', type=int, default=2000, help='training pictures')
  parser.add_argument('--val', type=int, default=300, help='validation pictures')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--fashion_dir', default=FASHION_DIR, help='the Fashion-MNIST IDX files')
  args = parser.parse_args(argv)
  root = build(args.out, args.train, args.val, args.seed, args.fashion_dir)
  print(f'wrote {args.train} training and {args.val} validation pictures with boxes to {root}')


if __name__ == '__main__':
  main()
