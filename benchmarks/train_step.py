"""Side by side on a CPU: vggjax's train step against PyTorch's, and the CPU choices of ours that move it.

    python benchmarks/train_step.py                                  # VGG16 at 224, batch 8, f32 and bf16
    python benchmarks/train_step.py --net=narrow                     # VGG16 at width 1/4, 224, batch 16
    python benchmarks/train_step.py --net=narrow --variants=flags    # XLA CPU flags, devices, dtypes
    python benchmarks/train_step.py --variants=torch,vggjax,vggjax_ynn --rounds=3 --out=cpu.jsonl

Each variant runs in its own process (python -m vggjax.benchmark or benchmarks/torch_reference.py, --json).
A round runs every variant once, in an order rotated from round to round, so that whatever else the machine
is doing falls on all of them alike; each variant's figure is the median over rounds, and its ratio to
PyTorch (float32, its best CPU configuration: channels_last, one thread per core) is the median of the
per-round ratios. The final loss after the timed steps (same seed, same data) is printed as a check that a
variant computes the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
YNN_CONV = '--xla_cpu_experimental_ynn_fusion_type=individual_convolution'

NETS = {
    'vgg16': ['--model=vgg16', '--image-size=224', '--batch=8'],
    'narrow': ['--model=vgg16', '--width=0.25', '--image-size=224', '--batch=16'],
    'small': ['--model=vgg16', '--width=0.25', '--image-size=112', '--batch=16'],
}
# name: (framework, extra arguments, extra environment)
VARIANTS = {
    'torch': ('pytorch', ['--dtype=float32'], {}),
    'torch_bf16': ('pytorch', ['--dtype=bfloat16'], {}),
    'torch_nchw': ('pytorch', ['--dtype=float32', '--no-channels-last'], {}),
    'vggjax': ('vggjax', ['--dtype=float32'], {}),
    'vggjax_bf16': ('vggjax', ['--dtype=bfloat16'], {}),
    'vggjax_ynn': ('vggjax', ['--dtype=float32'], {'XLA_FLAGS': YNN_CONV}),
    'vggjax_ynn_bf16': ('vggjax', ['--dtype=bfloat16'], {'XLA_FLAGS': YNN_CONV}),
    'vggjax_ynn_dot': ('vggjax', ['--dtype=float32'],
                       {'XLA_FLAGS': '--xla_cpu_experimental_ynn_fusion_type=individual_convolution,'
                                     'individual_dot'}),
    'vggjax_onednn': ('vggjax', ['--dtype=float32'], {'XLA_FLAGS': '--xla_cpu_use_onednn=true'}),
    'vggjax_xnn': ('vggjax', ['--dtype=float32'], {'XLA_FLAGS': '--xla_cpu_use_xnnpack=true'}),
    'vggjax_2dev': ('vggjax', ['--dtype=float32', '--num-cpu-devices=2'], {}),
    'vggjax_2dev_1thread': ('vggjax', ['--dtype=float32', '--num-cpu-devices=2'],
                            {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false'}),
    'vggjax_fastmath': ('vggjax', ['--dtype=float32'], {'XLA_FLAGS': '--xla_cpu_enable_fast_math=true'}),
    'vggjax_remat': ('vggjax', ['--dtype=float32', '--remat'], {}),
}
GROUPS = {
    'default': ['torch', 'torch_bf16', 'vggjax', 'vggjax_bf16', 'vggjax_ynn', 'vggjax_ynn_bf16'],
    'flags': ['torch', 'vggjax', 'vggjax_bf16', 'vggjax_ynn', 'vggjax_ynn_bf16', 'vggjax_ynn_dot',
              'vggjax_onednn', 'vggjax_xnn', 'vggjax_2dev', 'vggjax_2dev_1thread', 'vggjax_fastmath'],
    'remat': ['vggjax', 'vggjax_remat'],
}


def command(variant: str, net: list[str], steps: list[str], pin: bool = False) -> tuple[list[str], dict]:
  """The variant's command line and environment; `pin`: one thread on core 0 (taskset), both frameworks."""
  framework, extra, env = VARIANTS[variant]
  env = dict(env)
  if framework == 'pytorch':
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'torch_reference.py'), '--device=cpu']
    if pin:
      cmd.append('--threads=1')
  else:
    cmd = [sys.executable, '-m', 'vggjax.benchmark', '--eval-size=0']
    if pin:
      env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_cpu_multi_thread_eigen=false').strip()
  if pin:
    cmd = ['taskset', '-c', '0'] + cmd
  full_env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''),
                  JAX_PLATFORMS='cpu', **env)
  return cmd + net + steps + extra + ['--json'], full_env


