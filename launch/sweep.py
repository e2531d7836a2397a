#!/usr/bin/env python3
"""Sweeps: a grid or a list of config overrides becomes one training run per point, each in its own workdir.

Why one file of about 500 lines: the launch/ scripts run as files from a checkout (on a login node, without
installing anything); paper.py imports this one for its run status, overrides and files.

    python launch/sweep.py run --root=runs/lr --config=configs/demo.py \\
        --grid optimizer.lr=0.005,0.01,0.02 model.name=vgg11,vgg13 --set train.num_epochs=5
    python launch/sweep.py run --root=runs/lr --points=points.txt      # one override set per line
    python launch/sweep.py summary --root=runs/lr                      # table + ROOT/summary.json

A point's workdir is ROOT/NAME, NAME made of its overrides (`lr=0.01,name=vgg11`: the last part of each key,
the whole key where two keys would share it), so the same sweep finds the same directories again. `--set`
overrides apply to every point and stay out of the names.

Launchers (--launcher): `local` (default) runs `python -m vggjax.main` for each point, one after another;
`tpu` runs `launch/tpu_vm.sh train` for each point, one after another, on an existing slice; `slurm`
submits one job per point with `launch/slurm.py`. Arguments after `--` go to the launcher (tpu: --name=...
--zone=...; slurm: --nodes=... --gpus-per-node=... --partition=...; local: extra flags for vggjax.main).
--dry-run prints the exact commands and runs nothing.

Re-running a sweep skips the points whose run is complete (its metrics reach the run's last step) with an
unchanged command, and runs the others, which resume from their last checkpoint. A point already submitted to
SLURM and not complete is skipped unless --resubmit (two jobs must never share a workdir).
ROOT/sweep.json records the points, the commands and their outcomes.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the checkout's vggjax (the package may not be installed here)
from vggjax import rundir  # noqa: E402  (standard library only: no JAX on a login node)

MANIFEST = 'sweep.json'
SUMMARY = 'summary.json'


class SweepError(Exception):
  pass


# ------------------------------------------------------------------------------------------------ points

def split_values(text: str) -> list[str]:
  """Splits 'a,b,(1,2)' on the commas outside brackets and quotes: ['a', 'b', '(1,2)']."""
  out, depth, quote, cur = [], 0, '', ''
  for ch in text:
    if quote:
      quote = '' if ch == quote else quote
    elif ch in '\'"':
      quote = ch
    elif ch in '([{':
      depth += 1
    elif ch in ')]}':
      depth -= 1
    elif ch == ',' and depth == 0:
      out.append(cur)
      cur = ''
      continue
    cur += ch
  out.append(cur)
  return out


def parse_override(text: str) -> tuple[str, str]:
  """'optimizer.lr=0.01' (also '--config.optimizer.lr=0.01' or 'config.optimizer.lr=0.01') -> key, value."""
  if '=' not in text:
    raise SweepError(f'an override looks like FIELD=VALUE (e.g. optimizer.lr=0.01), not {text!r}')
  key, value = text.split('=', 1)
  key = key.strip()
  for prefix in ('--config.', 'config.'):
    if key.startswith(prefix):
      key = key[len(prefix):]
  if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*', key):
    raise SweepError(f'{key!r} is not a config field name (e.g. optimizer.lr)')
  return key, value.strip()


def grid_points(specs: Iterable[str]) -> list[dict[str, str]]:
  """['optimizer.lr=0.01,0.02', 'model.name=vgg11,vgg13'] -> their 4 points, first key slowest."""
  axes = []
  for spec in specs:
    key, values = parse_override(spec)
    vals = [v.strip() for v in split_values(values)]
    if not all(vals):
      raise SweepError(f'empty value in --grid {spec!r}')
    if key in [k for k, _ in axes]:
      raise SweepError(f'{key} appears twice in --grid')
    axes.append((key, vals))
  return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]


def read_points(path: str) -> list[dict[str, str]]:
  """A points file: a JSON list of {field: value} objects, or one point per line (`f=v f=v`, # comments)."""
  with open(path) as f:
    text = f.read()
  if path.endswith('.json'):
    data = json.loads(text)
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
      raise SweepError(f'{path}: a JSON points file holds a list of objects ({{"optimizer.lr": 0.01}})')
    return [dict(parse_override(f'{k}={_json_value(v)}') for k, v in d.items()) for d in data]
  points = []
  for n, line in enumerate(text.splitlines(), 1):
    line = line.split('#', 1)[0].strip() if not line.lstrip().startswith('#') else ''
    if not line:
      continue
    try:
      point = dict(parse_override(w) for w in shlex.split(line))
    except (SweepError, ValueError) as e:
      raise SweepError(f'{path}:{n}: {e}')
    points.append(point)
  if not points:
    raise SweepError(f'{path} holds no points')
  return points


def _json_value(v: Any) -> str:
  if isinstance(v, str):
    return v
  if isinstance(v, (list, tuple)):
    return '(' + ','.join(_json_value(x) for x in v) + ('' if len(v) != 1 else ',') + ')'
  return json.dumps(v)


def combine(points: list[dict[str, str]], grid: list[dict[str, str]]) -> list[dict[str, str]]:
  """Every point of the list with every point of the grid (either may be absent)."""
  points, grid = points or [{}], grid or [{}]
  out = []
  for p in points:
    for g in grid:
      clash = set(p) & set(g)
      if clash:
        raise SweepError(f'{", ".join(sorted(clash))} set by both --points and --grid')
      out.append({**p, **g})
  return out


def _clean(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9._+=,-]', '_', re.sub(r'[\s()\[\]{}\'"]', '', text))


