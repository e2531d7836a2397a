"""What a person sees of a run (docs/design.md, decision 8): a progress bar on the console, WORKDIR/metrics.jsonl,
TensorBoard event files and a PNG of the curves. Only process 0 writes; the others get disabled writers."""

from __future__ import annotations

import json
import logging as _logging
import math
import sys
import time
from typing import Any, Iterable

from etils import epath
from tqdm import tqdm

from vggjax import plots, rundir

log = _logging.getLogger('vggjax')


def run_path(workdir, *parts: str) -> epath.Path:
  """A path in a run directory: local, or on a remote filesystem such as gs:// (etils.epath)."""
  return epath.Path(workdir).joinpath(*parts)


def is_local(path: epath.Path) -> bool:
  return not rundir.is_remote(path)


def write_text(path, text: str) -> epath.Path:
  """Writes a whole file of a run, atomically (rundir.write_text)."""
  return epath.Path(rundir.write_text(path, text))


def _clean(v: Any) -> Any:
  if hasattr(v, 'item'):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf
  return v


def tensorboardx_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch (about 3 s) only to
  accept torch tensors, which vggjax never passes; where torch is installed beside vggjax that import would
  be paid by every training run. A torch already imported is left as it is."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None  # `import torch` raises ImportError while tensorboardX loads
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get('torch', 0) is None:
      del sys.modules['torch']
  return SummaryWriter


# TensorBoard's tags for metrics.jsonl's keys (the file keeps its keys): grouped into sections, train/, val/,
# perf/, data/, so the curves of a kind sit together; a key not listed keeps its name, and val_<x> becomes
# val/<x> (ema_val_<x>: val_ema/<x>). None: not charted (constant or the step's other name).
TENSORBOARD_TAGS = {'loss': 'train/loss', 'train_top1': 'train/top1', 'grad_norm': 'train/grad_norm',
                    'lr': 'train/lr', 'skipped_steps': 'train/skipped_steps', 'img_per_s': 'perf/img_per_s',
                    'skipped_images': 'data/skipped_images', 'val_skipped_images': 'data/val_skipped_images',
                    'epoch': None, 'val_count': None}


def tensorboard_tag(key: str) -> str | None:
  """The TensorBoard tag of a metrics.jsonl key (TENSORBOARD_TAGS)."""
  if key in TENSORBOARD_TAGS:
    return TENSORBOARD_TAGS[key]
  for prefix, section in (('ema_val_', 'val_ema/'), ('val_', 'val/')):
    if key.startswith(prefix):
      return section + key[len(prefix):]
  return key


def describe_run_to_tensorboard(tb, config: dict) -> None:
  """The run's config in TensorBoard: the whole of config.json as text ('config'), its scalar fields as
  hparams (in the run's own event file, with val/top1 and val/loss as the metrics), and a custom-scalars
  layout that draws train and val curves of a quantity in one chart (labelled from model.head)."""
  from tensorboardX.summary import hparams
  tb.add_text('config', '    ' + json.dumps(config, indent=2, sort_keys=True).replace('\n', '\n    '), 0)
  flat, stack = {}, [('', config)]
  while stack:
    prefix, d = stack.pop()
    for k, v in d.items():
      if isinstance(v, dict):
        stack.append((f'{prefix}{k}.', v))
      elif isinstance(v, (str, int, float, bool)) and k not in ('labels', 'pca_eigval', 'pca_eigvec'):
        flat[prefix + k] = v
  for summary in hparams(flat, {'val/top1': 0.0, 'val/loss': 0.0})[:2]:  # experiment, session start
    tb.file_writer.add_summary(summary)
  box = (config.get('model') or {}).get('head', 'classify') != 'classify'
  charts = {'Euclidean box loss' if box else 'loss': ['Multiline', ['train/loss', 'val/loss']],
            'IoU > 0.5 rate, mean IoU' if box else 'top-1, top-5':
            ['Multiline', ['train/top1', 'val/top1', 'val_ema/top1'] + (['val/iou'] if box else ['val/top5'])],
            'learning rate': ['Multiline', ['train/lr']]}
  tb.add_custom_scalars({'train and val': charts})


