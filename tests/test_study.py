"""launch/study.py, the paper's findings in miniature: the plan, the verdicts on the paper's orderings, and the
whole chain at toy size (task, every run, every evaluation, the summary, the resume)."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, fast_compile_env, subprocess_env

sys.path.insert(0, str(REPO / 'launch'))
import study  # noqa: E402
import study_summary as summary  # noqa: E402

STUDY = str(REPO / 'launch' / 'study.py')


def test_plan_runs_parents_first_and_seed_by_seed(tmp_path):
  steps = study.plan(str(tmp_path), seeds=2)
  names = [s.name for s in steps]
  assert names[0] == 'task' and len(names) == 1 + 2 * (18 + 4 + 3)
  assert names.index('A_fixed_s1') > names.index('loc_pcr-fc_s0')  # seed 0 whole first
  for i, s in enumerate(steps):
    assert all(names.index(p) < i for p in s.parents), s.name
  by = {s.name: s for s in steps}
  assert f'--config.init_from={tmp_path}/A_fixed_s0' in by['E_fixed_s0'].argv
  assert f'--config.init_from={tmp_path}/D_fixed_s1' in by['D_jitter_s1'].argv
  assert f'--config.init_from={tmp_path}/D_pre_s0' in by['D_scratch_s0'].argv  # no layer of A
  assert '--config.init_layers=all' in by['A_fixed_s0'].argv and not any('data_dir' in a for a in by['E_pre_s1'].argv)
  assert not any('init_from' in a for a in by['A_pre_s0'].argv)
  assert '--config.train.trainable=fc*' in by['D_pcr-fc_s0'].argv
  assert '--config.seed=1' in by['B_fixed_s1'].argv
  assert '--scales=32,36,40' in by['table4f_s0'].argv and '--multiscale' in by['table4j_s0'].argv
  assert by['table3_s0'].argv.count('--config.data.eval_split=test') == 1
  assert len(by['table3_s0'].parents) == 11


def _eval(label_errors: dict[str, dict[str, float]]) -> dict:
  """An eval.json of the evaluator's layout: per model, protocol and scale key, top-1 / top-5 errors."""
  return {'models': [{'label': label, 'checkpoint': f'/r/{label}'} for label in label_errors if label != 'fusion'],
          'results': {label: {'dense': {key: {'top1_err': e, 'top5_err': e / 2} for key, e in errs.items()}}
                      for label, errs in label_errors.items()}}


def test_verdicts_follow_the_per_seed_differences(tmp_path):
  raw = tmp_path / 'raw'
  raw.mkdir()
  # B beats A by 5 points on every seed; D vs B is noise around 0; C beats D (the paper's reverse) clearly.
  for seed, (a, b, c, d) in enumerate([(0.40, 0.35, 0.30, 0.36), (0.42, 0.37, 0.31, 0.35), (0.41, 0.36, 0.29, 0.37)]):
    names = {'A_fixed': a, 'B_fixed': b, 'C_fixed': c, 'D_fixed': d}
    (raw / f'table3_s{seed}.json').write_text(json.dumps(_eval({f'{n}_s{seed}': {'36': e} for n, e in names.items()})))
  loaded = summary.load(str(raw))
  assert sorted(loaded['table3']) == [0, 1, 2]
  got = {claim: summary.verdict(better, worse) for claim, _, _, better, worse in summary.claims(loaded)}
  assert got['B (13 layers) beats A (11)'] == 'reproduced'
  assert got['D (3x3 convs) beats C (1x1 convs in blocks 3-5)'] == 'contradicted'
  assert got['D (16) beats B (13)'] == 'not distinguishable'  # differences 1, -2, 1 points
  assert got['E (19) no worse than D (16), with jitter'] == 'not run yet'
  assert summary.verdict({0: .3, 1: .305}, {0: .305, 1: .3}, no_better=True) == 'reproduced: no difference'
  # A difference lost in its error is no evidence of equality (E 12 points worse than D, s.e. 8).
  assert summary.verdict({0: .45, 1: .50}, {0: .49, 1: .22}, no_better=True) == 'not distinguishable'
  assert summary.verdict({0: .3, 1: .3}, {0: .35, 1: .36}, no_better=True) == 'reproduced'  # clearly worse
  assert summary.verdict({0: .3, 1: .3}, {0: .25, 1: .24}, no_better=True) == 'contradicted'
  m, se = summary.mean_se([0.05, 0.05, 0.05])
  assert math.isclose(m, 0.05) and se < 1e-12
  assert summary.verdict({0: 0.3}, {0: 0.4}) == 'one seed'
  doc = tmp_path / 'doc.md'
  doc.write_text('# hand-written head\n\n' + summary.BEGIN + '\nold\n' + summary.END + '\n\nhand-written tail\n')
  (raw / summary.BOX_BASELINES).write_text(json.dumps({'mean_box': {'mean_iou': 0.26, 'error': 0.9145},
                                                        'oracle': {'mean_iou': 0.87, 'error': 0.0505}}))
  assert summary.main(str(raw), str(doc)) == 0
  text = doc.read_text()
  assert "| no net: the training crops' mean box | - | 91.5 |" in text
  assert '| no net: the true box clipped to the crop | - | 5.1 |' in text
  assert text.startswith('# hand-written head') and text.rstrip().endswith('hand-written tail')
  assert 'old' not in text and '| B | 36 | 36.0 ± 0.6 |' in text  # mean 36.0, s.e. 0.58 points
  for png in ('error_vs_depth.png', 'test_scales.png', 'warm_start.png'):
    assert (tmp_path / 'paper_miniature' / png).stat().st_size > 1000


