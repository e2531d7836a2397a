#!/usr/bin/env python3
"""The paper's findings in miniature (docs/paper_miniature.md): every experiment of Tables 3-6 and 8 and the
warm start, on the study task (launch/study_data.py), narrow nets (configs/paper_mini.py), three seeds.

    python launch/study.py --root=runs/paper_study                   # everything; resumes where it stopped
    python launch/study.py --root=runs/paper_study --dry-run         # every command, in order
    python launch/study.py --root=runs/paper_study --summary         # tables and plots from the raw results
    python launch/study.py --root=/tmp/toy --toy                     # the whole chain at toy size (minutes)

(`python launch/paper.py --study ...` is the same command.) Per seed s, in order (seed 0 whole first, so a
partial study already fills every table once):

    A_pre, A-LRN_pre, D_pre, E_pre             Glorot, plain Fashion-MNIST (the curriculum stage of a net
                                               from scratch: configs/paper_mini.py says why)
    A_fixed, A-LRN_fixed                       every layer of {net}_pre, S = 36 (the 32 crop's 256)
    B_fixed ... E_fixed                        from A_fixed (the paper's seven layers)
    C_jitter, D_jitter, E_jitter               every layer of {net}_fixed, S ~ U[36, 72], lr 1e-3
    D_scratch, E_scratch                       every layer of {net}_pre: no layer of A (the warm start's
                                               comparison)
    D_pcr, D_scr, D_pcr-fc                     Appendix A: box regressors from D_fixed (all layers; fc only)
    table3   dense at one test scale, every classifier               (Table 3)
    table4f  dense at Q = 32, 36, 40, C, D, E fixed                  (Table 4)
    table4j  dense at Q = 36, 54, 72, C, D, E jittered               (Table 4)
    table5   dense, multi-crop, both, D and E jittered, multi-scale  (Table 5; their fusion: Table 6)
    loc_pcr, loc_scr, loc_pcr-fc   central crop and dense with box merging, top-1 localisation error (Table 8)

Evaluations are on the task's test split (the nets chose their learning rates on its validation split).
Each step's directory is ROOT/NAME_sS. Running the command again skips the complete steps (a training run
that reached its last step, an evaluation with its eval.json) and resumes an interrupted training run from
its checkpoint; a step whose raw result is recorded (below) and whose dependants all have theirs is not run
again, so a study moved without its run directories goes on where its results stop. A failed step is
reported and the steps that need it are left for the next run; the others go on. Every finished step's raw
result (metrics.jsonl of a training run, eval.json of an evaluation) is copied to RESULTS/NAME_sS.json[l]
(default docs/paper_miniature/raw), which `--summary` reads: the tables regenerate without retraining. The
steps run niced (--nice, default 10) with a compilation cache under ROOT, --jobs of them at a time (each as
soon as its parents are complete).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import forked_steps  # launch/forked_steps.py

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIG = 'configs/paper_mini.py'
RESULTS = os.path.join(REPO, 'docs', 'paper_miniature', 'raw')
CLASSIFIERS = ('A_fixed', 'A-LRN_fixed', 'B_fixed', 'C_fixed', 'D_fixed', 'E_fixed', 'C_jitter', 'D_jitter',
               'E_jitter', 'D_scratch', 'E_scratch')
FIXED_TEST_SCALES = (32, 36, 40)  # the paper's {224, 256, 288} for S = 256, as S = 36 is to the 32 crop
LOCALIZERS = {'pcr': 'D,fixed,pcr', 'scr': 'D,fixed,scr', 'pcr-fc': 'D,fixed,pcr'}
# --toy: the task's pictures, and what shrinks every run to a few steps of a tiny net.
TOY_COUNTS = (96, 32, 32)
TOY_SET = ('train.max_steps=3', 'train.num_epochs=1', 'train.log_every_steps=1', 'model.width=0.0625',
           'model.fc_features=16', 'train.global_batch_size=16', 'train.plot=False')


@dataclasses.dataclass
class Step:
  name: str
  kind: str          # data, train, eval or localize
  argv: list[str]
  parents: list[str]
  workdir: str
  output: str        # the file whose presence says the step is complete (train: metrics.jsonl, see status)


def _train(root: str, python: str, data: str, seed: int, name: str, arg: str, parent: str | None,
           extra: list[str]) -> Step:
  workdir = os.path.join(root, f'{name}_s{seed}')
  argv = [python, '-m', 'vggjax.main', f'--config={CONFIG}:{arg}', f'--workdir={workdir}',
          f'--config.seed={seed}']
  if not arg.endswith(',pre'):  # the curriculum stage reads Fashion-MNIST itself, not the task
    argv.append(f'--config.data.data_dir={data}')
  if parent:
    argv.append(f'--config.init_from={os.path.join(root, f"{parent}_s{seed}")}')
  if name.endswith('-fc'):
    argv.append('--config.train.trainable=fc*')
  return Step(f'{name}_s{seed}', 'train', argv + extra, [f'{parent}_s{seed}'] if parent else [], workdir,
              os.path.join(workdir, 'metrics.jsonl'))


def _eval(root: str, python: str, data: str, seed: int, name: str, nets: list[str], protocols: str,
          multiscale: bool, extra: list[str]) -> Step:
  workdir = os.path.join(root, f'{name}_s{seed}')
  runs = [f'{n}_s{seed}' for n in nets]
  argv = [python, '-m', 'vggjax.evaluate', f'--config={CONFIG}:A,fixed', f'--workdir={workdir}',
          *(f'--checkpoint={os.path.join(root, r)}' for r in runs), f'--protocols={protocols}',
          f'--config.data.data_dir={data}', '--config.data.eval_split=test']
  argv += ['--multiscale'] if multiscale else []
  return Step(f'{name}_s{seed}', 'eval', argv + extra, runs, workdir, os.path.join(workdir, 'eval.json'))


def plan(root: str, seeds: int = 3, python: str = sys.executable, toy: bool = False) -> list[Step]:
  """Every step of the study, parents first: the task, then seed 0's runs and evaluations, then seed 1's..."""
  data = os.path.join(root, 'task')
  counts = ','.join(map(str, TOY_COUNTS)) if toy else '10000,1000,2000'
  steps = [Step('task', 'data', [python, os.path.join(HERE, 'study_data.py'), f'--out={data}',
                                 f'--counts={counts}'] + (['--wallpaper_dirs='] if toy else []), [], data, os.path.join(data, 'manifest.json'))]
  train_extra = [f'--config.{s}' for s in TOY_SET] if toy else []
  eval_extra = ['--aspect_buckets=1.5'] if toy else []  # toy: one compiled dense shape per test scale
  for seed in range(seeds):
    def train(name, arg, parent=None, all_layers=False):
      extra = train_extra + (['--config.init_layers=all'] if all_layers else [])
      step = _train(root, python, data, seed, name, arg, parent, extra)
      step.parents.append('task')
      steps.append(step)
    for net in ('A', 'A-LRN', 'D', 'E'):  # the curriculum stage of every net that starts from scratch
      train(f'{net}_pre', f'{net},pre')
    train('A_fixed', 'A,fixed', 'A_pre', all_layers=True)
    train('A-LRN_fixed', 'A-LRN,fixed', 'A-LRN_pre', all_layers=True)
    for net in 'BCDE':
      train(f'{net}_fixed', f'{net},fixed', 'A_fixed')
    for net in 'CDE':
      train(f'{net}_jitter', f'{net},jitter', f'{net}_fixed')
    for net in 'DE':
      train(f'{net}_scratch', f'{net},fixed', f'{net}_pre', all_layers=True)
    for head, arg in LOCALIZERS.items():
      train(f'D_{head}', arg, 'D_fixed')
    steps.append(_eval(root, python, data, seed, 'table3', list(CLASSIFIERS), 'dense', False, eval_extra))
    # Table 4: the paper's three test scales, {S-32, S, S+32} at 256 and {Smin, mid, Smax}, on the 32 crop.
    steps.append(_eval(root, python, data, seed, 'table4f', [f'{n}_fixed' for n in 'CDE'], 'dense', False,
                       eval_extra + [f'--scales={",".join(map(str, FIXED_TEST_SCALES))}']))
    steps.append(_eval(root, python, data, seed, 'table4j', [f'{n}_jitter' for n in 'CDE'], 'dense', True,
                       eval_extra))
    steps.append(_eval(root, python, data, seed, 'table5', ['D_jitter', 'E_jitter'],
                       'dense,multicrop,dense+multicrop', True, eval_extra))
    for head in LOCALIZERS:
      workdir = os.path.join(root, f'loc_{head}_s{seed}')
      argv = [python, '-m', 'vggjax.localize', f'--workdir={workdir}',
              f'--classifier={os.path.join(root, f"D_fixed_s{seed}")}',
              f'--localizer={os.path.join(root, f"D_{head}_s{seed}")}', '--split=test', f'--data_dir={data}']
      steps.append(Step(f'loc_{head}_s{seed}', 'localize', argv, [f'D_fixed_s{seed}', f'D_{head}_s{seed}'],
                        workdir, os.path.join(workdir, 'eval.json')))
  return steps


def status(step: Step) -> str:
  """complete, incomplete (started) or pending."""
  if step.kind != 'train':
    return 'complete' if os.path.exists(step.output) else 'pending'
  sys.path.insert(0, HERE)
  import sweep  # launch/sweep.py: a training run's status from its metrics and config
  return sweep.run_summary(step.workdir)['status']


def needed_steps(steps: list[Step], results: str) -> set[str]:
  """The steps that must run (or be complete in ROOT): those whose raw result is not in `results`, and the
  parents of a step that must run (it reads their run directories). A step whose result is recorded and whose
  dependants all have theirs is not run again: the tables need only the raw results, so a study moved to a new
  machine without its run directories resumes with the first step whose result is missing (delete a raw
  result to run its step again)."""
  needed: set[str] = set()
  for step in reversed(steps):  # the plan lists parents first: every dependant is decided before its parents
    if not os.path.exists(_result_path(step, results)):
      needed.add(step.name)
    if step.name in needed:
      needed.update(step.parents)
  return needed


def save_result(step: Step, results: str, root: str) -> str:
  """Copies a finished step's raw result into `results` (metrics.jsonl of a training run, eval.json of an
  evaluation, the task's manifest), with the study's directory written as ROOT and the checkout's as '.'."""
  os.makedirs(results, exist_ok=True)
  dst = _result_path(step, results)
  with open(step.output) as f:
    text = f.read()
  if step.kind in ('eval', 'localize'):
    result = json.loads(text)
    result.pop('examples', None)  # localisation's picture tiles: the figure, not the table
    text = json.dumps(result, indent=1, default=str)
  text = text.replace(root, 'ROOT').replace(REPO, '.')
  with open(dst, 'w') as f:
    f.write(text)
  return dst


