"""The study's tables and plots from its raw results (launch/study.py --summary): no training, no model code.

Every cell is the mean over seeds and its standard error (sample standard deviation / sqrt(seeds)). A claim
of the paper is an ordering of two cells; it is judged on the per-seed differences (the same seed shares the
task, the net A a deeper net starts from and the batches' order): "reproduced" when the mean difference has
the paper's sign and exceeds twice its standard error, "contradicted" when it has the other sign and exceeds
twice its standard error, "not distinguishable" otherwise, and "one seed" while only one seed is in.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys

# The paper's top-1 / top-5 validation errors (%), ImageNet (ILSVRC-2012), as printed in its tables.
PAPER_T3 = {'A_fixed': (29.6, 10.4), 'A-LRN_fixed': (29.7, 10.5), 'B_fixed': (28.7, 9.9), 'C_fixed': (28.1, 9.4),
            'C_jitter': (27.3, 8.8), 'D_fixed': (27.0, 8.8), 'D_jitter': (25.6, 8.1), 'E_fixed': (27.3, 9.0),
            'E_jitter': (25.5, 8.0)}
PAPER_T4 = {'C_fixed': (27.7, 9.2), 'C_jitter': (26.3, 8.2), 'D_fixed': (26.6, 8.6), 'D_jitter': (24.8, 7.5),
            'E_fixed': (26.9, 8.7), 'E_jitter': (24.8, 7.5)}
PAPER_T5 = {('D_jitter', 'dense'): (24.8, 7.5), ('D_jitter', 'multicrop'): (24.6, 7.5),
            ('D_jitter', 'dense+multicrop'): (24.4, 7.2), ('E_jitter', 'dense'): (24.8, 7.5),
            ('E_jitter', 'multicrop'): (24.6, 7.4), ('E_jitter', 'dense+multicrop'): (24.4, 7.1)}
PAPER_T6_FUSION = (23.7, 6.8)  # D and E jittered, multi-scale, dense + multi-crop
# Table 8: localisation error (%) from the central crop with the ground-truth class.
PAPER_T8 = {'scr': 36.4, 'pcr-fc': 34.3, 'pcr': 33.1}
NET_DEPTH = {'A': 11, 'A-LRN': 11, 'B': 13, 'C': 16, 'D': 16, 'E': 19}
TABLE4 = lambda n: 'table4j' if n.endswith('jitter') else 'table4f'  # noqa: E731
# Claims that one cell is no better than another (agreement includes no difference at all).
NO_BETTER = ('E (19) no worse than D (16), with jitter', 'LRN does not help: A-LRN no better than A',
             'D from A (warm start) ends no worse than D from scratch',
             'E from A (warm start) ends no worse than E from scratch')
# A no-better claim holds as 'no difference' when the difference is within this (2 points of error, with
# twice its standard error): the paper's own 'about equal' differences are 0.1-1 point.
EQUIVALENCE = 0.02
BOX_BASELINES = 'box_baselines.json'  # launch/study_box_baselines.py's output, in the raw results
BEGIN, END = '<!-- summary:begin (launch/study.py --summary writes this part) -->', '<!-- summary:end -->'


def load(results: str) -> dict[str, dict[int, object]]:
  """{step name without seed: {seed: raw result}} (metrics rows for training runs)."""
  out: dict[str, dict[int, object]] = {}
  for path in sorted(glob.glob(os.path.join(results, '*_s[0-9]*.json*'))):
    m = re.match(r'(.+)_s(\d+)\.(json|jsonl)$', os.path.basename(path))
    if not m:
      continue
    with open(path) as f:
      value = ([json.loads(x) for x in f if x.strip()] if m.group(3) == 'jsonl' else json.load(f))
    out.setdefault(m.group(1), {})[int(m.group(2))] = value
  baselines = os.path.join(results, BOX_BASELINES)
  if os.path.exists(baselines):  # launch/study_box_baselines.py: no net, no seed
    with open(baselines) as f:
      out['_box_baselines'] = json.load(f)
  return out


def mean_se(values: list[float]) -> tuple[float, float]:
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, float('nan')
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var / n)


def fmt(values: list[float]) -> str:
  if not values:
    return '-'
  m, se = mean_se(values)
  return f'{100 * m:.1f}' if math.isnan(se) else f'{100 * m:.1f} ± {100 * se:.1f}'


def _label(result: dict, step: str) -> str | None:
  """The label eval.json gives the model whose checkpoint is the step's directory."""
  for m in result.get('models', []):
    if os.path.basename(str(m.get('checkpoint', '')).rstrip('/')).startswith(step + '_s') or \
       re.sub(r'_s\d+$', '', m.get('label', '')) == step:
      return m['label']
  return None


