"""The paper study's task: Fashion-MNIST items at random scales and positions on real photographs.

The paper's orderings (deeper is better, scale jitter helps, multi-scale testing helps, ...) need data where
they can be true: objects of varied sizes and positions in real clutter. No such dataset ships offline, so
this one is made from real pictures that do (benchmarks/make_box_testbed.py's composition, with a wider range
of object sizes and many more backgrounds):

* objects: Fashion-MNIST items (Debian's ``dataset-fashion-mnist``), cut out by their own intensity (a soft
  alpha mask), tinted, their longer side 35-90% of the picture's shorter side, at a uniformly random position.
  The training pictures take items of Fashion-MNIST's training split, validation and test pictures items
  of its test split: no item is seen both in training and in testing;
* backgrounds: the photographs and artwork of Debian's wallpaper packages (plasma-workspace-wallpapers,
  mate-backgrounds, ukui-wallpapers; one picture per wallpaper, its largest landscape file) and the sample
  photographs of scikit-learn and scikit-image, a random window of 40-100% of the photograph's shorter side
  each time. The photographs are split too (seeded): 80% give the training pictures' backgrounds, the other
  20% the validation and test pictures', so a net cannot recognise a test picture's background either.

Pictures are 80 pixels on the shorter side and 80-120 on the longer (landscape or portrait), one object
each, labelled with its class (directory ``<label>_<name>`` in Fashion-MNIST's label order) and its box (the
tight box of the mask, alpha > 0.1). The folder is what ``data.source=folder`` with ``data.boxes_file``
reads, ROOT/{train,val,test}/<class>/<n>.jpg and ROOT/boxes.json, plus ROOT/manifest.json (the arguments,
every background's file and sha256, the counts) and ROOT/examples.png. The same arguments and the same
packages build the same pictures, byte for byte: everything is drawn from one seeded generator, and the
manifest's checksums say whether the packages are the same.

    python launch/study_data.py --out=data/paper_task                  # 10000 / 1000 / 2000 pictures
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks import make_box_testbed as testbed  # noqa: E402  (compose, photographs, fashion_items)

WALLPAPER_DIRS = ('/usr/share/wallpapers', '/usr/share/backgrounds')
SHORT_SIDE = 80
LONG_SIDES = (80, 90, 100, 110, 120)
OBJECT_FRACTION = (0.35, 0.9)
HELD_OUT = 0.2  # the fraction of the photographs kept for the validation and test pictures
PHOTO_SIDE = 480  # each background is kept in memory at this shorter side
SPLITS = ('train', 'val', 'test')


def wallpaper_files(dirs=WALLPAPER_DIRS) -> list[pathlib.Path]:
  """One file per wallpaper: the largest landscape image of each KDE wallpaper package (its
  contents/images/WxH.*), and every image of the flat background folders; no screenshots."""
  files = []
  for root in map(pathlib.Path, dirs):
    if not root.is_dir():
      continue
    for path in sorted(root.rglob('*')):
      if path.suffix.lower() not in ('.jpg', '.jpeg', '.png') or 'screenshot' in path.name:
        continue
      if 'contents' in path.parts:
        continue  # a KDE package: picked below
      files.append(path)
    for package in sorted(p.parent for p in root.rglob('contents')):
      best, best_area = None, 0
      for path in sorted((package / 'contents' / 'images').glob('*')):
        w, _, h = path.stem.partition('x')
        if w.isdigit() and h.isdigit() and int(w) >= int(h) and int(w) * int(h) > best_area:
          best, best_area = path, int(w) * int(h)
      if best is not None:
        files.append(best)
  return files


def _shrink(picture: np.ndarray) -> np.ndarray:
  import cv2
  h, w = picture.shape[:2]
  f = PHOTO_SIDE / min(h, w)
  if f >= 1:
    return picture
  return cv2.resize(picture, (max(PHOTO_SIDE, round(w * f)), max(PHOTO_SIDE, round(h * f))),
                    interpolation=cv2.INTER_AREA)


def backgrounds(dirs=WALLPAPER_DIRS) -> tuple[list[np.ndarray], list[dict]]:
  """The photographs (RGB uint8, shrunk to PHOTO_SIDE) and their records (file or sample name, sha256)."""
  pictures, records = [], []
  for path in wallpaper_files(dirs):
    data = path.read_bytes()
    with Image.open(path) as im:
      pictures.append(_shrink(np.asarray(im.convert('RGB'))))
    records.append({'file': str(path), 'sha256': hashlib.sha256(data).hexdigest()})
  for n, p in enumerate(testbed.photographs()):
    pictures.append(_shrink(p))
    records.append({'file': f'sample:{n}', 'sha256': hashlib.sha256(p.tobytes()).hexdigest()})
  return pictures, records


def build(out, counts=(10000, 1000, 2000), seed: int = 0, fashion_dir: str = testbed.FASHION_DIR,
          wallpaper_dirs=WALLPAPER_DIRS, quality: int = 90, progress: bool = True) -> pathlib.Path:
  """Writes the task to `out` (see the module docstring) and returns its path. counts: train, val, test."""
  out = pathlib.Path(out)
  photos, records = backgrounds(wallpaper_dirs)
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(photos))
  n_held = max(1, int(round(HELD_OUT * len(photos))))
  photo_split = {'train': order[n_held:], 'val': order[:n_held], 'test': order[:n_held]}
  items = {'train': testbed.fashion_items(fashion_dir)}
  from vggjax.data import sources
  test_items = sources.idx_source('fashion_mnist', fashion_dir, 'test')
  items['val'] = items['test'] = (test_items.images, test_items.labels)
  table, total, n = {}, sum(counts), 0
  for split, count in zip(SPLITS, counts):
    images, labels = items[split]
    for _ in range(count):
      k = int(rng.integers(len(images)))
      h, w = SHORT_SIDE, int(rng.choice(LONG_SIDES))
      if rng.random() < 0.5:
        h, w = w, h
      background = photos[int(rng.choice(photo_split[split]))]
      picture, box = testbed.compose(background, images[k], rng, h, w, OBJECT_FRACTION)
      rel = f'{split}/{testbed.CLASS_DIRS[int(labels[k])]}/{n:05d}.jpg'
      (out / rel).parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(picture).save(out / rel, quality=quality)
      table[rel] = [box]
      n += 1
      if progress and n % 1000 == 0:
        print(f'{n}/{total} pictures', file=sys.stderr, flush=True)
  for split in SPLITS:  # every class has a directory, even one that drew no picture
    for c in testbed.CLASS_DIRS:
      (out / split / c).mkdir(parents=True, exist_ok=True)
  (out / 'boxes.json').write_text(json.dumps(table, indent=0, sort_keys=True))
  manifest = {'seed': seed, 'counts': dict(zip(SPLITS, counts)), 'short_side': SHORT_SIDE,
              'long_sides': list(LONG_SIDES), 'object_fraction': list(OBJECT_FRACTION),
              'held_out_photographs': [records[i]['file'] for i in order[:n_held]],
              'backgrounds': records, 'classes': list(testbed.CLASS_DIRS)}
  (out / 'manifest.json').write_text(json.dumps(manifest, indent=1))
  examples(out, out / 'examples.png')
  return out


def examples(root, path, n: int = 24, columns: int = 8) -> pathlib.Path:
  """A grid of the first training pictures with their boxes and classes: what the task looks like."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  root = pathlib.Path(root)
  table = json.loads((root / 'boxes.json').read_text())
  names = sorted(k for k in table if k.startswith('train/'))
  names = sorted(names, key=lambda k: k.rsplit('/', 1)[1])[:n]
  rows = -(-len(names) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows))
  for ax in np.ravel(axes):
    ax.axis('off')
  for ax, name in zip(np.ravel(axes), names):
    ax.imshow(Image.open(root / name))
    x0, y0, x1, y1 = table[name][0]
    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color='yellow', lw=1.5))
    ax.set_title(name.split('/')[1].split('_', 1)[1], fontsize=9)
  fig.suptitle('The study task: Fashion-MNIST items at 35-90% of the shorter side on real photographs '
               '(yellow: the box)', fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return pathlib.Path(path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='the folder to write')
  parser.add_argument('--counts', default='10000,1000,2000', help='train,val,test pictures')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--fashion_dir', default=testbed.FASHION_DIR, help='the Fashion-MNIST IDX files')
  parser.add_argument('--wallpaper_dirs', default=','.join(WALLPAPER_DIRS),
                      help='folders of background pictures, comma-separated (empty: the sample photographs only)')
  args = parser.parse_args(argv)
  counts = tuple(int(c) for c in args.counts.split(','))
  if len(counts) != 3 or min(counts) < 1:
    parser.error(f'--counts: three positive numbers (train,val,test), got {args.counts!r}')
  dirs = tuple(d for d in args.wallpaper_dirs.split(',') if d)
  root = build(args.out, counts, args.seed, args.fashion_dir, dirs)
  print(f'wrote {counts[0]} training, {counts[1]} validation and {counts[2]} test pictures to {root}')


if __name__ == '__main__':
  main()