def run(args: argparse.Namespace) -> int:
  root = os.path.abspath(args.root)
  everything = plan(root, args.seeds, args.python, args.toy)
  steps = everything
  if args.only:
    steps = [s for s in steps if any(s.name == o or s.name.startswith(o + '_s') for o in args.only)]
  if args.dry_run:
    for s in steps:
      print(shlex.join(s.argv))
    return 0
  os.makedirs(root, exist_ok=True)
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(root, 'jax_cache'))
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  env.setdefault('JAX_PLATFORMS', 'cpu')
  fork = args.fork and forked_steps.available() and args.python == sys.executable
  if fork:
    try:  # each step a forked child of this process, which imports vggjax once (launch/forked_steps.py)
      forked_steps.preload(env, cwd=REPO)
    except Exception as e:  # noqa: BLE001: the steps run as new interpreters instead
      print(f'# steps run as new processes: {e}', file=sys.stderr)
      fork = False
  log_path = os.path.join(root, 'study.jsonl')
  index = {s.name: i for i, s in enumerate(steps, 1)}
  done, failed, left_out, running = set(), [], set(), {}  # running: name -> (step, process, log, start time)
  t_start = time.time()
  needed = needed_steps(everything, args.results)
  for step in steps:
    if status(step) == 'complete':
      done.add(step.name)
      if not os.path.exists(_result_path(step, args.results)):
        save_result(step, args.results, root)
      print(f'# [{index[step.name]}/{len(steps)}] {step.name}: complete, skipped', file=sys.stderr)
    elif step.name not in needed:
      done.add(step.name)
      print(f'# [{index[step.name]}/{len(steps)}] {step.name}: its result is in {args.results} and no step '
            'left to run needs its run directory; skipped', file=sys.stderr)
  pending = [s for s in steps if s.name not in done]
  known = {s.name for s in steps}
  for step in everything:  # --only: the parents outside the selection count if they are complete
    if step.name not in known and status(step) == 'complete':
      done.add(step.name)
  while pending or running:
    # Start the first pending steps whose parents are complete, in the plan's order, up to --jobs at a time
    # (the steps of different seeds are independent: two at a time keep both cores busy, as one small net's
    # step does not). A step whose parent failed, or is not in this run (--only), is left for the next run.
    for step in list(pending):
      if len(running) >= args.jobs:
        break
      blocked = [p for p in step.parents if p not in done and (p in failed or p in left_out or p not in known)]
      if blocked:
        pending.remove(step)
        left_out.add(step.name)
        print(f'# [{index[step.name]}/{len(steps)}] {step.name}: waits for {", ".join(blocked)} (not '
              'complete); left for the next run', file=sys.stderr)
        continue
      if any(p not in done for p in step.parents):
        continue
      pending.remove(step)
      print(f'# [{index[step.name]}/{len(steps)}] {step.name}: {shlex.join(step.argv)}  '
            f'({(time.time() - t_start) / 60:.1f} min so far)', file=sys.stderr, flush=True)
      os.makedirs(step.workdir if step.kind != 'data' else root, exist_ok=True)
      log = open(os.path.join(root, f'{step.name}.log'), 'w')
      if fork and forked_steps.forkable(step.argv):
        proc = forked_steps.start(step.argv, cwd=REPO, log=log, nice=args.nice)
      else:
        cmd = (['nice', '-n', str(args.nice)] if args.nice else []) + step.argv
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
      running[step.name] = (step, proc, log, time.time())
    if not running:
      continue  # the pass above left out every step it could not start: the plan lists parents first
    time.sleep(0.5)
    for name, (step, proc, log, t0) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[name]
      log.close()
      ok = proc.returncode == 0 and status(step) == 'complete'
      with open(log_path, 'a') as f:
        f.write(json.dumps({'step': name, 'returncode': proc.returncode, 'complete': ok,
                            'seconds': round(time.time() - t0, 1),
                            'finished': time.strftime('%Y-%m-%dT%H:%M:%S')}) + '\n')
      head = f'[{index[name]}/{len(steps)}] {name}'
      if ok:
        done.add(name)
        save_result(step, args.results, root)
        print(f'# {head}: done in {time.time() - t0:.0f} s', file=sys.stderr, flush=True)
      else:
        failed.append(name)
        print(f'# {head}: failed (exit status {proc.returncode}); its log: {root}/{name}.log', file=sys.stderr,
              flush=True)
  left = [s.name for s in steps if s.name not in done]
  print(f'# {len(done)} of {len(steps)} steps complete' + (f'; failed: {", ".join(failed)}' if failed else '') +
        (f'; run the same command again for the other {len(left)}' if left else ''), file=sys.stderr)
  return 1 if failed else 0