def run_names(points: list[dict[str, str]]) -> list[str]:
  """Directory names from each point's overrides: the last part of each key unless two keys share it."""
  keys: list[str] = []
  for p in points:
    keys += [k for k in p if k not in keys]
  last = [k.rsplit('.', 1)[-1] for k in keys]
  short = {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}
  names = []
  for p in points:
    parts = [f'{short[k]}={v}' for k, v in p.items()]
    name = _clean(','.join(parts)) or 'base'
    if len(name) > 120:
      name = name[:100] + '-' + hashlib.sha1(name.encode()).hexdigest()[:8]
    names.append(name)
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f'several points are the same run: {", ".join(dupes)}')
  return names


# ------------------------------------------------------------------------------------------------ files

# The run directory's layout and helpers: vggjax.rundir (standard library only, shared with the trainer).
_is_remote, _path, _join, read_json = rundir.is_remote, rundir.path, rundir.join, rundir.read_json


def write_json(path: str, data: Any) -> None:
  rundir.write_json(path, data)  # written whole: a reader never sees half a manifest


read_rows = rundir.read_rows


# ------------------------------------------------------------------------------------------------ status

# The run's last step from WORKDIR/config.json: the trainer's own formula (train.max_steps, else num_epochs x
# steps per epoch).
total_steps = rundir.run_total_steps


def _number(v: Any) -> float | None:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v) if math.isfinite(v) else None


def _flatten(d: Any, prefix: str = '') -> dict[str, float]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
  elif _number(d) is not None:
    out[prefix[:-1]] = _number(d)
  return out


def _pick(flat: dict[str, float], suffix: str) -> float | None:
  keys = sorted((k for k in flat if k.split('.')[-1].endswith(suffix)), key=lambda k: (k.count('.'), len(k)))
  return flat[keys[0]] if keys else None