# The toy chain's 26 processes compile tiny nets and run them 3 steps: compiled at level 0 (design 42).
ENV = subprocess_env(1, **fast_compile_env())


@pytest.mark.slow
def test_toy_study_runs_every_step_and_resumes(tmp_path):
  root, raw = tmp_path / 'study', tmp_path / 'raw'
  cmd = [sys.executable, STUDY, f'--root={root}', '--toy', '--seeds=1', f'--results={raw}', '--nice=0']
  out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=1200)
  assert out.returncode == 0, out.stderr[-4000:]
  names = [s.name for s in study.plan(str(root), seeds=1, toy=True)]
  assert f'{len(names)} of {len(names)} steps complete' in out.stderr
  for name in names[1:]:
    kind = 'jsonl' if not name.startswith(('table', 'loc_')) else 'json'
    assert (raw / f'{name}.{kind}').exists(), name
  t5 = json.loads((raw / 'table5_s0.json').read_text())
  assert {'dense', 'multicrop', 'dense+multicrop'} <= set(t5['results']['fusion'])
  loc = json.loads((raw / 'loc_pcr_s0.json').read_text())
  assert set(loc['protocols']) == {'crop', 'dense'} and 'examples' not in loc
  warm = (root / 'B_fixed_s0.log').read_text()
  assert 'warm start from' in warm and 'copied 7 layers' in warm
  # Everything is there: a second run skips every step; the summary regenerates from the raw results alone.
  again = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
  assert again.returncode == 0 and again.stderr.count('complete, skipped') == len(names)
  # Moved without its run directories (a new machine): the recorded results stand, nothing runs again.
  for name in names[1:]:
    shutil.rmtree(root / name)
  moved = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
  assert moved.returncode == 0, moved.stderr[-3000:]
  assert moved.stderr.count('no step left to run needs its run directory; skipped') == len(names) - 1
  assert not any((root / name).exists() for name in names[1:])
  doc = tmp_path / 'paper_miniature.md'
  out = subprocess.run([sys.executable, STUDY, f'--root={root}', '--summary', f'--results={raw}', f'--doc={doc}'],
                       capture_output=True, text=True, env=ENV, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert '### Table 3' in doc.read_text() and '| claim |' in doc.read_text()


def test_a_missing_result_runs_its_step_and_the_steps_it_reads(tmp_path):
  """needed_steps: with every raw result recorded nothing runs; without one, its step and every step whose run
  directory it reads, back to the task; without a leaf's, only the leaf and its ancestry."""
  steps = study.plan(str(tmp_path / 'study'), seeds=2)
  by_name = {s.name: s for s in steps}
  raw = tmp_path / 'raw'
  raw.mkdir()
  for s in steps:
    pathlib.Path(study._result_path(s, str(raw))).write_text('{}')
  assert study.needed_steps(steps, str(raw)) == set()
  os.remove(study._result_path(by_name['loc_scr_s1'], str(raw)))
  assert study.needed_steps(steps, str(raw)) == {'loc_scr_s1', 'D_scr_s1', 'D_fixed_s1', 'A_fixed_s1', 'A_pre_s1',
                                                 'task'}
  os.remove(study._result_path(by_name['table3_s0'], str(raw)))
  needed = study.needed_steps(steps, str(raw))
  assert {n for n in needed if n.endswith('_s0')} == {f'{c}_s0' for c in study.CLASSIFIERS} | {
      'table3_s0', 'A_pre_s0', 'A-LRN_pre_s0', 'D_pre_s0', 'E_pre_s0'}
  assert not needed & {'D_pcr_s0', 'D_scr_s0', 'D_pcr-fc_s0', 'loc_pcr_s0', 'table4f_s0', 'table5_s0'}


def test_box_baselines_hand_computed(tmp_path):
  """launch/study_box_baselines.py on three 40x40 pictures (Q = 40, so the central crop is the picture
  itself, rescale 1): the oracle is the true box, the mean box is the training picture's box, the whole
  picture is 40x40."""
  import study_box_baselines
  from PIL import Image
  boxes = {'train/0_a/0.png': [[4, 4, 20, 20]], 'test/0_a/1.png': [[4, 4, 20, 20]],
           'test/0_a/2.png': [[20, 20, 36, 36]]}
  for k in boxes:
    (tmp_path / k).parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (40, 40)).save(tmp_path / k)
  (tmp_path / 'boxes.json').write_text(json.dumps(boxes))
  out = study_box_baselines.baselines(str(tmp_path), scale=40, size=40)
  assert out['pictures'] == 2
  assert out['oracle'] == {'mean_iou': 1.0, 'error': 0.0}
  assert out['mean_box'] == {'mean_iou': 0.5, 'error': 0.5}  # right on one picture, disjoint on the other
  assert out['whole_picture'] == {'mean_iou': 0.16, 'error': 1.0}  # 16*16 / 40*40
  with pytest.raises(ValueError, match="no pictures of split 'val'"):
    study_box_baselines.baselines(str(tmp_path), scale=40, size=40, split='val')