def cell(raw, table: str, net: str, protocol: str = 'dense', multiscale: bool = False, metric: str = 'top1_err',
         test_scale: str | None = None) -> dict[int, float]:
  """{seed: error} of one model in one evaluation: its single-scale entry or its multi-scale one."""
  out = {}
  for seed, result in raw.get(table, {}).items():
    label = 'fusion' if net == 'fusion' else _label(result, net)
    entries = result.get('results', {}).get(label, {}).get(protocol, {}) if label else {}
    for key, entry in entries.items():
      n_scales = len(key.split(','))
      if (test_scale is not None and key == test_scale) or (test_scale is None and (n_scales > 1) == multiscale):
        out[seed] = entry[metric]
  return out


def loc_cell(raw, head: str, protocol: str, metric: str = 'top1_error') -> dict[int, float]:
  return {s: r['protocols'][protocol][metric] for s, r in raw.get(f'loc_{head}', {}).items()
          if protocol in r.get('protocols', {})}


def verdict(better: dict[int, float], worse: dict[int, float], no_better: bool = False) -> str:
  """The paper says `better` has the lower error than `worse` or, with `no_better`, that `worse` is no
  better than `better` (LRN does not help; E about equal to D): then `worse` clearly worse agrees, `worse`
  clearly better contradicts, and no difference agrees ('reproduced: no difference') only when the whole
  interval (mean ± 2 s.e.) of the difference lies within EQUIVALENCE: a difference lost in its error is
  not distinguishable, not evidence of equality."""
  seeds = sorted(set(better) & set(worse))
  if not seeds:
    return 'not run yet'
  if len(seeds) < 2:
    return 'one seed'
  m, se = mean_se([worse[s] - better[s] for s in seeds])
  if abs(m) > 2 * se:
    return 'reproduced' if m > 0 else 'contradicted'
  if no_better and abs(m) + 2 * se <= EQUIVALENCE:
    return 'reproduced: no difference'
  return 'not distinguishable'


def diff(better: dict[int, float], worse: dict[int, float]) -> str:
  seeds = sorted(set(better) & set(worse))
  return fmt([worse[s] - better[s] for s in seeds]) if seeds else '-'


