"""What a person sees of a run (docs/design.md, decision 8): a progress bar on the console, WORKDIR/metrics.jsonl,
TensorBoard event files and a PNG of the curves. Only process 0 writes; the others get disabled writers."""

from __future__ import annotations

import io
import json
import logging as _logging
import math
import sys
import time
from typing import Any, Iterable

from etils import epath
from tqdm import tqdm

from vggjax import rundir

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
    self._tb = None
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
      step = row.get('step', 0)
      for k, v in row.items():
        if k != 'step' and isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(k, v, step)

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
  """WORKDIR/curves.png: training loss and validation top-1/top-5 against the step."""
  rows = list(rows if rows is not None else read_metrics(workdir))
  train = [r for r in rows if 'loss' in r and isinstance(r['loss'], (int, float))]
  evals = [r for r in rows if 'val_top1' in r]
  if not train and not evals:
    return None
  try:
    import matplotlib
  except ImportError:  # optional: a run never fails at its end for a plot
    log.warning('matplotlib is not installed: no %s (pip install matplotlib)',
                run_path(workdir, 'curves.png'))
    return None
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
  ax1.plot([r['step'] for r in train], [r['loss'] for r in train], label='train loss')
  if any('val_loss' in r for r in evals):
    ax1.plot([r['step'] for r in evals], [r.get('val_loss') for r in evals], 'o-', label='val loss')
  ax1.set_xlabel('step')
  ax1.set_ylabel('cross-entropy')
  ax1.set_yscale('log')
  ax1.legend()
  ax2.plot([r['step'] for r in evals], [r['val_top1'] for r in evals], 'o-', label='val top-1')
  ax2.plot([r['step'] for r in evals], [r['val_top5'] for r in evals], 's-', label='val top-5')
  if any('train_top1' in r for r in train):
    ax2.plot([r['step'] for r in train], [r.get('train_top1') for r in train], alpha=0.5,
             label='train top-1')
  ax2.set_xlabel('step')
  ax2.set_ylabel('accuracy')
  ax2.set_ylim(0, 1)
  ax2.legend()
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=100)
  plt.close(fig)
  path = run_path(workdir, 'curves.png')
  path.write_bytes(buffer.getvalue())
  return path