def run_one(variant: str, net: list[str], steps: list[str], timeout: float, pin: bool = False) -> dict | None:
  cmd, env = command(variant, net, steps, pin)
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    print(f'  {variant}: timed out after {timeout:.0f} s', file=sys.stderr)
    return None
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{')]
  if proc.returncode or not lines:
    print(f'  {variant}: failed ({proc.returncode}): {proc.stderr.strip()[-800:]}', file=sys.stderr)
    return None
  record = json.loads(lines[-1])
  record['variant'] = variant
  record['variant_env'] = VARIANTS[variant][2]
  return record


def ips(rec: dict | None) -> float | None:
  return rec['train']['images_per_s'] if rec else None


def per_cpu_s(rec: dict | None) -> float | None:
  """Images per second of the process's CPU time: the work done, whatever else the machine runs."""
  if not rec or not rec['train'].get('cpu_time_per_step_s'):
    return None
  return rec['batch'] / rec['train']['cpu_time_per_step_s']


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--net', choices=sorted(NETS), default='vgg16')
  p.add_argument('--variants', default='default',
                 help=f'a group ({", ".join(GROUPS)}) or names separated by commas: {", ".join(VARIANTS)}')
  p.add_argument('--rounds', type=int, default=2)
  p.add_argument('--steps', type=int, default=1)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--timeout', type=float, default=1200.0, help='seconds per process')
  p.add_argument('--pin', action='store_true',
                 help='one thread on core 0 for every variant: per-core efficiency, robust to other load')
  p.add_argument('--out', default='', help='append every record (JSON lines) to this file')
  args = p.parse_args(argv)
  names = GROUPS.get(args.variants) or [v for v in args.variants.split(',') if v]
  unknown = [v for v in names if v not in VARIANTS]
  if unknown:
    p.error(f'unknown variants {unknown}; valid: {", ".join(VARIANTS)}')
  reference = 'torch' if 'torch' in names else names[0]
  steps = [f'--steps={args.steps}', f'--repeats={args.repeats}', '--warmup=1']
  results: dict[str, list[dict | None]] = {v: [] for v in names}
  for r in range(args.rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    print(f'round {r + 1}/{args.rounds}: {", ".join(order)}', file=sys.stderr, flush=True)
    for v in order:
      rec = run_one(v, NETS[args.net], steps, args.timeout, args.pin)
      results[v].append(rec)
      if rec:
        rec['round'] = r
        print(f'  {v}: {rec["train"]["images_per_s"]:.2f} img/s, {per_cpu_s(rec):.2f} img/CPU-s',
              file=sys.stderr, flush=True)
        if args.out:
          with open(args.out, 'a') as f:
            f.write(json.dumps(rec) + '\n')


  any_rec = next((x for recs in results.values() for x in recs if x), None)
  if any_rec is None:
    print('no variant ran', file=sys.stderr)
    return 1
  print(f'\n{args.net}: {" ".join(NETS[args.net])}, {any_rec["device_kind"]}, {any_rec["cpu_count"]} cores'
        f'{", pinned: 1 thread on 1 core" if args.pin else ""}; {args.rounds} rounds of {args.repeats} repeats x '
        f'{args.steps} steps; ratios to {reference} (median of per-round ratios)\n')
  print('| variant | dtype | img/s | per round | ratio | img per CPU-s | ratio (CPU time) | final loss | '
        'compile s |')
  print('|---|---|---|---|---|---|---|---|---|')
  for v in names:
    recs = results[v]
    vals = [ips(x) for x in recs if x]
    if not vals:
      print(f'| {v} | - | failed | - | - | - | - | - | - |')
      continue
    pairs = [(a, b) for a, b in zip(recs, results[reference], strict=True) if a and b]
    ratio = f'{statistics.median(ips(a) / ips(b) for a, b in pairs):.2f}x' if pairs else '-'
    cpu_vals = [per_cpu_s(x) for x in recs if per_cpu_s(x)]
    cpu_pairs = [(per_cpu_s(a), per_cpu_s(b)) for a, b in pairs if per_cpu_s(a) and per_cpu_s(b)]
    cpu = f'{statistics.median(cpu_vals):.2f}' if cpu_vals else '-'
    cpu_ratio = f'{statistics.median(a / b for a, b in cpu_pairs):.2f}x' if cpu_pairs else '-'
    last = [x for x in recs if x][-1]
    print(f'| {v} | {last["dtype"]} | {statistics.median(vals):.2f} | {", ".join(f"{x:.2f}" for x in vals)} | '
          f'{ratio} | {cpu} | {cpu_ratio} | {last["train"]["final_loss"]:.4f} | '
          f'{last["train"]["compile_s"]:.1f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