def claims(raw) -> list[tuple[str, str, str, dict, dict]]:
  """(claim, the paper's evidence, which table, first, second): every ordering the study tests, each as the
  paper has it: the first cell's error below the second's (or, NO_BETTER, not above it)."""
  t3 = lambda n: cell(raw, 'table3', n)  # noqa: E731
  t4 = lambda n: cell(raw, TABLE4(n), n, multiscale=True)  # noqa: E731
  t5 = lambda n, p: cell(raw, 'table5', n, p, multiscale=True)  # noqa: E731
  out = [
      ('B (13 layers) beats A (11)', 'T3: 28.7 vs 29.6', 'Table 3', t3('B_fixed'), t3('A_fixed')),
      ('D (16) beats B (13)', 'T3: 27.0 vs 28.7', 'Table 3', t3('D_fixed'), t3('B_fixed')),
      ('D (3x3 convs) beats C (1x1 convs in blocks 3-5)', 'T3: 27.0 vs 28.1', 'Table 3', t3('D_fixed'),
       t3('C_fixed')),
      ('E (19) no worse than D (16), with jitter', 'T3: 25.5 vs 25.6 (E about equal to D)', 'Table 3',
       t3('E_jitter'), t3('D_jitter')),
      ('LRN does not help: A-LRN no better than A', 'T3: 29.7 vs 29.6', 'Table 3', t3('A_fixed'),
       t3('A-LRN_fixed')),
  ]
  for n in 'CDE':
    out.append((f'scale jitter in training helps {n}', f'T3: {PAPER_T3[n + "_jitter"][0]} vs '
                f'{PAPER_T3[n + "_fixed"][0]}', 'Table 3', t3(f'{n}_jitter'), t3(f'{n}_fixed')))
  for n in ('D_fixed', 'D_jitter', 'E_jitter'):
    out.append((f'multi-scale test helps {n}', f'T4 vs T3: {PAPER_T4[n][0]} vs {PAPER_T3[n][0]}', 'Table 4',
                t4(n), t3(n)))
  for n in ('D_jitter', 'E_jitter'):
    out.append((f'dense + multi-crop beats dense alone, {n}', 'T5: 24.4 vs 24.8', 'Table 5',
                t5(n, 'dense+multicrop'), t5(n, 'dense')))
    out.append((f'dense + multi-crop beats multi-crop alone, {n}', 'T5: 24.4 vs 24.6', 'Table 5',
                t5(n, 'dense+multicrop'), t5(n, 'multicrop')))
  out.append(('fusion of D and E beats E alone', 'T6/T5: 23.7 vs 24.4', 'Table 6',
              t5('fusion', 'dense+multicrop'), t5('E_jitter', 'dense+multicrop')))
  crop = lambda h: loc_cell(raw, h, 'crop', 'gt_class_error')  # noqa: E731
  out.append(('per-class regression (PCR) beats single-class (SCR)', 'T8: 34.3 vs 36.4 (fc only)', 'Table 8',
              crop('pcr'), crop('scr')))
  out.append(('fine-tuning all layers beats fc only (PCR)', 'T8: 33.1 vs 34.3', 'Table 8', crop('pcr'),
              crop('pcr-fc')))
  out.append(('dense with box merging beats the central crop (PCR, top-1 class)', 'T9 and 4.5: dense better',
              'Table 8', loc_cell(raw, 'pcr', 'dense'), loc_cell(raw, 'pcr', 'crop')))
  for n in 'DE':
    final = {s: 1 - rows_val(r)[-1][1] for s, r in raw.get(f'{n}_fixed', {}).items() if rows_val(r)}
    scratch = {s: 1 - rows_val(r)[-1][1] for s, r in raw.get(f'{n}_scratch', {}).items() if rows_val(r)}
    out.append((f'{n} from A (warm start) ends no worse than {n} from scratch',
                '3.1: warm start for random init; Glorot "possible without pre-training"', 'warm start', final,
                scratch))
  return out


def rows_val(rows: list[dict]) -> list[tuple[float, float]]:
  """(epoch, val top-1) of a run's evaluations."""
  return [(r.get('epoch', r['step']), r['val_top1']) for r in rows if 'val_top1' in r]