class MetricWriter:
  """Appends one JSON object per row to WORKDIR/metrics.jsonl and writes scalars to TensorBoard.

  On a local filesystem rows are appended; on object stores (gs://), which cannot append, the file is
  rewritten whole at most every `remote_flush_secs` and at close."""

  def __init__(self, workdir, enabled: bool = True, tensorboard: bool = True, remote_flush_secs: float = 60,
               tracker=None):
    self.enabled = enabled
    self.tracker = tracker  # vggjax.tracking's (train.tracker) or None: fed every row, closed by close()
    self.path = run_path(workdir, 'metrics.jsonl')
    self._local = is_local(self.path)
    self._rows: list[str] = []
    self._flush_secs, self._flushed = remote_flush_secs, time.time()
    if enabled and not self._local and self.path.exists():
      self._rows = [line + '\n' for line in self.path.read_text().splitlines() if line.strip()]
    self._tb, self._workdir, self._described = None, workdir, False
    if enabled and tensorboard:
      try:
        SummaryWriter = tensorboardx_writer_class()
        self._tb = SummaryWriter(str(run_path(workdir, 'tensorboard')), flush_secs=30)
      except ImportError as e:  # optional; on gs:// tensorboardX needs google-cloud-storage (vggjax[gcs])
        log.warning('no TensorBoard events are written: %s', e)
      except Exception as e:  # e.g. a remote filesystem tensorboardX cannot write to
        log.warning('no TensorBoard events: %s', e)

  def truncate_after(self, step: int) -> None:
    """Drops rows beyond `step` (a resumed run repeats them)."""
    if not (self.enabled and self.path.exists()):
      return
    rows = [line + '\n' for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get('step', 0) <= step]
    self.path.write_text(''.join(rows))
    self._rows = rows if not self._local else []

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    row = {k: _clean(v) for k, v in row.items()}
    if self.tracker is not None:
      self.tracker.log(row)
    line = json.dumps(row) + '\n'
    if self._local:
      with open(self.path, 'a') as f:
        f.write(line)
    else:
      self._rows.append(line)
      if time.time() - self._flushed > self._flush_secs:
        self.flush()
    if self._tb is not None:
      if not self._described:  # once, at the first row (the trainer writes config.json before any)
        self._described = True
        config = rundir.read_config(self._workdir)
        if config is not None:
          describe_run_to_tensorboard(self._tb, config)
      step = row.get('step', 0)
      for k, v in row.items():
        tag = tensorboard_tag(k)
        if k != 'step' and tag and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(tag, v, step)

  def flush(self) -> None:
    if self.enabled and not self._local:
      self.path.write_text(''.join(self._rows))
      self._flushed = time.time()

  def close(self) -> None:
    self.flush()
    if self.tracker is not None:
      self.tracker.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir) -> list[dict]:
  """The rows of WORKDIR/metrics.jsonl (rundir.read_rows)."""
  return rundir.read_rows(workdir)


def _notebook_kernel() -> bool:
  """Running in a Jupyter or Colab kernel (where an output can be redrawn in place: IPython displays)."""
  ipython = sys.modules.get('IPython')
  shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, 'get_ipython') else None
  return getattr(shell, 'kernel', None) is not None


class _DisplayLine:
  """A file for tqdm in a notebook: one IPython display updated in place with the bar's latest line (log
  lines printed meanwhile do not break it up; needs no widget library)."""

  def __init__(self):
    from IPython.display import Pretty, display
    self._pretty, self._display = Pretty, display(Pretty(''), display_id=True)

  def write(self, text: str) -> None:
    line = text.replace('\r', '').strip()
    if line:
      self._display.update(self._pretty(line))

  def flush(self) -> None:
    pass


class _Lines:
  """A file for tqdm in a log (not a terminal): each redraw becomes one line instead of a carriage return."""

  def __init__(self, stream):
    self.stream = stream

  def write(self, text: str) -> None:
    line = text.replace('\r', '').rstrip()
    if line:
      self.stream.write(line + '\n')

  def flush(self) -> None:
    self.stream.flush()


BAR_FORMAT = '{desc}[{bar:24}] {n_fmt}/{total_fmt}{postfix} | {rate_fmt} | ETA {remaining}'


def progress_bar(total: int, desc: str = '', *, unit: str = 'it', initial: int = 0, enabled: bool = True,
                 stream=None):
  """The progress bar of every long job (training, evaluate, predict, features, transfer): a tqdm bar,
  redrawn in place on a terminal (stderr), one display updated in place in a notebook, and a line per
  redraw (at most every few seconds) in a log file. Disabled: a bar that draws nothing."""
  kw = dict(total=total, initial=initial, unit=unit, bar_format=BAR_FORMAT, ascii='.#', dynamic_ncols=True,
            desc=f'{desc} ' if desc else '')
  if not enabled:
    return tqdm(disable=True, **kw)
  if stream is None and _notebook_kernel():
    return tqdm(file=_DisplayLine(), **kw)
  stream = stream or sys.stderr
  if hasattr(stream, 'isatty') and stream.isatty():
    return tqdm(file=stream, **kw)
  return tqdm(file=_Lines(stream), mininterval=5.0, **kw)


class ProgressBar:
  """A progress bar set to an absolute position with named fields (training: the step, loss, lr; evaluate:
  the batch, scale, images/s), drawn by ``progress_bar``'s tqdm bar."""

  def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None, desc: str = '',
               unit: str = 'step'):
    self.enabled = enabled
    self._bar = progress_bar(total, desc, unit=unit, initial=start, enabled=enabled, stream=stream)

  def update(self, step: int, **fields) -> None:
    if not self.enabled:
      return
    parts = [f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in fields.items()]
    self._bar.set_postfix_str(' | '.join(parts), refresh=False)
    self._bar.update(step - self._bar.n)

  def close(self) -> None:
    self._bar.close()


def plot_curves(workdir, rows: Iterable[dict] | None = None) -> epath.Path | None:
  """WORKDIR/curves.png: the loss, top-1 (or a box net's IoU) and learning rate by epoch (plots.plot_curves)."""
  return plots.plot_curves(workdir, rows)
