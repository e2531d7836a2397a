"""The Colab notebook, executed end to end on the CPU (fewer epochs, no downloads), installing from this
checkout: after the install cell everything runs in the kernel through the library's functions."""

import json
import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
NOTEBOOK = REPO / 'notebooks' / 'vggjax_colab.ipynb'


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == 'code']


def test_notebook_runs_everything_in_the_kernel():
  """One process owns the accelerator: no command lines in subprocesses after the install cell, and the
  repository URL is set in one place at the top."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  install, *rest = _code_cells(nb)
  # A form field, empty until the user pastes the URL (no placeholder repository to edit); pip's output shown.
  assert install.source.startswith("REPO_URL = ''  #@param")
  assert "run_line_magic('pip'" in install.source and "'-q'" not in install.source
  assert 'REPO_URL is empty' in install.source
  drive = next(c for c in rest if 'drive.mount(' in c.source)  # optional: runs kept on Google Drive
  assert drive.source.startswith('USE_DRIVE = False') and 'VGGJAX_NOTEBOOK_RUNS' in drive.source
  for cell in rest:
    assert 'subprocess' not in cell.source and 'capture_output' not in cell.source, cell.source
  used = '\n'.join(c.source for c in rest)
  for call in ('train.train_and_evaluate(', 'ev.evaluate(', 'predict.predict(', 'convert.convert('):
    assert call in used


@pytest.mark.slow
def test_colab_notebook_runs_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv('VGGJAX_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('VGGJAX_NOTEBOOK_OFFLINE', '1')
  monkeypatch.setenv('VGGJAX_NOTEBOOK_RUNS', str(tmp_path / 'runs'))
  monkeypatch.setenv('VGGJAX_SOURCE', str(REPO))  # install from this checkout (already installed in CI)
  monkeypatch.setenv('PYTHONPATH', str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  cells = _code_cells(nb)
  texts = ['\n'.join(o.get('text', '') for o in c.get('outputs', [])) for c in cells]
  outputs = '\n'.join(texts)
  assert 'runtime: cpu; install: pip install' in texts[0]
  train_cell = next(c for c in cells if 'train_and_evaluate(' in c.source)
  train_out = texts[cells.index(train_cell)]
  # One bar, a display updated in place (not a line per update), at its end; the log lines that matter are
  # there, the checkpointing library's per-file lines are not.
  bars = [o for o in train_cell.outputs if o.output_type == 'display_data']
  assert len(bars) == 1, train_cell.outputs
  bar = bars[0].data['text/plain']
  assert bar.startswith('[########################]') and 'ETA' in bar, bar
  assert 'val top-1' in train_out and 'steps/epoch' in train_out, train_out
  assert 'orbax' not in train_out.lower(), train_out
  assert (tmp_path / 'runs' / 'demo' / 'eval.json').exists()
  evaluation = json.loads((tmp_path / 'runs' / 'demo' / 'eval.json').read_text())
  assert evaluation['num_images'] == 300
  assert 'dense+multicrop' in outputs
  assert (tmp_path / 'runs' / 'vgg16_tv' / 'vggjax.json').exists()
  assert '"names"' in outputs