def tables(raw) -> str:
  seeds = sorted({s for name, v in raw.items() if not name.startswith('_') for s in v})
  lines = [f'Seeds in: {len(seeds)} ({", ".join(map(str, seeds)) or "none"}). Errors in %, mean ± standard error '
           f'over seeds, on the task\'s 2,000 test pictures; the paper\'s on ImageNet\'s validation set.', '']
  lines += ['### Table 3: single test scale (dense)', '',
            '| net | train S | top-1 | top-5 | paper top-1 | paper top-5 | seeds |', '|---|---|---:|---:|---:|---:|---:|']
  for n in ('A_fixed', 'A-LRN_fixed', 'B_fixed', 'C_fixed', 'C_jitter', 'D_fixed', 'D_jitter', 'E_fixed',
            'E_jitter', 'D_scratch', 'E_scratch'):
    net, scale = n.split('_')
    top1, top5 = cell(raw, 'table3', n), cell(raw, 'table3', n, metric='top5_err')
    p = PAPER_T3.get(n, ('-', '-'))
    s_label = {'fixed': '36', 'jitter': '[36, 72]', 'scratch': '36 (from scratch)'}[scale]
    lines.append(f'| {net} | {s_label} | {fmt(list(top1.values()))} | {fmt(list(top5.values()))} | {p[0]} | '
                 f'{p[1]} | {len(top1)} |')
  lines += ['', '### Table 4: multi-scale test (dense; Q = {32, 36, 40} for S = 36, {36, 54, 72} for S in [36, 72])', '',
            '| net | train S | top-1 | top-5 | paper top-1 | paper top-5 |', '|---|---|---:|---:|---:|---:|']
  for n in PAPER_T4:
    net, scale = n.split('_')
    top1 = cell(raw, TABLE4(n), n, multiscale=True)
    top5 = cell(raw, TABLE4(n), n, multiscale=True, metric='top5_err')
    lines.append(f'| {net} | {scale} | {fmt(list(top1.values()))} | {fmt(list(top5.values()))} | {PAPER_T4[n][0]} '
                 f'| {PAPER_T4[n][1]} |')
  lines += ['', '### Tables 5 and 6: dense, multi-crop, both (multi-scale, jittered nets) and fusion', '',
            '| net | protocol | top-1 | top-5 | paper top-1 | paper top-5 |', '|---|---|---:|---:|---:|---:|']
  for n in ('D_jitter', 'E_jitter', 'fusion'):
    for p in ('dense', 'multicrop', 'dense+multicrop'):
      top1 = cell(raw, 'table5', n, p, multiscale=True)
      top5 = cell(raw, 'table5', n, p, multiscale=True, metric='top5_err')
      paper = PAPER_T5.get((n, p), PAPER_T6_FUSION if (n, p) == ('fusion', 'dense+multicrop') else ('-', '-'))
      lines.append(f'| {n.replace("_jitter", "") if n != "fusion" else "D + E fused"} | {p} | '
                   f'{fmt(list(top1.values()))} | {fmt(list(top5.values()))} | {paper[0]} | {paper[1]} |')
  lines += ['', '### Table 8: localisation error (IoU > 0.5), net D', '',
            '| regression | fine-tuned | central crop, true class | central crop, top-1 class | dense + merging, '
            'top-1 class | paper (central crop, true class) |', '|---|---|---:|---:|---:|---:|']
  for head, what in (('scr', 'all layers'), ('pcr', 'all layers'), ('pcr-fc', 'fc6-fc8')):
    g = loc_cell(raw, head, 'crop', 'gt_class_error')
    c1, d1 = loc_cell(raw, head, 'crop'), loc_cell(raw, head, 'dense')
    lines.append(f'| {head.split("-")[0].upper()} | {what} | {fmt(list(g.values()))} | {fmt(list(c1.values()))} '
                 f'| {fmt(list(d1.values()))} | {PAPER_T8.get(head, "-") if head != "scr" else "36.4 (fc only)"} |')
  base = raw.get('_box_baselines')
  if base:  # the same central crops, no net: what a regressor of the crop could reach, and knowing nothing
    for key, what in (('mean_box', 'no net: the training crops\' mean box'),
                      ('oracle', 'no net: the true box clipped to the crop')):
      lines.append(f'| {what} | - | {100 * base[key]["error"]:.1f} | - | - | - |')
  lines += ['', '### The paper\'s orderings', '',
            '| claim | the paper | table | difference (points, mean ± s.e.) | verdict |', '|---|---|---|---:|---|']
  for claim, paper, table, better, worse in claims(raw):
    lines.append(f'| {claim} | {paper} | {table} | {diff(better, worse)} | '
                 f'{verdict(better, worse, claim in NO_BETTER)} |')
  return '\n'.join(lines)