def run_summary(workdir: str) -> dict:
  """The final metrics of one run directory (nothing there yet: status 'pending')."""
  rows = read_rows(workdir)
  config = rundir.read_config(workdir)
  evaluation = read_json(_join(workdir, rundir.EVAL_FILE))
  train = [r for r in rows if 'loss' in r]
  evals = [r for r in rows if _number(r.get('val_top1')) is not None]
  last_step = max((int(r['step']) for r in rows if _number(r.get('step')) is not None), default=0)
  total = total_steps(config)
  if not rows and config is None:
    status = 'pending'
  elif total is not None and last_step >= total:
    status = 'complete'
  else:
    status = 'incomplete'
  s: dict[str, Any] = {'status': status, 'steps': last_step, 'total_steps': total,
                       'loss': _number(train[-1].get('loss')) if train else None}
  if train and not isinstance(train[-1].get('loss'), (int, float)):
    s['loss'] = train[-1].get('loss')  # 'nan' / 'inf' as the metric writer records them
  if evals:
    best1 = max(evals, key=lambda r: r['val_top1'])
    s.update(last_val_top1=evals[-1]['val_top1'], last_val_top5=_number(evals[-1].get('val_top5')),
             best_val_top1=best1['val_top1'], best_val_top1_step=best1.get('step'),
             best_val_top5=max((_number(r.get('val_top5')) for r in evals
                                if _number(r.get('val_top5')) is not None), default=None),
             evaluations=len(evals))
  else:
    s.update(last_val_top1=None, last_val_top5=None, best_val_top1=None, best_val_top1_step=None,
             best_val_top5=None, evaluations=0)
  if evaluation is not None:
    flat = _flatten(evaluation)
    s.update(eval_top1=_pick(flat, 'top1'), eval_top5=_pick(flat, 'top5'), eval=evaluation)
  return s


# ------------------------------------------------------------------------------------------------ commands

def launch_command(launcher: str, python: str, config: str, workdir: str, overrides: list[tuple[str, str]],
                   extra: list[str]) -> list[str]:
  """The command that runs (local, tpu) or submits (slurm) one point."""
  flags = [f'--config.{k}={v}' for k, v in overrides]
  if launcher == 'local':
    cmd = [python, '-m', 'vggjax.main']
    if config:
      cmd.append(f'--config={config}')
    return cmd + [f'--workdir={workdir}', *flags, *extra]
  if launcher == 'tpu':
    cmd = ['bash', os.path.join(HERE, 'tpu_vm.sh'), 'train', *extra]
    if config:
      cmd.append(f'--config={config}')
    return cmd + [f'--workdir={workdir}', '--', *flags]
  if launcher == 'slurm':
    cmd = [python, os.path.join(HERE, 'slurm.py'), *extra]
    if config:
      cmd.append(f'--config={config}')
    return cmd + [f'--workdir={workdir}', '--', *flags]
  raise SweepError(f'unknown launcher {launcher!r}')


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
  fixed = [parse_override(s) for s in args.set]
  points = combine(read_points(args.points) if args.points else [], grid_points(args.grid))
  if points == [{}]:
    raise SweepError('nothing to sweep: give --grid FIELD=V1,V2 ... and/or --points=FILE')
  names = run_names(points)
  root = args.root if _is_remote(args.root) else os.path.abspath(args.root)
  if args.launcher == 'tpu' and not (_is_remote(args.root) or os.path.isabs(args.root)):
    raise SweepError('--launcher=tpu needs --root=gs://BUCKET/PATH or an absolute path shared by the workers')
  if args.launcher == 'tpu' and '--detach' in extra:
    raise SweepError('--launcher=tpu runs the points one after another on the slice: no --detach')
  fixed_keys = {k for k, _ in fixed}
  for p in points:
    both = fixed_keys & set(p)
    if both:
      raise SweepError(f'{", ".join(sorted(both))} set by both --set and the sweep')

  manifest_path = _join(root, MANIFEST)
  manifest = _safe(read_json, manifest_path) or {}
  records = {r['name']: r for r in manifest.get('runs', [])}
  runs = []
  for name, point in zip(names, points):
    workdir = _join(root, name)
    overrides = fixed + list(point.items())
    cmd = launch_command(args.launcher, args.python, args.config, workdir, overrides, extra)
    previous = records.get(name, {})
    rec = {**previous, 'name': name, 'workdir': workdir, 'overrides': point, 'command': shlex.join(cmd)}
    runs.append((name, workdir, cmd, rec, previous.get('command')))
    records[name] = rec
  if not args.dry_run:
    manifest.update(root=root, config=args.config, set=dict(fixed), launcher=args.launcher,
                    runs=list(records.values()))
    _safe(write_json, manifest_path, manifest)

  failed = []
  for i, (name, workdir, cmd, rec, previous_cmd) in enumerate(runs, 1):
    state = _safe(run_summary, workdir) or {'status': 'unknown'}
    head = f'[{i}/{len(runs)}] {name}'
    if state['status'] == 'complete' and not args.rerun and previous_cmd in (None, rec['command']):
      print(f'# {head}: complete (step {state["steps"]} of {state["total_steps"]}), skipped', file=sys.stderr)
      continue
    if (args.launcher == 'slurm' and rec.get('job') and not args.resubmit and not args.dry_run):
      print(f'# {head}: submitted before (job {rec["job"]}), not complete: skipped (--resubmit to submit '
            f'again once that job has ended)', file=sys.stderr)
      continue
    if args.dry_run:
      print(shlex.join(cmd))
      continue
    print(f'# {head}: {shlex.join(cmd)}', file=sys.stderr, flush=True)
    t0 = time.time()
    if args.launcher == 'slurm':
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
      job = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 and proc.stdout.strip() else ''
      rec.update(job=job or None)
    else:
      proc = subprocess.run(cmd)
    rec.update(returncode=proc.returncode, seconds=round(time.time() - t0, 1),
               finished=time.strftime('%Y-%m-%dT%H:%M:%S'))
    _safe(write_json, manifest_path, {**manifest, 'runs': list(records.values())})
    if proc.returncode != 0:
      failed.append(name)
      print(f'# {head}: failed with exit status {proc.returncode}', file=sys.stderr)
      if args.fail_fast:
        break
  if failed:
    print(f'# {len(failed)} run(s) failed: {", ".join(failed)}', file=sys.stderr)
    return 1
  return 0


