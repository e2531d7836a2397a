"""Reporting: the table laid out like the paper's Tables 3-5, and WORKDIR/eval.json."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from vggjax import checkpoints, runlog

RESULTS_FILE = 'eval.json'


def format_table(result: Mapping) -> str:
  """The results laid out like the paper's Tables 3-5: ConvNet config, evaluation method, train S, test Q,
  top-1 and top-5 validation error (%), and the number of images."""
  by_label = {m['label']: m for m in result['models']}
  header = ('ConvNet config', 'evaluation method', 'train S', 'test Q', 'top-1 err (%)', 'top-5 err (%)',
            'images')
  lines = []
  labels = [m['label'] for m in result['models']] + (['fusion'] if 'fusion' in result['results'] else [])
  for label in labels:
    per = result['results'].get(label, {})
    if label == 'fusion':
      config = ' + '.join(f'{m["label"]}' for m in result['models'])
      train = ', '.join(m['train_scale'] for m in result['models'])
    else:
      config, train = label, by_label[label]['train_scale']
    for protocol in result['protocols']:
      for key, entry in per.get(protocol, {}).items():
        lines.append((config, protocol, train, key, f'{100 * entry["top1_err"]:.1f}',
                      f'{100 * entry["top5_err"]:.1f}', str(entry['num_images'])))
  widths = [max(len(row[c]) for row in [header] + lines) for c in range(len(header))]
  fmt = lambda row: ' | '.join(cell.ljust(w) for cell, w in zip(row, widths))  # noqa: E731
  rule = '-+-'.join('-' * w for w in widths)
  return '\n'.join([fmt(header), rule] + [fmt(row) for row in lines])


def write_results(result: Mapping, workdir: str) -> str:
  """WORKDIR/eval.json (atomically; local or gs://)."""
  directory = checkpoints.absolute(workdir)
  directory.mkdir(parents=True, exist_ok=True)

  def clean(x):
    if isinstance(x, float) and not math.isfinite(x):
      return str(x)
    if isinstance(x, dict):
      return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
      return [clean(v) for v in x]
    return x

  text = json.dumps(clean(dict(result)), indent=2)
  return str(runlog.write_text(directory / RESULTS_FILE, text))