def _finish(plt, fig, ax, xlabel: str, ylabel: str, title: str, path: str, fontsize=None) -> str:
  """Labels, title and legend (where something is labelled) of a plot; saves it to `path` and closes it."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=fontsize)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def plots(raw, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  written = []
  # Error vs depth.
  fig, ax = plt.subplots(figsize=(6, 4))
  for scale, marker, nets in (('fixed', 'o', 'ABCDE'), ('jitter', 's', 'CDE')):
    xs, ms, ses = [], [], []
    for n in nets:
      v = list(cell(raw, 'table3', f'{n}_{scale}').values())
      if v:
        m, se = mean_se(v)
        xs.append(NET_DEPTH[n] + (0.3 if n == 'D' else 0) + (0.15 if scale == 'jitter' else 0))
        ms.append(100 * m)
        ses.append(0 if math.isnan(se) else 100 * se)
    if xs:
      ax.errorbar(xs, ms, yerr=ses, marker=marker, capsize=3, label=f'train S {scale}')
  for n in 'ABCDE':
    ax.annotate(n, (NET_DEPTH[n] + (0.3 if n == 'D' else 0), ax.get_ylim()[1]), ha='center', va='top')
  written.append(_finish(plt, fig, ax, 'weight layers (C: 16 with 1x1 convs; D: 16 with 3x3, drawn at 16.3)',
                         'top-1 test error (%)', 'Error vs depth (Table 3 in miniature; mean ± s.e. over seeds)',
                         os.path.join(out_dir, 'error_vs_depth.png')))
  # Test-scale curves: error at each single Q of Table 4's evaluation.
  fig, ax = plt.subplots(figsize=(6, 4))
  for n in ('C_fixed', 'D_fixed', 'E_fixed', 'C_jitter', 'D_jitter', 'E_jitter'):
    per_q: dict[int, list[float]] = {}
    for result in raw.get(TABLE4(n), {}).values():
      label = _label(result, n)
      for key, entry in result.get('results', {}).get(label, {}).get('dense', {}).items():
        if ',' not in key:
          per_q.setdefault(int(key), []).append(100 * entry['top1_err'])
    if per_q:
      qs = sorted(per_q)
      stats = [mean_se([v / 100 for v in per_q[q]]) for q in qs]
      ax.errorbar(qs, [100 * m for m, _ in stats], yerr=[0 if math.isnan(s) else 100 * s for _, s in stats],
                  marker='o', capsize=3, ls='-' if 'fixed' in n else '--', label=n.replace('_', ', S '))
  written.append(_finish(plt, fig, ax, 'test scale Q (shorter side, pixels)', 'top-1 test error (%)',
                         'Test-scale curves (Table 4 in miniature)', os.path.join(out_dir, 'test_scales.png'), fontsize=8))
  # Warm start vs scratch.
  fig, ax = plt.subplots(figsize=(6, 4))
  for n, colour in (('D', 'C0'), ('E', 'C1')):
    for kind, ls in (('fixed', '-'), ('scratch', '--')):
      for i, rows in enumerate(raw.get(f'{n}_{kind}', {}).values()):
        pts = rows_val(rows)
        if pts:
          ax.plot([p[0] for p in pts], [100 * (1 - p[1]) for p in pts], ls=ls, color=colour, alpha=0.8,
                  label=f'{n} {"from A" if kind == "fixed" else "from scratch"}' if i == 0 else None)
  written.append(_finish(plt, fig, ax, 'epoch', 'top-1 validation error (%)',
                         'Warm start from A vs from scratch\n(from scratch: its own curriculum stage; one line per '
                         'seed)', os.path.join(out_dir, 'warm_start.png')))
  return written


def main(results: str, doc: str) -> int:
  raw = load(results)
  if not raw:
    print(f'study.py --summary: no raw results in {results} (run launch/study.py first)', file=sys.stderr)
    return 2
  text = tables(raw)
  out_dir = os.path.join(os.path.dirname(os.path.abspath(doc)), 'paper_miniature')
  os.makedirs(out_dir, exist_ok=True)
  pngs = plots(raw, out_dir)
  if os.path.exists(doc) and BEGIN in open(doc).read():
    body = open(doc).read()
    head, _, rest = body.partition(BEGIN)
    _, _, tail = rest.partition(END)
    with open(doc, 'w') as f:
      f.write(head + BEGIN + '\n' + text + '\n' + END + tail)
  else:
    with open(doc, 'w') as f:
      f.write('# The paper in miniature\n\n' + BEGIN + '\n' + text + '\n' + END + '\n')
  print(text)
  print(f'\nwrote {doc} and {", ".join(pngs)}', file=sys.stderr)
  return 0
