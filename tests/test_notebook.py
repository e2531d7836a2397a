"""The Colab notebook, executed end to end on the CPU (fewer epochs, no downloads)."""

import os

import pytest

from conftest import REPO

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')


@pytest.mark.slow
def test_colab_notebook_runs_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv('VGGJAX_NOTEBOOK_FAST', '1')
  monkeypatch.setenv('VGGJAX_NOTEBOOK_OFFLINE', '1')
  monkeypatch.setenv('VGGJAX_NOTEBOOK_RUNS', str(tmp_path / 'runs'))
  monkeypatch.setenv('PYTHONPATH', str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  nb = nbformat.read(REPO / 'notebooks' / 'vggjax_colab.ipynb', as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []))
  assert 'val top-1' in outputs
  assert (tmp_path / 'runs' / 'demo' / 'eval.json').exists()
  assert (tmp_path / 'runs' / 'vgg16_tv' / 'vggjax.json').exists()
  assert '"names"' in outputs or 'names' in outputs
