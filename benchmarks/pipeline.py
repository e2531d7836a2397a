"""Training-transform throughput per CPU core on real JPEG photos: vggjax against a torchvision-style PIL
pipeline and tf.data doing the same work, side by side in one run.

The work, per image, for every contestant: decode the JPEG bytes (held in memory), rescale isotropically
so that the smaller side is S (S = 256 fixed, and S ~ U[256, 512] per image), take a random 224x224 crop,
flip it with probability 1/2, and end with a uint8 224x224x3 array (what vggjax ships to the device).

* vggjax: ``vggjax.data.transforms.train_transform`` (simplejpeg decode, OpenCV bilinear resize), and the
  whole pipeline (folder source + Grain, main process, one thread) reading the same files from disk.
* torchvision-style PIL: ``Image.open(...).convert('RGB')``, ``torchvision.transforms.functional.resize``
  (Pillow's antialiased bilinear), ``crop``, ``hflip``, ``np.asarray``. (RandomResizedCrop is not the same
  work.) Run with torchvision when it imports, with the same Pillow calls otherwise.
* tf.data: ``tf.io.decode_jpeg``, ``tf.image.resize`` (bilinear), ``tf.image.random_crop``,
  ``tf.image.random_flip_left_right`` in a tf.data map with one thread. In this process if TensorFlow imports,
  else in ``--tf_python``'s interpreter (a separate environment with tensorflow-cpu), else skipped.

Every contestant runs pinned to one CPU core (sched_setaffinity, library thread pools set to 1), in
interleaved rounds. The figure is images per CPU-second of the process (all its threads; on one core, the
throughput of a core that is all its own), the median over rounds; wall-clock images/s are reported too.
On a machine shared with other jobs the CPU-time figure is the stable one.

Photos: ``--photos DIR`` (any JPEGs, used as they are), or ``--make_from DIR...`` (default: Debian's
wallpaper photos from plasma-workspace-wallpapers and mate-backgrounds), cut into ImageNet-like 500x375 and
375x500 JPEGs (quality 90) in ``--work_dir``.

    python benchmarks/pipeline.py [--photos DIR | --make_from /usr/share/wallpapers ...] [--rounds 5]
        [--tf_python PATH] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_SOURCES = ('/usr/share/wallpapers', '/usr/share/backgrounds')
SCALES = {'S=256': (256, 256), 'S~U[256,512]': (256, 512)}
CROP = 224


def pin_to_one_core() -> int:
  cpu = sorted(os.sched_getaffinity(0))[-1]
  os.sched_setaffinity(0, {cpu})
  return cpu


# ----------------------------------------------------------------------------------------------------------
# Photos.


def make_photos(sources, out_dir: pathlib.Path, per_photo: int = 4,
                max_photos: int = 40) -> list[pathlib.Path]:
  """ImageNet-like JPEGs (500x375 or 375x500, quality 90) cut from the largest version of each photo."""
  import numpy as np
  from PIL import Image
  found: dict[str, tuple[int, pathlib.Path]] = {}
  for src in sources:
    for path in sorted(pathlib.Path(src).rglob('*')):
      if path.suffix.lower() not in ('.jpg', '.jpeg', '.png') or not path.is_file():
        continue
      try:
        with Image.open(path) as im:
          pixels = im.width * im.height
      except Exception:  # noqa: BLE001
        continue
      # plasma themes: THEME/contents/images/WxH.jpg, one photo in many sizes: keep the largest
      key = path.parts[-4] if path.parent.name == 'images' and len(path.parts) >= 4 else str(path)
      if pixels >= 1000 * 750 and (key not in found or pixels > found[key][0]):
        found[key] = (pixels, path)
  photos = [p for _, p in sorted(found.values(), key=lambda t: str(t[1]))][:max_photos]
  if not photos:
    raise SystemExit(f'no photos of at least 1000x750 under {sources}; install Debian\'s '
                     f'plasma-workspace-wallpapers and mate-backgrounds, or pass --photos DIR')
  out_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  written = []
  for k, path in enumerate(photos):
    with Image.open(path) as im:
      im = im.convert('RGB')
      for j in range(per_photo):
        portrait = (k + j) % 4 == 3
        w, h = (375, 500) if portrait else (500, 375)
        frac = rng.uniform(0.4, 0.9)  # a window of 40-90% of the photo's extent, at 4:3 or 3:4
        cw = int(min(im.width, im.height * w / h) * frac)
        ch = int(cw * h / w)
        left, top = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        window = im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.LANCZOS)
        out = out_dir / f'{k:03d}_{j}.jpg'
        window.save(out, quality=90)
        written.append(out)
  return written


# ----------------------------------------------------------------------------------------------------------
# Contestants: each takes the list of JPEG bytes and (smin, smax), returns (wall seconds, CPU seconds of the
# whole process, all threads) for one pass.


def _clock():
  return time.perf_counter(), time.process_time()


def _elapsed(start, scale: float = 1.0):
  return (time.perf_counter() - start[0]) * scale, (time.process_time() - start[1]) * scale


def run_vggjax(datas, smin, smax) -> float:
  import cv2

  from vggjax.data import transforms
  cv2.setNumThreads(1)
  t = _clock()
  for i, data in enumerate(datas):
    out = transforms.train_transform(data, transforms.example_rng(0, 0, i), image_size=CROP, scale_min=smin,
                                     scale_max=smax)
    assert out.shape == (CROP, CROP, 3)
  return _elapsed(t)


def run_vggjax_pipeline(paths, smin, smax) -> float:
  """The whole pipeline: folder source (files from disk), Grain, batches of 32, main process, 1 thread."""
  import cv2
  import ml_collections

  from vggjax.data import pipeline, sources
  cv2.setNumThreads(1)
  root = paths[0].parent.parent.parent
  cfg = ml_collections.ConfigDict(dict(source='folder', data_dir=str(root), train_split='train',
                                       eval_split='validation', image_size=CROP, scale_min=smin,
                                       scale_max=smax,
                                       flip=True, num_workers=0, prefetch=1, num_threads=1))
  src = sources.FolderSource(root, 'train')
  batch = 32
  it = pipeline.TrainIterator(cfg, global_batch_size=batch, seed=0, source=src)
  steps = len(src) // batch
  next(it)  # start-up (Grain's thread pool) outside the timing
  t = _clock()
  for _ in range(steps - 1):
    next(it)
  dt = _elapsed(t, len(paths) / ((steps - 1) * batch))  # per pass over len(paths) images
  it.close()
  return dt


def _torchvision_functional():
  try:
    name = 'torchvision._meta_registrations'
    sys.modules.setdefault(name, types.ModuleType(name))
    import torch
    torch.set_num_threads(1)
    import torchvision.transforms.functional as F
    return F, 'torchvision'
  except Exception:  # noqa: BLE001
    return None, 'Pillow'


def run_pil(datas, smin, smax) -> float:
  import numpy as np
  from PIL import Image
  F, _ = _torchvision_functional()
  rng = np.random.default_rng(0)
  t = _clock()
  for data in datas:
    im = Image.open(io.BytesIO(data)).convert('RGB')
    s = int(rng.integers(smin, smax + 1))
    if F is not None:
      im = F.resize(im, s)  # smaller side to s, Pillow bilinear with antialiasing
    else:
      w, h = im.size
      im = im.resize((s, int(h * s / w)) if w <= h else (int(w * s / h), s), Image.BILINEAR)
    top, left = int(rng.integers(0, im.height - CROP + 1)), int(rng.integers(0, im.width - CROP + 1))
    im = F.crop(im, top, left, CROP, CROP) if F is not None else im.crop((left, top, left + CROP, top + CROP))
    if rng.random() < 0.5:
      im = F.hflip(im) if F is not None else im.transpose(Image.FLIP_LEFT_RIGHT)
    out = np.asarray(im)
    assert out.shape == (CROP, CROP, 3)
  return _elapsed(t)


def run_tf(datas, smin, smax) -> float:
  import tensorflow as tf
  tf.config.threading.set_inter_op_parallelism_threads(1)
  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.random.set_seed(0)

  def transform(data):
    image = tf.io.decode_jpeg(data, channels=3)
    s = tf.random.uniform([], smin, smax + 1, dtype=tf.int32)
    shape = tf.shape(image)[:2]
    scale = tf.cast(s, tf.float32) / tf.cast(tf.reduce_min(shape), tf.float32)
    size = tf.maximum(tf.cast(tf.round(tf.cast(shape, tf.float32) * scale), tf.int32), s)
    image = tf.image.resize(image, size, method='bilinear')
    image = tf.image.random_crop(image, [CROP, CROP, 3])
    image = tf.image.random_flip_left_right(image)
    return tf.cast(tf.round(image), tf.uint8)

  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  options.autotune.enabled = False
  ds = tf.data.Dataset.from_tensor_slices(datas).map(transform, num_parallel_calls=1).with_options(options)
  for _ in ds.take(8):  # graph tracing outside the timing
    pass
  t = _clock()
  n = 0
  for out in ds:
    n += 1
  assert n == len(datas) and tuple(out.shape) == (CROP, CROP, 3)
  return _elapsed(t)


def _tf_in_subprocess(python: str, photo_dir: pathlib.Path, smin: int, smax: int):
  proc = subprocess.run([python, __file__, '--only_tf', '--photos', str(photo_dir), '--tf_scale',
                         f'{smin},{smax}'], capture_output=True, text=True, timeout=600,
                        env={**os.environ, 'CUDA_VISIBLE_DEVICES': '', 'TF_CPP_MIN_LOG_LEVEL': '2'})
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith('{'):
      return tuple(json.loads(line)['seconds'])
  print('tf.data subprocess failed:', proc.stderr[-1500:], file=sys.stderr)
  return None


def _tf_version(python: str | None) -> str | None:
  try:
    import tensorflow as tf
    return tf.__version__
  except ImportError:
    pass
  if python:
    proc = subprocess.run([python, '-c', 'import tensorflow as tf; print(tf.__version__)'],
                          capture_output=True, text=True, env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
    return proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else None
  return None


# ----------------------------------------------------------------------------------------------------------


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--photos', help='a folder of JPEGs to use as they are')
  p.add_argument('--make_from', nargs='*', default=list(DEFAULT_SOURCES),
                 help='folders of large photos to cut 500x375 JPEGs from (default: Debian wallpapers)')
  p.add_argument('--work_dir', default=os.path.join(tempfile.gettempdir(), 'vggjax_pipeline_bench'))
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--tf_python', default='', help='an interpreter with tensorflow-cpu, for the tf.data column')
  p.add_argument('--json', default='', help='write the results here')
  p.add_argument('--only_tf', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--tf_scale', default='256,256', help=argparse.SUPPRESS)
  args = p.parse_args()

  pin_to_one_core()
  if args.only_tf:  # the tf.data contestant in its own interpreter
    datas = [q.read_bytes() for q in sorted(pathlib.Path(args.photos).rglob('*.jp*g'))]
    smin, smax = (int(v) for v in args.tf_scale.split(','))
    print(json.dumps({'seconds': run_tf(datas, smin, smax)}))
    return

  sys.path.insert(0, str(REPO))
  if args.photos:
    paths = sorted(pathlib.Path(args.photos).rglob('*.jp*g'))
  else:
    out = pathlib.Path(args.work_dir) / 'photos' / 'train' / 'all'
    paths = sorted(out.glob('*.jpg')) or make_photos(args.make_from, out)
  if not paths:
    raise SystemExit('no JPEG photos found')
  datas = [q.read_bytes() for q in paths]
  from PIL import Image
  sizes = [Image.open(io.BytesIO(d)).size for d in datas[:50]]
  tf_version = _tf_version(args.tf_python)
  in_process_tf = False
  try:
    import tensorflow  # noqa: F401
    in_process_tf = True
  except ImportError:
    pass
  _, pil_kind = _torchvision_functional()
  use_pipeline = not args.photos  # the folder layout ROOT/train/<class>/ exists for made photos

  results = {}
  for label, (smin, smax) in SCALES.items():
    times = {k: [] for k in ('vggjax', 'vggjax_pipeline', 'pil', 'tf')}
    for _ in range(args.rounds):
      times['vggjax'].append(run_vggjax(datas, smin, smax))
      if use_pipeline:
        times['vggjax_pipeline'].append(run_vggjax_pipeline(paths, smin, smax))
      times['pil'].append(run_pil(datas, smin, smax))
      if in_process_tf:
        times['tf'].append(run_tf(datas, smin, smax))
      elif args.tf_python and tf_version:
        s = _tf_in_subprocess(args.tf_python, paths[0].parent, smin, smax)
        if s is not None:
          times['tf'].append(s)
    # img/s per core from CPU time (robust to other jobs on a shared core) and from wall time
    results[label] = {k: len(datas) / statistics.median(c for _, c in v) for k, v in times.items() if v}
    results[label]['wall'] = {k: len(datas) / statistics.median(w for w, _ in v) for k, v in times.items() if v}
    results[label]['rounds_cpu'] = {k: [round(len(datas) / c, 1) for _, c in v] for k, v in times.items() if v}
    results[label]['rounds_wall'] = {k: [round(len(datas) / w, 1) for w, _ in v] for k, v in times.items() if v}

  bytes_uint8 = CROP * CROP * 3
  meta = {'images': len(datas), 'example_sizes': sorted(set(sizes))[:4], 'rounds': args.rounds,
          'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
          'cpu': _cpu_name(), 'python': platform.python_version(), 'pil_kind': pil_kind, 'tf': tf_version,
          'date': time.strftime('%Y-%m-%d'), 'bytes_per_image_uint8': bytes_uint8,
          'bytes_per_image_float32': 4 * bytes_uint8}
  print(json.dumps({'meta': meta, 'results': results}, indent=1))
  print()
  print(f'{len(datas)} JPEGs ({", ".join(f"{w}x{h}" for w, h in meta["example_sizes"])}...), one core, '
        f'median of {args.rounds} rounds, images per CPU-second (wall-clock images/s in brackets):')
  print('| scale | vggjax transform | vggjax pipeline (Grain, folder) | torchvision-style PIL | tf.data '
        '| vggjax / PIL | vggjax / tf.data |')
  print('|---|---|---|---|---|---|---|')
  for label, r in results.items():
    fmt = lambda k: f'{r[k]:.0f} ({r["wall"][k]:.0f})' if k in r else 'n/a'  # noqa: E731
    ratio = lambda k: f'{r["vggjax"] / r[k]:.2f}x' if k in r else 'n/a'  # noqa: E731
    print(f'| {label} | {fmt("vggjax")} | {fmt("vggjax_pipeline")} | {fmt("pil")} | {fmt("tf")} | '
          f'{ratio("pil")} | {ratio("tf")} |')
  print(f'\nhost-to-device bytes per image: uint8 {bytes_uint8:,} (vggjax) vs float32 {4 * bytes_uint8:,} '
        f'(a float pipeline); a batch of 256: {256 * bytes_uint8 / 2**20:.1f} MiB vs '
        f'{1024 * bytes_uint8 / 2**20:.1f} MiB')
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps({'meta': meta, 'results': results}, indent=1))


def _cpu_name() -> str:
  try:
    for line in open('/proc/cpuinfo'):
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == '__main__':
  main()
