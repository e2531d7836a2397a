"""The whole training loop's throughput against the bare jitted step's, side by side in one process.

The loop is vggjax.train.train_and_evaluate as `python -m vggjax.main` runs it (input pipeline, host-to-device
transfer, schedule, metrics, progress bar, checkpoints); its img/s are the steady-state rows of metrics.jsonl
(the first logging window, with compilation, is dropped; evaluation time is excluded by the loop itself).
The bare step is the same jitted step on one batch already on the device, timed after a warm-up with
block_until_ready. Overhead = 1 - loop / bare. A third run replays 8 batches made beforehand through the same
loop: the loop's own cost without the input pipeline's host work (which, on a CPU, shares the cores with
the step; on an accelerator it overlaps the device's work).

    python benchmarks/train_loop.py [--models vgg11,vgg16] [--steps 120] [--batch 64] [--width 0.25] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from configs import demo  # noqa: E402
from vggjax import checkpoints, optim, parallel, train  # noqa: E402
from vggjax.data import pipeline  # noqa: E402


def config_for(name: str, args):
  c = demo.get_config()
  c.model.name = name
  c.model.width = args.width
  c.train.global_batch_size = args.batch
  c.train.max_steps = args.steps
  c.train.log_every_steps = args.log_every
  c.train.eval_every_steps = args.steps  # one evaluation, at the end
  c.train.checkpoint_every_steps = args.steps  # one checkpoint, at the end: its cost is measured apart
  c.train.checkpoint_every_epoch = False
  c.train.plot = False
  c.optimizer.schedule = 'constant'
  return c


def bare_step_img_per_s(config, repeats: int) -> float:
  info = pipeline.dataset_info(config.data)
  import ml_collections
  from vggjax import config_lib
  config = config_lib.resolve(ml_collections.ConfigDict(config.to_dict()), info.num_classes)
  mesh = parallel.make_mesh()
  model = train.build_model(config)
  tx = optim.make_optimizer(config.optimizer)
  state = train.create_train_state(model, tx, mesh, 0)
  step = train.make_train_step(model, tx, mesh, norm=train.normalization(config),
                               color_shift=config.data.color_shift)
  it = pipeline.train_iterator(config.data, global_batch_size=config.train.global_batch_size, seed=0)
  batch = parallel.global_batch(next(it), mesh)
  lr = np.float32(config.optimizer.lr)
  for _ in range(3):
    state, m = step(state, batch, lr)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(repeats):
    state, m = step(state, batch, lr)
  jax.block_until_ready(state)
  img_per_s = repeats * config.train.global_batch_size / (time.perf_counter() - t0)
  # What one asynchronous checkpoint costs the loop (the blocking part of a save).
  with tempfile.TemporaryDirectory() as workdir:
    ckpt = checkpoints.TrainCheckpointer(workdir, keep=2)
    ckpt.save(1, state, it, {})
    ckpt.wait()
    costs = []
    for s in range(2, 7):
      t0 = time.perf_counter()
      ckpt.save(s, state, it, {})
      costs.append(time.perf_counter() - t0)
      ckpt.wait()
    ckpt.close()
  return img_per_s, statistics.median(costs)


class _Replay:
  """Batches made once, handed out again: the loop without the input pipeline's host work."""

  def __init__(self, batches):
    self.batches, self.i = batches, 0

  def __next__(self):
    self.i += 1
    return self.batches[(self.i - 1) % len(self.batches)]

  def get_state(self):
    return {'i': self.i}

  def set_state(self, state):
    self.i = state['i']


def loop_img_per_s(config, replay: bool = False) -> tuple[float, float]:
  real = pipeline.train_iterator
  if replay:
    it = real(config.data, global_batch_size=config.train.global_batch_size, seed=0)
    batches = [next(it) for _ in range(8)]
    pipeline.train_iterator = lambda *a, **k: _Replay(batches)
  with tempfile.TemporaryDirectory() as workdir:
    t0 = time.perf_counter()
    try:
      train.train_and_evaluate(config, workdir)
    finally:
      pipeline.train_iterator = real
    wall = time.perf_counter() - t0
    rows = [r for r in train.vlog.read_metrics(workdir) if 'img_per_s' in r]
  return statistics.median(r['img_per_s'] for r in rows[1:]), wall


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--models', default='vgg11,vgg16')
  p.add_argument('--steps', type=int, default=120)
  p.add_argument('--log-every', type=int, default=10)
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--width', type=float, default=0.25)
  p.add_argument('--rounds', type=int, default=2, help='interleaved bare/loop rounds; medians reported')
  p.add_argument('--json', action='store_true')
  args = p.parse_args()
  flags.FLAGS.mark_as_parsed()
  results = []
  for name in args.models.split(','):
    config = config_for(name, args)
    bares, loops, replays, walls, saves = [], [], [], [], []
    for _ in range(args.rounds):  # interleaved, so that a noisy neighbour hits all alike
      bare, save_s = bare_step_img_per_s(config, repeats=args.steps)
      bares.append(bare)
      saves.append(save_s)
      loop, wall = loop_img_per_s(config)
      loops.append(loop)
      walls.append(wall)
      replays.append(loop_img_per_s(config, replay=True)[0])
    bare, loop, wall = statistics.median(bares), statistics.median(loops), statistics.median(walls)
    replay = statistics.median(replays)
    results.append({'model': name, 'width': args.width, 'image_size': config.data.image_size,
                    'batch': args.batch, 'bare_img_per_s': round(bare, 1), 'loop_img_per_s': round(loop, 1),
                    'loop_over_bare': round(loop / bare, 3), 'overhead_pct': round(100 * (1 - loop / bare), 1),
                    'loop_no_pipeline_img_per_s': round(replay, 1),
                    'overhead_no_pipeline_pct': round(100 * (1 - replay / bare), 1),
                    'loop_wall_s': round(wall, 1),
                    'checkpoint_save_ms': round(1000 * statistics.median(saves), 1)})
  meta = {'machine': f'{platform.machine()}, {os.cpu_count()} cores', 'jax': jax.__version__,
          'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
          'date': time.strftime('%Y-%m-%d')}
  if args.json:
    print(json.dumps({'meta': meta, 'results': results}, indent=2))
    return
  print(f'# {meta}')
  print('| model | width | size | batch | bare step img/s | loop img/s | overhead | loop without the '
        'pipeline img/s | overhead | one checkpoint save (blocking) |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for r in results:
    print(f'| {r["model"]} | {r["width"]} | {r["image_size"]} | {r["batch"]} | {r["bare_img_per_s"]} | '
          f'{r["loop_img_per_s"]} | {r["overhead_pct"]}% | {r["loop_no_pipeline_img_per_s"]} | '
          f'{r["overhead_no_pipeline_pct"]}% | {r["checkpoint_save_ms"]} ms |')


if __name__ == '__main__':
  main()