def _cuts(curve: list[float], patience: int) -> list[int]:
  """The epochs (1-based) at which configs/paper_mini.py's plateau schedule, with `patience`, cuts the lr
  when fed this validation top-1 curve (one evaluation an epoch)."""
  sys.path.insert(0, str(REPO))
  from configs import paper_mini
  from vggjax import optim
  cfg = paper_mini.get_config('E,fixed').optimizer
  cfg.plateau_patience = patience
  schedule = optim.Schedule.from_config(cfg, steps_per_epoch=156, total_steps=16 * 156)
  return [epoch for epoch, top1 in enumerate(curve, 1) if schedule.on_eval(top1)]


def test_the_studys_schedule_does_not_cut_on_a_dip_of_noise():
  """The first study's curves (docs/paper_miniature/raw_patience1, val top-1 % of 1,000 pictures, up to their
  first cut): with patience 1 each was cut on one dip of noise while still rising; configs/paper_mini.py's
  patience leaves them alone and still cuts a flat curve."""
  from configs import paper_mini
  rising = {'E_fixed_s0': [20, 26, 27, 30, 28], 'A_fixed_s1': [13, 14, 19, 19], 'D_fixed_s0': [21, 25, 28, 30, 27],
            'B_fixed_s1': [19, 20, 24, 26, 26, 28, 31, 29]}
  for name, curve in rising.items():
    assert _cuts(curve, 1), name  # what happened in the first study
    assert _cuts(curve, paper_mini.PLATEAU_PATIENCE) == [], name
    raw = REPO / 'docs' / 'paper_miniature' / 'raw_patience1' / f'{name}.jsonl'
    rows = [json.loads(line) for line in raw.read_text().splitlines() if 'val_top1' in line]
    assert [round(r['val_top1'] * 100) for r in rows[:len(curve)]] == curve, name  # the recorded curve
  flat = [20, 26, 27, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30]
  assert _cuts(flat, paper_mini.PLATEAU_PATIENCE) == [7, 10, 13]


FORK_SCRIPT = '''
import os, sys, time
import forked_steps
forked_steps.preload({'VGGJAX_NUM_CPU_DEVICES': '1'}, cwd=sys.argv[1])
out = sys.argv[2]
steps = {'dry_run': ['--workdir=' + out + '/run', '--dry_run'],
         'bad_field': ['--workdir=' + out + '/bad', '--config.train.no_such_field=1'],
         'bad_flag': ['--workdir=' + out + '/bad', '--no_such_flag']}
procs = {}
for name, args in steps.items():
  argv = [sys.executable, '-m', 'vggjax.main', *args]
  assert forked_steps.forkable(argv)
  procs[name] = forked_steps.start(argv, cwd=sys.argv[1], log=open(out + '/' + name + '.log', 'w'), nice=1)
while any(p.poll() is None for p in procs.values()):
  time.sleep(0.05)
print({name: p.returncode for name, p in procs.items()})
print('parent devices', len(__import__('jax').devices()))
'''


def test_forked_steps_run_each_command_as_its_own_process(tmp_path):
  """launch/forked_steps.py: children of one process that imported vggjax run `python -m vggjax.main`'s
  code with their own argv, log file and exit status (0, and 2 for a bad field or flag, as the command
  line gives); the parent's JAX is untouched by them. The pytest process itself (its backend is up) is
  refused, so nothing forks a live JAX."""
  script = tmp_path / 'fork.py'
  script.write_text(FORK_SCRIPT)
  env = subprocess_env(1)
  env['PYTHONPATH'] = str(REPO / 'launch') + os.pathsep + env['PYTHONPATH']
  out = subprocess.run([sys.executable, str(script), str(REPO), str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "{'dry_run': 0, 'bad_field': 2, 'bad_flag': 2}" in out.stdout, out.stdout
  assert 'parent devices 1' in out.stdout
  assert 'no_such_field' in (tmp_path / 'bad_field.log').read_text()
  assert 'no_such_flag' in (tmp_path / 'bad_flag.log').read_text()
  dry = (tmp_path / 'dry_run.log').read_text()
  assert 'global_batch_size' in dry and not (tmp_path / 'run').exists(), dry[-2000:]
  sys.path.insert(0, str(REPO / 'launch'))
  import forked_steps
  import jax
  jax.devices()
  with pytest.raises(RuntimeError, match='cannot be forked'):
    forked_steps.preload({}, cwd=str(REPO))
  assert not forked_steps.forkable(['/other/python', '-m', 'vggjax.main'])
  assert not forked_steps.forkable([sys.executable, '-m', 'vggjax.predict'])
