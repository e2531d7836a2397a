#!/usr/bin/env python3
"""The init's compile and run on a CPU, at XLA's default backend optimisation and at level 0 (what
vggjax.train_step.create_train_state uses on a CPU up to INIT_FAST_COMPILE_PARAMS parameters).

    python benchmarks/init_compile.py                       # narrow nets and VGG16 at full size, 3 rounds
    python benchmarks/init_compile.py --nets=vgg16:0.125:32 --rounds=1

Each measurement is a fresh process without a compilation cache (what a run on a new machine pays), the
two options interleaved round by round, so that a loaded machine slows both alike. Prints one Markdown row
per net and option: the seconds of compile and run of each round, and whether the initial parameters are
bitwise equal to the default's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r'''
import json, sys, time
import jax, numpy as np, optax
from vggjax import models, parallel, train_step
name, width, size, level = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
full = width == 1
model = models.get_model(name, num_classes=1000 if full else 10, width=width, fc_features=4096 if full else 128,
                         image_size=size, init=sys.argv[5])
mesh = parallel.make_mesh()
import functools
key = jax.random.PRNGKey(0)
lowered = jax.jit(functools.partial(train_step._init_state, model, optax.sgd(0.01, 0.9)),
                  out_shardings=parallel.replicated(mesh)).lower(key)
options = {'xla_backend_optimization_level': 0} if level == '0' else None
t0 = time.perf_counter()
compiled = lowered.compile(compiler_options=options)
t1 = time.perf_counter()
state = jax.block_until_ready(compiled(key))
t2 = time.perf_counter()
leaves = jax.tree_util.tree_leaves(state.params)
np.save(sys.argv[6], np.concatenate([np.asarray(x).ravel() for x in leaves]))
print(json.dumps({'compile': t1 - t0, 'run': t2 - t1, 'params': int(sum(x.size for x in leaves))}))
'''


def measure(net: str, level: str, init: str, out: str) -> dict:
  name, width, size = net.split(':')
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
  env.update(JAX_PLATFORMS='cpu', JAX_ENABLE_COMPILATION_CACHE='false')
  p = subprocess.run([sys.executable, '-c', CHILD, name, width, size, level, init, out], env=env,
                     capture_output=True, text=True, check=False)
  if p.returncode:
    raise SystemExit(f'{net} level {level}: exit {p.returncode}\n{p.stderr[-3000:]}')
  return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument('--nets', default='vgg11:0.125:32,vgg16:0.125:32,vgg19:0.125:32,vgg16:1:224',
                  help='NAME:WIDTH:SIZE, comma-separated (width 1: the paper\'s net with 1000 classes)')
  ap.add_argument('--init', default='glorot', help='the init scheme (paper, glorot, torchvision)')
  ap.add_argument('--rounds', type=int, default=3)
  ap.add_argument('--tmp', default='/tmp', help='where the parameters are written to be compared')
  args = ap.parse_args(argv)
  import numpy as np
  print('| net | params | level | compile (s) | run (s) | parameters equal to the default\'s |')
  print('|---|---:|---|---|---|---|')
  for net in args.nets.split(','):
    rows = {'default': [], '0': []}
    for _ in range(args.rounds):
      for level in rows:
        rows[level].append(measure(net, level, args.init, os.path.join(args.tmp, f'init_{level}.npy')))
      equal = bool(np.array_equal(np.load(os.path.join(args.tmp, 'init_default.npy')),
                                  np.load(os.path.join(args.tmp, 'init_0.npy'))))
    for level, r in rows.items():
      compile_s = ', '.join(f"{x['compile']:.2f}" for x in r)
      run_s = ', '.join(f"{x['run']:.2f}" for x in r)
      same = '-' if level == 'default' else equal
      print(f'| {net} | {r[0]["params"]:,} | {level} | {compile_s} | {run_s} | {same} |', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