def _result_path(step: Step, results: str) -> str:
  if step.kind == 'data':
    return os.path.join(results, 'task_manifest.json')
  return os.path.join(results, step.name + ('.jsonl' if step.kind == 'train' else '.json'))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', required=True, help='the study\'s directory: the task and one directory per step')
  p.add_argument('--seeds', type=int, default=3, help='seeds per cell (default 3)')
  p.add_argument('--results', default=RESULTS, help='where the raw results are copied (and --summary reads)')
  p.add_argument('--toy', action='store_true', help='the whole chain at toy size: tiny task, nets and runs')
  p.add_argument('--only', nargs='+', default=[], metavar='STEP', help='only these steps (NAME or NAME_sS)')
  p.add_argument('--nice', type=int, default=10, help='niceness of the steps (0: not niced)')
  p.add_argument('--jobs', type=int, default=1,
                 help='steps run at a time, each as soon as its parents are complete (default 1; 2 on 2 cores: '
                      'the steps of different seeds are independent)')
  p.add_argument('--fork', action=argparse.BooleanOptionalAction, default=True,
                 help='start the vggjax steps as forked children of this process, which imports vggjax once '
                      '(launch/forked_steps.py; about 2-3 s less per step), not as new interpreters (default: '
                      'fork, where the OS can and --python is this Python)')
  p.add_argument('--python', default=sys.executable, help='the Python that runs vggjax (default: this one)')
  p.add_argument('--dry-run', action='store_true', help='print every command in order; run nothing')
  p.add_argument('--summary', action='store_true', help='write the tables and plots from RESULTS; train nothing')
  p.add_argument('--doc', default=os.path.join(REPO, 'docs', 'paper_miniature.md'),
                 help='--summary: the document whose generated tables are replaced')
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.seeds < 1:
    print(f'study.py: error: --seeds must be at least 1, got {args.seeds}', file=sys.stderr)
    return 2
  if args.jobs < 1:
    print(f'study.py: error: --jobs must be at least 1, got {args.jobs}', file=sys.stderr)
    return 2
  if args.summary:
    sys.path.insert(0, HERE)
    import study_summary
    return study_summary.main(args.results, args.doc)
  return run(args)


if __name__ == '__main__':
  sys.exit(main())
