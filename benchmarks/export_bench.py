"""CPU inference of VGG16 (float32, random weights, 224x224) side by side, in one process, interleaved rounds:
vggjax's jit, the exported StableHLO artefact, ONNX Runtime on the exported ONNX model, PyTorch eager
(torchvision's vgg16, weights=None) and torch.compile (where it works). Images per second at each batch size.

    python benchmarks/export_bench.py [--batches=1,8] [--rounds=3] [--threads=2] [--skip=compile]

Each engine is warmed up once per batch size; then every round runs each engine once per batch size in turn
(so drifts in the machine's load touch them all alike), and the median over rounds is reported. The
vggjax, StableHLO and ONNX engines take uint8 NHWC images with the normalisation inside; PyTorch takes the
float32 NCHW tensor it would be fed after its transforms (its normalisation is not timed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np


def vggjax_engines(directory, threads, skip):
  """{name: fn(uint8 batch)} for vggjax's jit, the StableHLO artefact and ONNX Runtime on our ONNX (the
  weights and artefacts, about 2 GB, written under `directory`)."""
  from vggjax import checkpoints, export, models
  meta = {'model': {'name': 'vgg16', 'num_classes': 1000, 'image_size': 224},
          'normalization': {'mean': [123.675, 116.28, 103.53], 'std': [58.395, 57.12, 57.375]},
          'source': 'random weights (benchmark)'}
  model = checkpoints.model_from_meta(meta)
  rng = np.random.RandomState(0)
  variables = jax.tree_util.tree_map(
      lambda s: (rng.randn(*s.shape) * np.sqrt(2.0 / max(1, np.prod(s.shape[:-1])))).astype(np.float32),
      models.variable_shapes(model))
  checkpoints.save_weights(os.path.join(directory, 'weights'), variables, meta)
  servable = export.load(os.path.join(directory, 'weights'))
  engines = {}
  jitted = jax.jit(export.entry_fn(servable, 'fixed'))
  engines['vggjax jit'] = lambda x: jitted(x).block_until_ready()
  if 'stablehlo' not in skip:
    files = export.write(servable, 'stablehlo', os.path.join(directory, 'vgg16.stablehlo'))
    call = jax.jit(export.load_stablehlo(files['fixed']))
    engines['StableHLO artefact'] = lambda x: call(x).block_until_ready()
  if 'onnx' not in skip:
    files = export.write(servable, 'onnx', os.path.join(directory, 'vgg16.onnx'))
    session = export.onnx_session(files['fixed'], threads=threads)
    engines['ONNX Runtime (our ONNX)'] = lambda x: session.run(None, {export.INPUT_NAME: x})
  return engines


def torch_engines(threads, skip):
  import torch
  import torchvision
  torch.set_num_threads(threads)
  net = torchvision.models.vgg16(weights=None).eval()
  engines = {}

  def eager(x):
    with torch.inference_mode():
      return net(x)
  engines['PyTorch eager'] = eager
  if 'compile' not in skip:
    try:
      compiled = torch.compile(net)
      with torch.inference_mode():
        compiled(torch.zeros(1, 3, 224, 224))

      def run_compiled(x):
        with torch.inference_mode():
          return compiled(x)
      engines['torch.compile'] = run_compiled
    except Exception as e:  # noqa: BLE001 - reported, not timed
      print(f'torch.compile unavailable: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
  return engines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count() or 1)
  parser.add_argument('--skip', default='', help='comma-separated: stablehlo, onnx, compile')
  args = parser.parse_args()
  batch_sizes = [int(b) for b in args.batches.split(',')]
  skip = set(filter(None, args.skip.split(',')))
  directory = tempfile.mkdtemp(prefix='export-bench-')
  try:
    engines = {**vggjax_engines(directory, args.threads, skip), **torch_engines(args.threads, skip)}
    run(engines, batch_sizes, args.rounds, args.threads)
  finally:
    shutil.rmtree(directory, ignore_errors=True)


def run(engines, batch_sizes, rounds, threads):
  import torch
  rng = np.random.RandomState(1)
  inputs = {}
  for b in batch_sizes:
    images = rng.randint(0, 256, (b, 224, 224, 3)).astype(np.uint8)
    tensor = torch.from_numpy(((images / 255.0 - 0.45) / 0.225).astype(np.float32).transpose(0, 3, 1, 2).copy())
    inputs[b] = (images, tensor)
  times = {(name, b): [] for name in engines for b in batch_sizes}
  for name, fn in engines.items():  # warm-up: compiles, allocations
    for b in batch_sizes:
      fn(inputs[b][1] if name.startswith(('PyTorch', 'torch')) else inputs[b][0])
  for r in range(rounds):
    for b in batch_sizes:
      for name, fn in engines.items():
        x = inputs[b][1] if name.startswith(('PyTorch', 'torch')) else inputs[b][0]
        start = time.perf_counter()
        fn(x)
        times[name, b].append(time.perf_counter() - start)
    print(f'round {r + 1}/{rounds} done', flush=True)
  eager = {b: b / statistics.median(times['PyTorch eager', b]) for b in batch_sizes}
  print(f'\nVGG16 float32 224x224, {threads} threads, median of {rounds} interleaved rounds')
  print('| engine | ' + ' | '.join(f'batch {b} img/s (x eager)' for b in batch_sizes) + ' |')
  print('|---|' + '---|' * len(batch_sizes))
  for name in engines:
    cells = []
    for b in batch_sizes:
      ips = b / statistics.median(times[name, b])
      cells.append(f'{ips:.2f} ({ips / eager[b]:.2f}x)')
    print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
