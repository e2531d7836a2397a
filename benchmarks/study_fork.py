#!/usr/bin/env python3
"""The study's toy chain (launch/study.py --toy --seeds=1) with its steps forked from one process that imported
vggjax (--fork, the default) against a new interpreter per step (--no-fork).

    python benchmarks/study_fork.py                 # 1 round of each, interleaved
    python benchmarks/study_fork.py --rounds=2

Each run starts from an empty study directory with a compilation cache of its own, at XLA's CPU optimisation
level 0 (as tests/test_study.py runs it), on one CPU device; the options alternate round by round, so that a
loaded machine slows both alike. Prints one Markdown row per run: the wall time of the whole chain, the summed
seconds of its steps (study.jsonl), and the CPU time of the study and its children.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def one(fork: bool) -> dict:
  root = tempfile.mkdtemp(prefix='study-fork-')
  try:
    env = dict(os.environ, VGGJAX_NUM_CPU_DEVICES='1', JAX_PLATFORMS='cpu',
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST}".strip())
    cmd = [sys.executable, os.path.join(REPO, 'launch', 'study.py'), f'--root={root}/study', '--toy', '--seeds=1',
           f'--results={root}/raw', '--nice=0', '--fork' if fork else '--no-fork']
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
      raise SystemExit(f'study.py failed:\n{out.stderr[-3000:]}')
    with open(os.path.join(root, 'study', 'study.jsonl')) as f:
      steps = [json.loads(line) for line in f]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {'wall': wall, 'steps': len(steps), 'step_seconds': sum(s['seconds'] for s in steps), 'cpu': cpu}
  finally:
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--rounds', type=int, default=1)
  args = p.parse_args()
  print('| round | steps started as | steps | wall (s) | summed step time (s) | CPU (s) |')
  print('|---|---|---:|---:|---:|---:|')
  for r in range(1, args.rounds + 1):
    for fork in (True, False):
      m = one(fork)
      print(f"| {r} | {'forked children' if fork else 'new interpreters'} | {m['steps']} | {m['wall']:.0f} | "
            f"{m['step_seconds']:.0f} | {m['cpu']:.0f} |", flush=True)


if __name__ == '__main__':
  main()
