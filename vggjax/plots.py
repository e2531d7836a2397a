"""The pictures a run leaves for a person to read: WORKDIR/curves.png (training, from metrics.jsonl and
config.json) and localization.png (`vggjax localize`). Each figure is built by a function that returns the
matplotlib Figure (what the tests read: titles, labels, the series drawn) and written by another.
matplotlib is optional: without it a run ends without its picture, with a warning."""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Iterable, Mapping

import numpy as np
from etils import epath

from vggjax import rundir

log = logging.getLogger('vggjax')
BOX_HEADS = ('scr', 'pcr')  # localization_model.BOX_HEADS (not imported: this module needs no JAX)


def _pyplot():
  """matplotlib.pyplot on the Agg backend (files only), or None where matplotlib is not installed."""
  try:
    import matplotlib
  except ImportError:
    return None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _numbers(rows: Iterable[dict], key: str) -> list[dict]:
  return [r for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]


def head_of(config: Mapping | None, rows: list[dict]) -> str:
  """The run's model.head: from its config, else 'pcr' where the rows have a mean IoU (a box net)."""
  head = ((config or {}).get('model') or {}).get('head')
  return head or ('pcr' if any('val_iou' in r for r in rows) else 'classify')


def curve_labels(head: str) -> dict:
  """What the curves of a run with this head measure: the loss, and what top-1 means."""
  if head in BOX_HEADS:
    return {'loss': 'Euclidean box loss', 'top1': 'IoU > 0.5 rate', 'score': 'IoU > 0.5 rate, mean IoU',
            'val_top1': 'val IoU > 0.5', 'train_top1': 'train IoU > 0.5', 'top5': None}
  return {'loss': 'cross-entropy', 'top1': 'top-1', 'score': 'accuracy', 'val_top1': 'val top-1',
          'train_top1': 'train top-1', 'top5': 'val top-5'}


def describe_config(config: Mapping | None) -> str:
  """The config in a few words: net, head, data, schedule and learning rate."""
  if not config:
    return 'config unknown (no config.json)'
  model, data, opt = config.get('model', {}), config.get('data', {}), config.get('optimizer', {})
  head = model.get('head', 'classify')
  data_name = data.get('name') or data.get('source') or '?'
  if data.get('source') == 'folder' and data.get('data_dir'):
    data_name = f'folder {os.path.basename(str(data["data_dir"]).rstrip("/"))}'
  parts = [str(model.get('name', '?')) + ('' if head == 'classify' else f' {head.upper()}'),
           f'on {data_name} at {data.get("image_size", "?")} px',
           f'{opt.get("schedule", "?")} lr {opt.get("lr", "?")}']
  return ' '.join(parts)


def _steps_per_epoch(rows: list[dict]) -> float | None:
  for r in rows:
    if isinstance(r.get('epoch'), (int, float)) and r['epoch'] > 0 and r.get('step'):
      return r['step'] / r['epoch']
  return None


def curves_figure(rows: list[dict], config: Mapping | None = None, workdir: Any = ''):
  """The training curves against the epoch (the step on the top axis): the loss, the top-1 (and top-5, or a
  box net's IoU > 0.5 rate and mean IoU) and the learning rate, each lr reduction a dotted line across all
  three; titled with the config, the workdir and the final validation figure. None without matplotlib."""
  plt = _pyplot()
  if plt is None:
    return None
  head = head_of(config, rows)
  labels = curve_labels(head)
  train, evals, lrs = _numbers(rows, 'loss'), _numbers(rows, 'val_top1'), _numbers(rows, 'lr')
  per_epoch = _steps_per_epoch(rows)
  x = (lambda r: r['step'] / per_epoch) if per_epoch else (lambda r: r['step'])  # noqa: E731
  fig, (ax_loss, ax_score, ax_lr) = plt.subplots(1, 3, figsize=(15, 4.6), width_ratios=(1, 1, 0.7))
  ax_loss.plot([x(r) for r in train], [r['loss'] for r in train], label='train loss')
  val_loss = _numbers(evals, 'val_loss')
  if val_loss:
    ax_loss.plot([x(r) for r in val_loss], [r['val_loss'] for r in val_loss], 'o-', label='val loss')
  ax_loss.set(title=labels['loss'], ylabel=labels['loss'])
  losses = [r['loss'] for r in train] + [r['val_loss'] for r in val_loss]
  if losses and min(losses) > 0 and max(losses) > 10 * min(losses):  # a decade or more: log scale
    ax_loss.set_yscale('log')
  ax_score.plot([x(r) for r in evals], [r['val_top1'] for r in evals], 'o-', label=labels['val_top1'])
  if labels['top5']:
    ax_score.plot([x(r) for r in evals], [r['val_top5'] for r in evals], 's--', label=labels['top5'])
  ious = _numbers(evals, 'val_iou')
  if ious:
    ax_score.plot([x(r) for r in ious], [r['val_iou'] for r in ious], 'd-', label='val mean IoU')
  ema = _numbers(evals, 'ema_val_top1')
  if ema:
    ax_score.plot([x(r) for r in ema], [r['ema_val_top1'] for r in ema], '^:', label=f'EMA {labels["val_top1"]}')
  train_top1 = _numbers(train, 'train_top1')
  if train_top1:
    ax_score.plot([x(r) for r in train_top1], [r['train_top1'] for r in train_top1], alpha=0.5,
                  label=labels['train_top1'])
  ax_score.set(title=labels['score'], ylabel=labels['score'], ylim=(0, 1.02))
  ax_lr.plot([x(r) for r in lrs], [r['lr'] for r in lrs], color='tab:purple', label='learning rate')
  ax_lr.set(title='learning rate', ylabel='learning rate')
  if lrs and min(r['lr'] for r in lrs) > 0:
    ax_lr.set_yscale('log')
  reductions = [x(r) for r in evals if r.get('lr_reduced')]
  for ax in (ax_loss, ax_score, ax_lr):
    for i, at in enumerate(reductions):
      ax.axvline(at, color='grey', ls=':', lw=1.2, label='lr reduced' if i == 0 else None)
    ax.set_xlabel('epoch' if per_epoch else 'step')
    if per_epoch:
      top = ax.secondary_xaxis('top', functions=(lambda e: e * per_epoch, lambda s: s / per_epoch))
      top.set_xlabel('step', fontsize=8)
      top.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  final = 'no evaluation yet'
  if evals:
    last = evals[-1]
    final = f'final {labels["val_top1"]} {100 * last["val_top1"]:.1f}% (step {last["step"]})'
  fig.suptitle(f'{describe_config(config)}  |  {workdir}  |  {final}', fontsize=11)
  fig.tight_layout()
  return fig


