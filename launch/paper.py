#!/usr/bin/env python3
"""The paper's whole training chain (sections 3.1, 4) as one plan, each step started after its parents:

    A@256 (random init)
      -> B, C, D, E@256       (the paper's seven layers of A: init_layers=paper)
      -> C, D, E@384          (every layer of the same net at S=256, lr 1e-3: init_layers=all)
      -> C, D, E@jitter       (every layer of the same net at S=384, lr 1e-3; S ~ U[256, 512])
    then the evaluations:
      table3   single test scale, dense (Table 3), every net
      table4   multi-scale test, dense (Table 4), B@256 and C, D, E at every training scale
      table5   D and E@jitter, multi-scale: dense, multi-crop, dense+multi-crop (Table 5), and their fusion
               (the D+E row of Tables 6-7: the 'fused' rows of this step's eval.json)

    python launch/paper.py --root=runs/paper --dry-run            # every command, in order
    python launch/paper.py --root=runs/paper                      # runs them here, one after another
    python launch/paper.py --root=gs://b/paper --launcher=tpu -- --name=vgg --zone=us-central2-b
    python launch/paper.py --root=/shared/paper --launcher=slurm -- --nodes=4 --gpus-per-node=8
    python launch/paper.py --root=/tmp/paper --tiny               # the whole chain on a CPU in minutes

Each step's directory is ROOT/NAME (A256, D384, Djitter, table3, ...). Running the plan again skips the
complete steps (a training run whose metrics reach its last step, an evaluation with its eval.json) and
runs the rest; an interrupted training run resumes from its last checkpoint. `--set FIELD=VALUE` applies to
every command (data location, batch size, accumulation: `--set data.data_dir=... train.accumulate_steps=4`).
`--only NAME ...` runs those steps (their parents must be complete or in the list).

Launchers: `local` runs every step here, one after another, and stops at the first failure. `slurm` submits
every step at once, each with `--dependency=afterok:` its parents' jobs (training through launch/slurm.py,
whose options follow `--`; evaluations as one-node jobs, `--eval-sbatch-arg` for their options), and
records the jobs in ROOT/paper.json: a step submitted before and not complete is not submitted again (its
job is the dependency of its children) unless --resubmit. `tpu` runs the training steps on an existing slice
with launch/tpu_vm.sh train, one after another, and the evaluations where this script runs (ROOT must be
reachable from both: gs://...).

`--study`: the paper's findings in miniature, three seeds of every experiment of Tables 3-6 and 8 on real
pictures (launch/study.py, whose options it takes; docs/paper_miniature.md).

`--tiny`: configs/tiny.py, the same chain with narrow nets on scikit-learn's digits at 32x32, a few steps
per run, with a compilation cache shared by the steps (tests/test_paper_chain.py runs it end to end).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import sweep  # noqa: E402  (launch/sweep.py: run status, overrides, JSON files local or gs://)

MANIFEST = 'paper.json'
NETS = {'A': 'vgg11', 'B': 'vgg13', 'C': 'vgg16_c', 'D': 'vgg16', 'E': 'vgg19'}
SCALES = ('256', '384', 'jitter')


@dataclasses.dataclass
class Step:
  name: str
  kind: str  # train or eval
  argv: list[str]  # the vggjax command (python -m vggjax.main|evaluate ...)
  parents: list[str]
  workdir: str


def _config(net: str, scale: str, tiny: bool) -> str:
  return f'configs/tiny.py:{net},{scale}' if tiny else f'configs/{NETS[net]}.py:{scale}'


def plan(root: str, python: str = 'python', tiny: bool = False, overrides: list[tuple[str, str]] = ()
         ) -> list[Step]:
  """Every step of the chain, parents first."""
  flags = [f'--config.{k}={v}' for k, v in overrides]
  steps: list[Step] = []

  def train(net: str, scale: str, parent: str | None) -> str:
    name = f'{net}{scale}'
    workdir = sweep._join(root, name)
    argv = [python, '-m', 'vggjax.main', f'--config={_config(net, scale, tiny)}', f'--workdir={workdir}']
    if parent:
      argv.append(f'--config.init_from={sweep._join(root, parent)}')
    steps.append(Step(name, 'train', argv + flags, [parent] if parent else [], workdir))
    return name

  a = train('A', '256', None)
  for net in 'BCDE':
    train(net, '256', a)
  for net in 'CDE':
    train(net, '384', f'{net}256')
  for net in 'CDE':
    train(net, 'jitter', f'{net}384')

  def evaluate(name: str, runs: list[str], protocols: str, multiscale: bool) -> None:
    workdir = sweep._join(root, name)
    argv = [python, '-m', 'vggjax.evaluate', f'--config={_config("A", "256", tiny)}', f'--workdir={workdir}']
    argv += [f'--checkpoint={sweep._join(root, r)}' for r in runs]
    argv += [f'--protocols={protocols}'] + (['--multiscale'] if multiscale else [])
    steps.append(Step(name, 'eval', argv + flags, runs, workdir))

  trained = [s.name for s in steps]
  evaluate('table3', trained, 'dense', False)
  evaluate('table4', ['B256'] + [f'{n}{s}' for n in 'CDE' for s in SCALES], 'dense', True)
  evaluate('table5', ['Djitter', 'Ejitter'], 'dense,multicrop,dense+multicrop', True)
  return steps


def status(step: Step) -> str:
  """complete, incomplete (started) or pending."""
  if step.kind == 'eval':
    done = sweep._path(sweep._join(step.workdir, sweep.rundir.EVAL_FILE)).exists()
    return 'complete' if done else 'pending'
  return sweep.run_summary(step.workdir)['status']


def select(steps: list[Step], only: list[str]) -> list[Step]:
  if not only:
    return steps
  names = {s.name for s in steps}
  unknown = sorted(set(only) - names)
  if unknown:
    raise sweep.SweepError(f'--only: unknown step(s) {", ".join(unknown)}; steps: {", ".join(names)}')
  return [s for s in steps if s.name in only]


def launch_argv(step: Step, launcher: str, extra: list[str], deps: list[str], eval_sbatch: list[str]
                ) -> list[str]:
  """The command that runs (local, tpu) or submits (slurm) one step."""
  if launcher == 'local' or (launcher == 'tpu' and step.kind == 'eval'):
    return step.argv + (extra if launcher == 'local' and step.kind == 'train' else [])
  config = next(a for a in step.argv if a.startswith('--config='))
  rest = [a for a in step.argv[3:] if a != config and not a.startswith('--workdir=')]
  if launcher == 'tpu':
    return ['bash', os.path.join(HERE, 'tpu_vm.sh'), 'train', *extra, config, f'--workdir={step.workdir}',
            '--', *rest]
  dependency = [f'--dependency=afterok:{":".join(deps)}'] if deps else []
  if step.kind == 'train':
    return [step.argv[0], os.path.join(HERE, 'slurm.py'), *extra,
            *(f'--sbatch-arg={d}' for d in dependency), config, f'--workdir={step.workdir}', '--', *rest]
  return ['sbatch', '--parsable', f'--job-name=vggjax-{step.name}', '--nodes=1',
          f'--output={sweep._join(step.workdir, "slurm-%j.out")}', *dependency, *eval_sbatch,
          f'--chdir={REPO}', f'--wrap={shlex.join(step.argv)}']


def _env(root: str, tiny: bool) -> dict:
  """The steps' environment. --tiny: a compilation cache shared by the steps (JAX_COMPILATION_CACHE_DIR,
  default ROOT/jax_cache), so the 384 and jitter runs of a net reuse its 256 run's compiled steps (the
  same shapes: the crop and the batch do not change along the chain)."""
  env = dict(os.environ)
  if tiny and not sweep._is_remote(root):
    env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(root, 'jax_cache'))
    env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return env


def _join_keeping_jobs(cmd: list[str]) -> str:
  """shlex.join, leaving the dry run's ${JOB_NAME} dependencies unquoted so that a shell expands them."""
  return ' '.join(a if '${JOB_' in a and "'" not in a and ' ' not in a else shlex.quote(a) for a in cmd)