def _safe(fn, *a):
  """Local files always; remote (gs://) ones only where a filesystem backend is installed."""
  try:
    return fn(*a)
  except (ImportError, NotImplementedError, OSError, ValueError) as e:
    if not any(_is_remote(str(x)) for x in a):
      raise
    print(f'# cannot access {a[0]} ({type(e).__name__}: {e}); going on without it', file=sys.stderr)
    return None


# ------------------------------------------------------------------------------------------------ summary

COLUMNS = [('run', 'name'), ('status', 'status'), ('steps', 'steps'), ('loss', 'loss'),
           ('top-1', 'last_val_top1'), ('top-5', 'last_val_top5'), ('best top-1', 'best_val_top1'),
           ('@step', 'best_val_top1_step'), ('best top-5', 'best_val_top5')]
EVAL_COLUMNS = [('eval top-1', 'eval_top1'), ('eval top-5', 'eval_top5')]


def _fmt(v: Any, key: str) -> str:
  if v is None:
    return '-'
  if key == 'steps' or key.endswith('_step'):
    return str(v)
  if isinstance(v, float):
    return f'{v:.4f}'
  return str(v)


def table(runs: list[dict]) -> str:
  cols = COLUMNS + (EVAL_COLUMNS if any('eval' in r for r in runs) else [])
  cells = [[title for title, _ in cols]] + [[_fmt(r.get(k), k) for _, k in cols] for r in runs]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = []
  for n, row in enumerate(cells):
    lines.append('  '.join(c.ljust(w) if i == 0 or i == 1 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths))).rstrip())
    if n == 0:
      lines.append('  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def collect(root: str) -> list[dict]:
  """The runs of a sweep: those of ROOT/sweep.json in order, then any other run directory under ROOT."""
  manifest = read_json(_join(root, MANIFEST)) or {}
  runs = [{'name': r['name'], 'workdir': r.get('workdir') or _join(root, r['name']),
           'overrides': r.get('overrides', {})} for r in manifest.get('runs', [])]
  known = {r['name'] for r in runs}
  p = _path(root)
  if p.exists():
    for d in sorted(p.iterdir(), key=lambda x: x.name):
      is_run = (d / rundir.METRICS_FILE).exists() or (d / rundir.CONFIG_FILE).exists()
      if d.name not in known and d.is_dir() and is_run:
        runs.append({'name': d.name, 'workdir': _join(root, d.name), 'overrides': {}})
  for r in runs:
    r.update(run_summary(r['workdir']))
  return runs


def cmd_summary(args: argparse.Namespace) -> int:
  root = args.root if _is_remote(args.root) else os.path.abspath(args.root)
  if not _path(root).exists():
    raise SweepError(f'{args.root} does not exist')
  runs = collect(root)
  if not runs:
    raise SweepError(f'no runs under {args.root} (no sweep.json and no directory with metrics.jsonl)')
  if args.sort != 'sweep':
    key = {'best_top1': 'best_val_top1', 'last_top1': 'last_val_top1', 'name': 'name'}[args.sort]
    if key == 'name':
      runs.sort(key=lambda r: r['name'])
    else:
      runs.sort(key=lambda r: -1.0 if r.get(key) is None else r[key], reverse=True)
  print(table(runs))
  out = _join(root, SUMMARY)
  write_json(out, {'root': root, 'written': time.strftime('%Y-%m-%dT%H:%M:%S'), 'runs': runs})
  print(f'\n{len(runs)} run(s); written to {out}', file=sys.stderr)
  return 0


# ------------------------------------------------------------------------------------------------ CLI

def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='sweep.py', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 3)[3])  # after the note on the file's size
  sub = p.add_subparsers(dest='command', required=True)
  r = sub.add_parser('run', help='run (or submit) every point of a sweep')
  r.add_argument('--root', required=True, help='the sweep directory: one workdir per point under it')
  r.add_argument('--config', default='', help='config file[:arg] of every run (default: the demo)')
  r.add_argument('--grid', nargs='+', default=[], metavar='FIELD=V1,V2',
                 help='the product of these values (commas inside brackets stay in a value)')
  r.add_argument('--points', default='', metavar='FILE',
                 help='override sets, one per line (`optimizer.lr=0.01 model.name=vgg11`) or a JSON list')
  r.add_argument('--set', nargs='+', default=[], metavar='FIELD=VALUE', help='overrides of every point')
  r.add_argument('--launcher', choices=('local', 'tpu', 'slurm'), default='local')
  r.add_argument('--python', default=sys.executable,
                 help='the Python that runs vggjax.main (local) or slurm.py (default: this one)')
  r.add_argument('--rerun', action='store_true', help='run complete points too (each resumes and ends)')
  r.add_argument('--resubmit', action='store_true', help='submit again points already submitted to SLURM')
  r.add_argument('--fail-fast', action='store_true', help='stop at the first failed run')
  r.add_argument('--dry-run', action='store_true', help='print the commands, run nothing, write nothing')
  s = sub.add_parser('summary', help='final metrics of every run: a table and ROOT/summary.json')
  s.add_argument('--root', required=True)
  s.add_argument('--sort', choices=('sweep', 'best_top1', 'last_top1', 'name'), default='sweep')
  return p


def split_passthrough(argv: list[str] | None) -> tuple[list[str], list[str]]:
  """(this script's arguments, those after `--`, passed on to the launcher or trainer)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if '--' not in argv:
    return argv, []
  i = argv.index('--')
  return argv[:i], argv[i + 1:]


def main(argv: list[str] | None = None) -> int:
  argv, extra = split_passthrough(argv)
  p = parser()
  args = p.parse_args(argv)
  try:
    if args.command == 'run':
      return cmd_run(args, extra)
    if extra:
      p.error('summary takes no arguments after --')
    return cmd_summary(args)
  except SweepError as e:
    print(f'sweep.py: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