def _save(fig, path) -> epath.Path:
  """Writes the figure as a PNG (local or gs://) and closes it."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  _pyplot().close(fig)
  path = epath.Path(path)
  path.write_bytes(buffer.getvalue())
  return path


def plot_curves(workdir, rows: Iterable[dict] | None = None, config: Mapping | None = None
                ) -> epath.Path | None:
  """WORKDIR/curves.png (``curves_figure``) from the rows of metrics.jsonl and WORKDIR/config.json (or those
  given); None where there is nothing to plot or no matplotlib."""
  rows = list(rows if rows is not None else rundir.read_rows(workdir))
  if not _numbers(rows, 'loss') and not _numbers(rows, 'val_top1'):
    return None
  config = config if config is not None else rundir.read_config(workdir)
  fig = curves_figure(rows, config, workdir)
  path = epath.Path(workdir) / 'curves.png'
  if fig is None:  # optional: a run never fails at its end for a plot
    log.warning('matplotlib is not installed: no %s (pip install matplotlib)', path)
    return None
  return _save(fig, path)


def spread_over_classes(labels: Iterable[int], n: int) -> list[int]:
  """Up to n indices taking each class in turn (the first image of each class, then the second, ...), in
  the order of the classes' labels: a figure's tiles show every class before repeating one."""
  by_class: dict[int, list[int]] = {}
  for i, label in enumerate(labels):
    by_class.setdefault(int(label), []).append(i)
  queues = [by_class[c] for c in sorted(by_class)]
  out: list[int] = []
  depth = 0
  while len(out) < n and any(depth < len(q) for q in queues):
    out += [q[depth] for q in queues if depth < len(q)][:n - len(out)]
    depth += 1
  return out


PROTOCOL_STYLE = {'crop': dict(color='orange', ls='--'), 'dense': dict(color='red', ls='-')}


def localization_figure(result: dict, columns: int = 4):
  """A grid of test images (at Q): the true box in green, each protocol's top-1 guess (crop: orange dashed,
  dense: red), and per tile the true class, then per protocol a tick or a cross (right: the class and
  IoU > threshold with a true box), the guessed class and the box's IoU. None without matplotlib."""
  plt = _pyplot()
  if plt is None:
    return None
  examples = result['examples']
  names = result.get('class_names') or [str(c) for c in range(1000)]
  rows = max(1, -(-len(examples) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.9 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for ax, ex in zip(axes.ravel(), examples):
    ax.imshow(ex['image'])
    sx, sy = ex['scale']
    at_q = lambda b: np.asarray(b) * np.array([sx, sy, sx, sy])  # noqa: E731
    for b in ex['gt']:
      x0, y0, x1, y1 = at_q(b)
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color='lime', lw=3))
    lines = [(f'true: {names[ex["label"]]}', 'black')]
    for protocol, guess in ex['boxes'].items():
      c, b = guess['class'], guess['box']
      x0, y0, x1, y1 = at_q(b)
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=2.5, **PROTOCOL_STYLE[protocol]))
      mark, colour = ('\u2713', 'green') if guess['hit'] else ('\u2717', 'firebrick')
      lines.append((f'{mark} {protocol}: {names[c]}, IoU {guess["iou"]:.2f}', colour))
    for i, (text, colour) in enumerate(reversed(lines)):  # above the image, a line every 14 points
      ax.annotate(text, (0.0, 1.0), xycoords='axes fraction', xytext=(0, 3 + 14 * i),
                  textcoords='offset points', fontsize=10, color=colour, va='bottom',
                  fontweight='bold' if i == len(lines) - 1 else 'normal')
  n, hits = len(examples), {p: sum(ex['boxes'][p]['hit'] for ex in examples) for p in result['protocols']}
  score = ', '.join(f'{p} {h}/{n} right' for p, h in hits.items())
  fig.suptitle(f'{result.get("head", "").upper()} localisation, Q={result.get("scale")}: {score} '
               f'(\u2713: true class and IoU > {result.get("iou_threshold", 0.5)})\n'
               f'green: true box; orange dashed: central crop; red: dense + merging', fontsize=12)
  fig.tight_layout(rect=(0, 0, 1, 0.98))
  return fig


def save_localization_figure(result: dict, path, columns: int = 4) -> str | None:
  fig = localization_figure(result, columns)
  if fig is None:
    log.warning('matplotlib is not installed: no %s (pip install matplotlib)', path)
    return None
  _save(fig, os.fspath(path))
  return os.fspath(path)
