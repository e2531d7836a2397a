"""Images per second of the paper's dense and multi-crop evaluation at the same scales (section 4.3 argues
that dense evaluation is the cheaper), measured with vggjax.evaluate, next to their analytic FLOPs.

    python benchmarks/eval_protocols.py                                  # narrow VGG-16 at a CPU size (64)
    python benchmarks/eval_protocols.py --image_size=224 --width=0.0625  # the paper's geometry, narrow net
    python benchmarks/eval_protocols.py --width=1 --image_size=224 --images=512 --batch_size=64   # on a GPU

Method: real photographs (scikit-learn's and scikit-image's, aspect ratios 1:1 to 3:2) repeated to
--images records; a randomly initialised network (throughput does not depend on the weights); the test
scales default to the paper's {S-32, S, S+32} for S = 256 and a 224 net, scaled to --image_size (at 64:
{64, 73, 82}). vggjax.evaluate runs every protocol on every image, and its img_per_s is the number of
images over the device time of that protocol's jitted calls (compilation excluded, the host's decoding and
rescaling excluded: it runs ahead in threads); the multi-scale figure is over the sum of the scales.

FLOPs (vggjax.models.flops, convolutions and FC layers, per image): dense = 2 (the image and its flip) x the
network at the whole rescaled image; multi-crop = 50 x the network at the training size. Both are given for
the exact rescaled images (what the paper's dense evaluation costs) and for the padded bucket shapes that
vggjax.evaluate actually runs (see its docstring: exact results, some compute spent on the padding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def photos() -> list:
  import numpy as np
  from sklearn.datasets import load_sample_images
  images = list(load_sample_images().images)
  try:
    import skimage.data
    for name in ('astronaut', 'chelsea', 'coffee', 'rocket', 'hubble_deep_field', 'immunohistochemistry'):
      images.append(getattr(skimage.data, name)())
  except (ImportError, AttributeError):
    pass
  return [np.ascontiguousarray(im[..., :3]) for im in images]


class Photos:
  """`n` records cycling through the photographs, random labels."""

  def __init__(self, n: int, num_classes: int):
    import numpy as np
    self.images = photos()
    self.n = n
    self.labels = np.random.default_rng(0).integers(0, num_classes, n)

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {'image': self.images[i % len(self.images)], 'label': int(self.labels[i])}


def random_variables(model, seed: int = 0):
  """He-scaled random weights drawn on the host (no compilation)."""
  import jax
  import numpy as np

  from vggjax import models
  rng = np.random.default_rng(seed)

  def draw(path, s):
    if path[-1].key == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    return np.zeros(s.shape, np.float32)

  return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(model))


def analytic_flops(args, source, scales) -> dict:
  """Mean FLOPs per image of each protocol at each scale: exact rescaled images and padded buckets."""
  import numpy as np

  from vggjax import evaluate as ev
  from vggjax import models
  from vggjax.data import transforms
  opts = dict(train_size=args.image_size, num_classes=args.num_classes, width=args.width,
              fc_features=args.fc_features or None)
  crop = models.flops(args.model, args.image_size, **opts).flops
  out = {}
  for q in scales:
    exact, padded = [], []
    for i in range(len(source)):
      h, w = transforms.rescaled_size(*source[i]['image'].shape[:2], q)
      exact.append(2 * models.flops(args.model, (h, w), **opts).flops)
      padded.append(2 * models.flops(args.model, ev.bucket_shape(h, w, q), **opts).flops)
    out[q] = {'single': crop, 'multicrop': 50 * crop, 'dense': float(np.mean(exact)),
              'dense_padded': float(np.mean(padded))}
  return out


def mask_overhead(model, variables, q: int, batch: int, seconds: float = 5.0) -> dict:
  """ms per batch of the exact (masked) dense step on a 4:3 bucket of images 11 columns narrower than the
  bucket, against the plain network on the same padded arrays (not exact: the padding leaks in)."""
  import time

  import jax
  import jax.numpy as jnp
  import numpy as np

  from vggjax import evaluate as ev
  from vggjax.preprocessing import normalize
  shape = ev.bucket_shape(q, round(q * 4 / 3), q)
  x = np.random.default_rng(0).integers(0, 256, (batch, *shape, 3)).astype(np.uint8)
  hw = np.tile(np.asarray([shape[0], shape[1] - 11], np.int32), (batch, 1))
  masked = jax.jit(lambda v, x, hw: ev.dense_posteriors(model, v, x, hw))
  plain = jax.jit(lambda v, x: jnp.mean(jax.lax.map(
      lambda im: jax.nn.softmax(model.apply(v, normalize(im))), jnp.stack([x, x[:, :, ::-1]])), 0))
  out = {'shape': list(shape), 'batch': batch}
  for rnd in range(2):  # interleaved rounds; the second is kept
    for name, fn, args in (('masked_ms', masked, (variables, x, hw)), ('plain_ms', plain, (variables, x))):
      fn(*args).block_until_ready()
      t, n = time.perf_counter(), 0
      while time.perf_counter() - t < seconds / 2:
        fn(*args).block_until_ready()
        n += 1
      out[name] = (time.perf_counter() - t) / n * 1000
  out['overhead'] = out['masked_ms'] / out['plain_ms'] - 1
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='vgg16')
  p.add_argument('--width', type=float, default=0.125, help='width multiplier (0.125: convs 8-16-32-64-64)')
  p.add_argument('--fc_features', type=int, default=0, help='fc6/fc7 width (0: 4096 x width)')
  p.add_argument('--image_size', type=int, default=64, help='the training size')
  p.add_argument('--scales', default='', help='comma-separated test scales (default: the paper\'s 224, 256, '
                 '288 scaled to --image_size)')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--images', type=int, default=64)
  p.add_argument('--batch_size', type=int, default=0, help='global batch (0: vggjax.evaluate\'s default)')
  p.add_argument('--num_cpu_devices', type=int, default=1)
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  p.add_argument('--json', action='store_true', help='print the record as JSON on stdout')
  p.add_argument('--out', default='', help='also write the record as JSON to this file')
  args = p.parse_args(argv)

  import jax
  if args.num_cpu_devices > 1:
    jax.config.update('jax_num_cpu_devices', args.num_cpu_devices)
  from vggjax import evaluate as ev
  from vggjax.evaluation import engine
  from vggjax import models
  from vggjax.data import transforms
  scales = ([int(q) for q in args.scales.split(',')] if args.scales else
            sorted({round(args.image_size * s / 224) for s in (224, 256, 288)}))
  model = models.get_model(args.model, num_classes=args.num_classes, width=args.width,
                           image_size=args.image_size, fc_features=args.fc_features or None, dtype=args.dtype)
  source = Photos(args.images, args.num_classes)
  m = ev.EvalModel(model, random_variables(model), scales=scales)
  warm = Photos(2 * (args.batch_size or 8 * jax.device_count()), args.num_classes)  # warms the runtime up
  ev.evaluate([m], warm, protocols=['single', 'dense', 'multicrop'], batch_size=args.batch_size,
              progress=False)
  result = ev.evaluate([m], source, protocols=['single', 'dense', 'multicrop'], batch_size=args.batch_size,
                       progress=not args.json)
  flops = analytic_flops(args, source, scales)
  rows = []
  keys = [str(q) for q in scales] + ([engine._scale_key(scales)] if len(scales) > 1 else [])
  per = result['results'][m.label]
  for key in keys:
    qs = [int(q) for q in key.split(',')]
    f = {k: sum(flops[q][k] for q in qs) for k in flops[qs[0]]}
    rows.append({
        'scales': key,
        'single_img_per_s': per['single'][key]['img_per_s'],
        'dense_img_per_s': per['dense'][key]['img_per_s'],
        'multicrop_img_per_s': per['multicrop'][key]['img_per_s'],
        'speedup_dense_over_multicrop': per['dense'][key]['img_per_s'] / per['multicrop'][key]['img_per_s'],
        'gflops_per_image': {k: v / 1e9 for k, v in f.items()},
        'flops_ratio_multicrop_over_dense': f['multicrop'] / f['dense'],
        'flops_ratio_multicrop_over_dense_padded': f['multicrop'] / f['dense_padded'],
    })
  # The same ratio for the full network at the paper's geometry (224 net, S = 256, Q = 224, 256, 288).
  paper_opts = dict(train_size=224, num_classes=1000)
  paper = {}
  for q in (224, 256, 288):
    dense = [2 * models.flops(args.model, transforms.rescaled_size(*im.shape[:2], q), **paper_opts).flops
             for im in source.images]
    paper[q] = 50 * models.flops(args.model, 224, **paper_opts).flops / (sum(dense) / len(dense))
  overhead = mask_overhead(model, m.variables, scales[len(scales) // 2], result['batch_size'])
  record = {
      'date': datetime.date.today().isoformat(), 'machine': platform.processor() or platform.machine(),
      'cpus': os.cpu_count(), 'device': str(jax.devices()[0].device_kind), 'devices': jax.device_count(),
      'jax': jax.__version__, 'model': args.model, 'width': args.width, 'fc_features': model.fc_features or
      round(4096 * args.width), 'image_size': args.image_size, 'dtype': args.dtype, 'images': args.images,
      'batch_size': result['batch_size'], 'buckets': result['buckets'], 'compile_s': result['compile_s'],
      'rows': rows, 'paper_flops_ratio_multicrop_over_dense': paper, 'mask_overhead': overhead,
      'command': 'python benchmarks/eval_protocols.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
  }
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(record, indent=2))
  if args.json:
    print(json.dumps(record, indent=2))
    return 0
  print(f'{args.model} width {args.width} (fc {record["fc_features"]}), trained at {args.image_size}, '
        f'{args.images} images, batch {result["batch_size"]}, {jax.device_count()} x {record["device"]}:')
  print('| test Q | single img/s | dense img/s | multi-crop img/s | dense / multi-crop speed | '
        'FLOPs multi-crop / dense (exact; padded) |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["scales"]} | {r["single_img_per_s"]:.1f} | {r["dense_img_per_s"]:.1f} | '
          f'{r["multicrop_img_per_s"]:.2f} | {r["speedup_dense_over_multicrop"]:.1f}x | '
          f'{r["flops_ratio_multicrop_over_dense"]:.1f}x; '
          f'{r["flops_ratio_multicrop_over_dense_padded"]:.1f}x |')
  print('full-size net, 224 training size, these photos: FLOPs multi-crop / dense = ' +
        ', '.join(f'{v:.1f}x at Q={q}' for q, v in paper.items()))
  print(f'exact (masked) dense step on {overhead["batch"]} x {overhead["shape"][0]}x{overhead["shape"][1]}: '
        f'{overhead["masked_ms"]:.1f} ms, unmasked {overhead["plain_ms"]:.1f} ms '
        f'({100 * overhead["overhead"]:+.1f}%)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