def run(args: argparse.Namespace, extra: list[str]) -> int:
  root = args.root if sweep._is_remote(args.root) else os.path.abspath(args.root)
  overrides = [sweep.parse_override(s) for s in args.set]
  steps = select(plan(root, args.python, args.tiny, overrides), args.only)
  manifest_path = sweep._join(root, MANIFEST)
  manifest = (None if args.dry_run else sweep._safe(sweep.read_json, manifest_path)) or {}
  records = manifest.get('steps', {})
  jobs: dict[str, str] = {}
  done = {s.name for s in steps if not args.dry_run and status(s) == 'complete'}
  if not args.dry_run:
    sweep._path(root).mkdir(parents=True, exist_ok=True)
  for i, step in enumerate(steps, 1):
    head = f'[{i}/{len(steps)}] {step.name}'
    rec = records.setdefault(step.name, {})
    if step.name in done and not args.dry_run:
      print(f'# {head}: complete, skipped', file=sys.stderr)
      continue
    if args.launcher == 'slurm' and rec.get('job') and not args.resubmit and not args.dry_run:
      jobs[step.name] = rec['job']
      print(f'# {head}: submitted before (job {rec["job"]}), not complete: not submitted again '
            f'(--resubmit once that job has ended)', file=sys.stderr)
      continue
    missing = [p for p in step.parents if p not in done and p not in jobs]
    if missing and not args.dry_run:
      print(f'# {head}: its parents {", ".join(missing)} are not complete; stopping', file=sys.stderr)
      return 1
    deps = [jobs[p] for p in step.parents if p in jobs]
    if args.dry_run and args.launcher == 'slurm':
      deps = [f'${{JOB_{p}}}' for p in step.parents]
    cmd = launch_argv(step, args.launcher, extra, deps, args.eval_sbatch_arg)
    if args.dry_run:
      print(f'JOB_{step.name}=$({_join_keeping_jobs(cmd)})' if args.launcher == 'slurm' else shlex.join(cmd))
      continue
    print(f'# {head}: {shlex.join(cmd)}', file=sys.stderr, flush=True)
    t0 = time.time()
    if args.launcher == 'slurm':
      if step.kind == 'eval':  # sbatch does not create the directory of --output
        sweep._path(step.workdir).mkdir(parents=True, exist_ok=True)
      proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
      job = proc.stdout.strip().splitlines()[-1].split(';')[0] if proc.stdout.strip() else ''
      if proc.returncode == 0 and job:
        jobs[step.name] = job
        rec.update(job=job)
    else:
      proc = subprocess.run(cmd, cwd=REPO, env=_env(root, args.tiny))
    rec.update(command=shlex.join(cmd), returncode=proc.returncode, seconds=round(time.time() - t0, 1),
               finished=time.strftime('%Y-%m-%dT%H:%M:%S'))
    sweep._safe(sweep.write_json, manifest_path, {'root': root, 'tiny': args.tiny, 'launcher': args.launcher,
                                                  'steps': records})
    if proc.returncode != 0:
      print(f'# {head}: failed with exit status {proc.returncode}; the steps after it were not started '
            f'(run the same command again to resume)', file=sys.stderr)
      return 1
    if args.launcher != 'slurm':
      if status(step) != 'complete':
        print(f'# {head}: ended without completing (preempted?); run the same command again to resume',
              file=sys.stderr)
        return 1
      done.add(step.name)
  return 0


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--root', required=True, help='the chain\'s directory: one directory per step under it')
  p.add_argument('--tiny', action='store_true', help='configs/tiny.py: the chain in miniature on the CPU')
  p.add_argument('--set', nargs='+', default=[], metavar='FIELD=VALUE', help='overrides of every command')
  p.add_argument('--only', nargs='+', default=[], metavar='STEP', help='run only these steps')
  p.add_argument('--launcher', choices=('local', 'tpu', 'slurm'), default='local')
  p.add_argument('--python', default=sys.executable, help='the Python that runs vggjax (default: this one)')
  p.add_argument('--resubmit', action='store_true', help='slurm: submit again steps submitted before')
  p.add_argument('--eval-sbatch-arg', action='append', default=[], metavar='ARG',
                 help='slurm: an sbatch option of the evaluation jobs (e.g. --eval-sbatch-arg=--gres=gpu:8)')
  p.add_argument('--dry-run', action='store_true', help='print every command in order; run nothing')
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if '--study' in argv:  # the paper's findings in miniature: launch/study.py takes the other arguments
    import study
    return study.main([a for a in argv if a != '--study'])
  argv, extra = sweep.split_passthrough(argv)
  args = parser().parse_args(argv)
  try:
    return run(args, extra)
  except sweep.SweepError as e:
    print(f'paper.py: error: {e}', file=sys.stderr)
    return 2


if __name__ == '__main__':
  sys.exit(main())
