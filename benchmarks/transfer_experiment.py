"""A real transfer experiment at CPU scale, laid out like the paper's Table 11: a narrow VGG-A trained on
Fashion-MNIST's classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat), transferred to the other five
(Sandal, Shirt, Sneaker, Bag, Ankle boot), which it has never seen.

    python benchmarks/transfer_experiment.py --out=runs/transfer_experiment           # the full run
    python benchmarks/transfer_experiment.py --out=runs/transfer_quick --quick        # the CI-sized run
    python benchmarks/transfer_experiment.py --out=runs/transfer_plain --scene=plain  # the plain images

Two scenes. `photos` (the default), the counterpart of the paper's setting (objects in photographs, Caltech
and VOC): each item pasted at a random position and size on a random window of a real photograph, in colour,
48x48 (benchmarks/make_box_testbed.py's compose: the item is 35-70% of the picture's side), the source and
target drawing their backgrounds from disjoint halves of the photographs. `plain`: Fashion-MNIST's own
centred 28x28 images on black, the easiest possible case for a linear model on pixels.

Steps, all through vggjax's own commands and functions:

1. Image folders (PNG, the `folder` source) from Debian's dataset-fashion-mnist IDX files: the source
   classes (train and val) and the target classes (train: the fine-tuning / fixed-split SVM training images;
   val: the test images), sampled per class with a fixed seed.
2. The source net: `vggjax.main` on the source folder (the demo's recipe: narrow VGG-A at 32x32, SGD, Glorot
   init; plain: scale jittering S in [32, 40], dropout; photos: S in [32, 48], batch norm (vgg11_bn), inputs
   divided by their standard deviation, no dropout - see recipe_overrides).
3. An untrained net: the same architecture and initialisation, no training step.
4. vggjax.transfer on the target folder, for three feature kinds: the source net's fc7 descriptors (the
   paper's Appendix B: dense over the image at Q in {32, 40, 48}, flips, averaged over scales, L2-normalised),
   the untrained net's, and the raw pixels (the whole image, L2-normalised) - each with the same linear SVMs
   (C by 3-fold cross-validation) on the same splits: the Caltech protocol (random splits of N training
   images per class, the rest of the pool for testing) and the fixed split (VOC-like, with mAP).
5. Fine-tuning, the alternative: `vggjax.main --config=configs/finetune.py:demo` starting from the source net
   (every layer copied but fc8, which is new for the 5 target classes), trained on the target training images,
   then scored with `vggjax.transfer --classifier=net` on the same test images with the same metrics.

The results go to OUT/results.json and a Markdown table on stdout (what BENCHMARKS.md shows).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / 'benchmarks'):  # vggjax, and make_box_testbed (the photos scene's composition)
  if str(_path) not in sys.path:
    sys.path.insert(0, str(_path))

import numpy as np  # noqa: E402

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
SCALES = (32, 40, 48)
SCENES = ('photos', 'plain')
PICTURE = 48  # the photos scene's picture side
# Training scale S ~ U[min, max] and validation scale for each scene (the net's input: 32x32 crops).
SCENE_SCALES = {'photos': (32, 48, 40), 'plain': (32, 40, 36)}

# Sizes per class: (source train, source val, target train, target test).
FULL = dict(source_train=2000, source_val=200, target_train=100, target_test=300, source_steps=1000,
            finetune_steps=150, splits_per_class=(5, 20), num_splits=3)
QUICK = dict(source_train=400, source_val=40, target_train=30, target_test=60, source_steps=160,
             finetune_steps=40, splits_per_class=(5,), num_splits=2)


def write_folders(root: pathlib.Path, data_dir: str, sizes: dict, seed: int = 0, scene: str = 'photos'
                  ) -> tuple[pathlib.Path, ...]:
  """ROOT/source/{train,val}/<class>/*.png and ROOT/target/{train,val}/<class>/*.png from Fashion-MNIST
  (the source classes' images from its training file, the target classes' train from its training file and
  val from its test file). Scene 'photos': each item composed on a window of a real photograph (PICTURE
  pixels square; the source's backgrounds from the even-numbered photographs, the target's from the odd);
  'plain': the 28x28 image as it is. Returns (source root, target root)."""
  from PIL import Image
  from vggjax.data import sources
  if scene not in SCENES:
    raise ValueError(f'scene={scene!r}: expected one of {SCENES}')
  train = sources.idx_source('fashion_mnist', data_dir, 'train')
  test = sources.idx_source('fashion_mnist', data_dir, 'test')
  rng = np.random.default_rng(seed)
  photos = None
  if scene == 'photos':
    import make_box_testbed
    photos = make_box_testbed.photographs()
    backgrounds = {'source': photos[0::2], 'target': photos[1::2]}
  plan = [('source', 'train', train, SOURCE_CLASSES, sizes['source_train'], 0),
          ('source', 'val', train, SOURCE_CLASSES, sizes['source_val'], sizes['source_train']),
          ('target', 'train', train, TARGET_CLASSES, sizes['target_train'], 0),
          ('target', 'val', test, TARGET_CLASSES, sizes['target_test'], 0)]
  perms = {}
  for domain, split, src, classes, n, skip in plan:
    for c in classes:
      key = (id(src), c)
      if key not in perms:
        perms[key] = rng.permutation(np.flatnonzero(src.labels == c))
      chosen = perms[key][skip:skip + n]
      name = sources.FASHION_MNIST_CLASSES[c].replace('/', '-').replace(' ', '_')
      d = root / domain / split / f'{c}_{name}'
      d.mkdir(parents=True, exist_ok=True)
      for i in chosen:
        path = d / f'{i:05d}.png'
        if photos is None:
          picture = src.images[i]
        else:  # drawn even when the file exists, so that a resumed run's pictures are the same
          pool = backgrounds[domain]
          picture, _ = make_box_testbed.compose(pool[int(rng.integers(len(pool)))], src.images[i], rng,
                                                PICTURE, PICTURE)
        if not path.exists():
          Image.fromarray(picture).save(path)
  return root / 'source', root / 'target'


def folder_stats(root: pathlib.Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """The training images' mean and standard deviation per RGB channel (0-255; every 10th image; grey images
  count as three equal channels)."""
  from PIL import Image
  files = sorted((root / 'train').rglob('*.png'))[::10]
  x = np.concatenate([np.asarray(Image.open(f).convert('RGB'), np.float64).reshape(-1, 3) for f in files])
  return tuple(round(float(m), 1) for m in x.mean(0)), tuple(round(float(s), 1) for s in x.std(0))


def main_cli(workdir: pathlib.Path, config: str, overrides: list[str], env: dict | None = None, log=print
             ) -> None:
  """`python -m vggjax.main` as a user runs it (resumes if the run exists)."""
  cmd = [sys.executable, '-m', 'vggjax.main', f'--config={config}', f'--workdir={workdir}', *overrides]
  t0 = time.time()
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  if p.returncode:
    raise RuntimeError(f'{" ".join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}')
  log(f'  {p.stdout.strip().splitlines()[-1]} ({time.time() - t0:.0f} s)')


def recipe_overrides(root: pathlib.Path, stats: tuple, steps: int, batch: int, scene: str = 'photos',
                     seed: int = 0) -> list[str]:
  """The demo's recipe on a folder. The photos scene: VGG-A with batch norm (vgg11_bn), inputs divided by
  their standard deviation, no dropout - the demo's plain VGG-A (with or without normalised inputs) and
  vgg11_bn at lr 0.05 stayed at chance for 160 steps on these pictures; this one left it."""
  s_min, s_max, q = SCENE_SCALES[scene]
  mean, std = stats
  extra = []
  if scene == 'photos':
    extra = ['--config.model.name=vgg11_bn', '--config.model.dropout_rate=0.0',
             f'--config.data.std_rgb=({std[0]}, {std[1]}, {std[2]})']
  return extra + ['--config.data.source=folder', f'--config.data.data_dir={root}',
          f'--config.data.mean_rgb=({mean[0]}, {mean[1]}, {mean[2]})', '--config.data.flip=True',
          f'--config.data.scale_min={s_min}', f'--config.data.scale_max={s_max}',
          f'--config.data.eval_scale={q}', f'--config.seed={seed}',
          f'--config.train.max_steps={steps}', f'--config.train.global_batch_size={batch}',
          f'--config.train.eval_every_steps={max(steps // 4, 1)}', '--config.train.log_every_steps=20',
          f'--config.train.checkpoint_every_steps={steps}', '--config.train.checkpoint_every_epoch=False',
          '--config.train.plot=False']


def untrained_weights(run: pathlib.Path, out: pathlib.Path, seed: int = 1) -> pathlib.Path:
  """The source net's architecture and initialisation (the run's model.init), never trained."""
  import jax
  import jax.numpy as jnp
  from vggjax import checkpoints
  meta = checkpoints.load_meta(run)
  init = json.loads((run / 'config.json').read_text())['model']['init']
  model = checkpoints.model_from_meta(meta, init=init)
  size = meta['model']['image_size']
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  meta = {**meta, 'source': f'untrained ({init} initialisation only)'}
  meta.pop('step', None)
  return checkpoints.save_weights(out, jax.device_get(variables), meta)


def pixels(image: np.ndarray, scene: str) -> np.ndarray:
  """An image as a pixel vector: all three channels for photos, one for the plain scene's grey images (the
  folder source repeats them to RGB)."""
  return (image if scene == 'photos' else image[..., 0]).reshape(-1)


def pixel_results(target: pathlib.Path, protocols: list[dict], scene: str, ap_mode: str = 'voc12'
                  ) -> list[dict]:
  """The same SVMs and splits on raw pixels (the whole image as one vector, L2-normalised: 28x28 grey for
  the plain scene, 48x48x3 for photos)."""
  import ml_collections
  from vggjax import linear_probe
  from vggjax.data.examples import open_examples
  from vggjax.descriptors import l2_normalize
  cfg = ml_collections.ConfigDict({'source': 'folder', 'data_dir': str(target), 'train_split': 'train',
                                   'eval_split': 'val', 'name': ''})
  tr, ev = open_examples(cfg, 'train'), open_examples(cfg, 'val')
  x = np.stack([pixels(ex.image(i), scene) for ex in (tr, ev) for i in range(len(ex))])
  x = l2_normalize(x.astype(np.float32))
  y = np.concatenate([tr.labels, ev.labels])
  out = []
  for p in protocols:
    if p['train_per_class']:
      splits = linear_probe.class_splits(y, p['train_per_class'], 0, p['num_splits'], 0)
    else:
      splits = [(np.arange(len(tr)), len(tr) + np.arange(len(ev)))]
    out.append(linear_probe.run_protocol(x, y, splits, num_classes=len(tr.class_names), ap_mode=ap_mode))
  return out


def control_results(source: pathlib.Path, nets: dict, sizes: dict, cache_dir: pathlib.Path, out: pathlib.Path,
                    scene: str) -> dict:
  """The control: the same descriptors, SVMs and random splits on held-out images of the classes the net
  was trained on (the source's val folder as one pool), and raw pixels on the same splits."""
  import ml_collections
  from vggjax import linear_probe, transfer
  from vggjax.data.examples import open_examples
  from vggjax.descriptors import l2_normalize
  cfg = ml_collections.ConfigDict({'source': 'folder', 'data_dir': str(source), 'train_split': 'val',
                                   'eval_split': '', 'name': 'Fashion-MNIST 0-4'})
  rows = {}
  for method, weights in nets.items():
    rows[method] = [transfer.transfer([str(weights)], cfg, workdir=str(out / f'control_{method}_{n}'),
                                      scales=SCALES, train_per_class=n, num_splits=sizes['num_splits'],
                                      cache_dir=str(cache_dir), progress=False)
                    for n in sizes['splits_per_class']]
  ex = open_examples(cfg, 'val')
  x = np.stack([pixels(ex.image(i), scene) for i in range(len(ex))]).astype(np.float32)
  x = l2_normalize(x)
  rows['pixels'] = [linear_probe.run_protocol(x, ex.labels, linear_probe.class_splits(ex.labels, n, 0,
                                                                                      sizes['num_splits']),
                                              num_classes=len(ex.class_names))
                    for n in sizes['splits_per_class']]
  return {m: [{k: r[k] for k in ('mean_class_recall', 'mean_class_recall_std')} for r in rs]
          for m, rs in rows.items()}


def run(out: pathlib.Path, sizes: dict, data_dir: str = '', env: dict | None = None, log=print,
        scene: str = 'photos', seed: int = 0) -> dict:
  """The whole experiment; returns {'results': {method: [metrics per column]}, ...}. `seed` draws the
  images (and the photos scene's composition) and seeds both training runs."""
  import ml_collections
  from vggjax import transfer
  t_start = time.time()
  out.mkdir(parents=True, exist_ok=True)
  log(f'1. image folders in {out / "data"}')
  source, target = write_folders(out / 'data', data_dir, sizes, seed, scene)
  stats = folder_stats(source)
  demo = str(REPO / 'configs' / 'demo.py')
  log(f'2. source net on classes {SOURCE_CLASSES} ({sizes["source_steps"]} steps)')
  src_run = out / 'source_run'
  t0 = time.time()
  main_cli(src_run, demo, recipe_overrides(source, stats, sizes['source_steps'], 64, scene, seed), env, log)
  source_seconds = time.time() - t0
  src_val = [json.loads(l) for l in (src_run / 'metrics.jsonl').read_text().splitlines() if 'val_top1' in l]
  log('3. untrained net')
  untrained = untrained_weights(src_run, out / 'untrained', seed + 1)
  log(f'5. fine-tuning on the target training images ({sizes["finetune_steps"]} steps)')
  ft_run = out / 'finetune_run'
  t0 = time.time()
  main_cli(ft_run, f"{REPO / 'configs' / 'finetune.py'}:demo",
           recipe_overrides(target, stats, sizes['finetune_steps'], 50, scene, seed) +
           [f'--config.init_from={src_run}'], env, log)
  finetune_seconds = time.time() - t0
  cfg = ml_collections.ConfigDict({'source': 'folder', 'data_dir': str(target), 'train_split': 'train',
                                   'eval_split': 'val', 'name': 'Fashion-MNIST 5-9'})
  protocols = [{'train_per_class': n, 'num_splits': sizes['num_splits']} for n in sizes['splits_per_class']]
  protocols.append({'train_per_class': 0, 'num_splits': 1})
  rows: dict[str, list[dict]] = {}
  log('4. SVMs on descriptors and on pixels')
  for method, weights in (('pretrained', src_run), ('untrained', untrained)):
    rows[method] = [transfer.transfer([str(weights)], cfg, workdir=str(out / 'transfer' / f'{method}_{i}'),
                                      scales=SCALES, train_per_class=p['train_per_class'],
                                      num_splits=p['num_splits'], cache_dir=str(out / 'descriptors'),
                                      progress=False) for i, p in enumerate(protocols)]
  rows['pretrained_stack'] = [transfer.transfer(
      [str(src_run)], cfg, workdir=str(out / 'transfer' / f'pretrained_stack_{i}'), scales=SCALES,
      combine='stack', train_per_class=p['train_per_class'], num_splits=p['num_splits'],
      cache_dir=str(out / 'descriptors'), progress=False) for i, p in enumerate(protocols)]
  rows['pixels'] = pixel_results(target, protocols, scene)
  rows['finetuned'] = [None] * (len(protocols) - 1) + [transfer.transfer(
      [str(ft_run)], cfg, workdir=str(out / 'transfer' / 'finetuned'), scales=SCALES, classifier='net',
      cache_dir=str(out / 'descriptors'), progress=False)]
  log('6. control: the same SVMs on held-out images of the source classes')
  control = control_results(source, {'pretrained': src_run, 'untrained': untrained}, sizes,
                            out / 'descriptors', out / 'transfer', scene)
  keep = ('mean_class_recall', 'mean_class_recall_std', 'accuracy', 'mAP', 'mAP_std')
  table = {m: [None if r is None else {k: r[k] for k in keep if k in r} | {'C': [s['C'] for s in r['splits']]}
               for r in rs] for m, rs in rows.items()}
  result = {
      'date': datetime.date.today().isoformat(), 'machine': platform.platform(), 'cpus': os.cpu_count(),
      'scene': scene, 'seed': seed, 'picture': PICTURE if scene == 'photos' else 28,
      'sizes': sizes, 'scales': list(SCALES), 'train_scales': list(SCENE_SCALES[scene]),
      'source_classes': list(SOURCE_CLASSES),
      'target_classes': list(TARGET_CLASSES), 'protocols': protocols, 'results': table, 'control': control,
      'source_val_top1': src_val[-1]['val_top1'] if src_val else None,
      'source_train_s': round(source_seconds, 1), 'finetune_s': round(finetune_seconds, 1),
      'wall_s': round(time.time() - t_start, 1)}
  (out / 'results.json').write_text(json.dumps(result, indent=1))
  return result


METHOD_NAMES = {
    'pixels': 'raw pixels (the whole image, L2-normalised), linear SVM',
    'untrained': 'untrained net: fc7, Q=32,40,48 averaged, linear SVM',
    'pretrained': 'net trained on classes 0-4: fc7, Q=32,40,48 averaged, linear SVM',
    'pretrained_stack': 'net trained on classes 0-4: fc7, Q=32,40,48 stacked, linear SVM',
    'finetuned': 'net trained on classes 0-4, fine-tuned (fc8 new), its own classifier',
}


def markdown(result: dict) -> str:
  cols = []
  for p in result['protocols']:
    if p['train_per_class']:
      cols.append(f'mean class recall, {p["train_per_class"]}/class ({p["num_splits"]} splits)')
  n = result['sizes']['target_train']
  cols += [f'mean class recall, {n}/class (fixed split)', f'mAP, {n}/class (fixed split)']
  lines = ['| method | ' + ' | '.join(cols) + ' |', '|---' * (len(cols) + 1) + '|']
  for method, rs in result['results'].items():
    cells = []
    for p, r in zip(result['protocols'], rs):
      if r is None:
        cells.append('-')
      elif p['train_per_class']:
        cells.append(f'{100 * r["mean_class_recall"]:.1f} ± {100 * r["mean_class_recall_std"]:.1f}')
      else:
        cells += [f'{100 * r["mean_class_recall"]:.1f}', f'{100 * r["mAP"]:.1f}']
    lines.append(f'| {METHOD_NAMES.get(method, method)} | ' + ' | '.join(cells) + ' |')
  control = result.get('control')
  if control:
    ns = result['sizes']['splits_per_class']
    lines += ['', '| control: held-out images of classes 0-4 | ' +
              ' | '.join(f'mean class recall, {n}/class ({result["sizes"]["num_splits"]} splits)'
                         for n in ns) + ' |',
              '|---' * (len(ns) + 1) + '|']
    for method, rs in control.items():
      cells = [f'{100 * r["mean_class_recall"]:.1f} ± {100 * r["mean_class_recall_std"]:.1f}' for r in rs]
      lines.append(f'| {METHOD_NAMES.get(method, method)} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='runs/transfer_experiment', help='Working directory (resumable).')
  parser.add_argument('--quick', action='store_true', help='The CI-sized run (smaller samples, fewer steps).')
  parser.add_argument('--data_dir', default='', help='Fashion-MNIST IDX directory (default: Debian\'s).')
  parser.add_argument('--scene', default='photos', choices=SCENES,
                      help='photos: the items at random positions and sizes on real photographs, 48x48 '
                           '(default); plain: Fashion-MNIST\'s centred 28x28 images.')
  parser.add_argument('--seed', type=int, default=0, help='Draws the images and seeds both training runs.')
  args = parser.parse_args()
  result = run(pathlib.Path(args.out), QUICK if args.quick else FULL, args.data_dir,
               log=lambda *a: print(*a, flush=True), scene=args.scene, seed=args.seed)
  print(markdown(result))
  print(f'source net val top-1 {result["source_val_top1"]:.4f}; source training '
        f'{result["source_train_s"]} s, fine-tuning {result["finetune_s"]} s, total {result["wall_s"]} s; '
        f'{args.out}/results.json')


if __name__ == '__main__':
  main()
