"""The installable package, as a new user gets it: the wheel (what `pip install git+URL` or an index gives),
installed in a fresh virtual environment, run from a directory outside the checkout. Also the config lookup
(working directory first, then the installed configs, bare names) and the `vggjax` command."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import REPO

from vggjax import cli

# A few steps of the demo, narrow (the run is about the install, not the training).
TINY = ['--config.model.width=0.125', '--config.model.fc_features=32', '--config.train.max_steps=4',
        '--config.train.log_every_steps=2', '--config.train.eval_every_steps=4',
        '--config.train.global_batch_size=32', '--config.optimizer.schedule=constant']


def test_config_lookup(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: the installed ones are found
  vgg16 = str(cli.config_file('vgg16'))
  assert cli.resolve_config('configs/vgg16.py:jitter') == vgg16 + ':jitter'
  assert cli.resolve_config('vgg16:jitter') == vgg16 + ':jitter'
  assert cli.resolve_config('vgg16.py') == vgg16
  own = tmp_path / 'configs' / 'vgg16.py'  # a file in the working directory comes first
  own.parent.mkdir()
  own.write_text('')
  assert cli.resolve_config('configs/vgg16.py:384') == 'configs/vgg16.py:384'
  with pytest.raises(cli.ConfigNotFound, match=r'nope.*installed config \(.*demo, .*vgg16, '):
    cli.resolve_config('configs/nope.py')
  argv = ['prog', '--config', 'vgg11', '--config.optimizer.lr=0.1', '--config=vgg19:256']
  cli.resolve_config_args(argv)
  assert argv == ['prog', '--config', str(cli.config_file('vgg11')), '--config.optimizer.lr=0.1',
                  '--config=' + str(cli.config_file('vgg19')) + ':256']


def test_installed_configs_load_by_name(tmp_path, monkeypatch):
  from ml_collections import config_flags
  monkeypatch.chdir(tmp_path)
  path, _, arg = cli.resolve_config('vgg16:jitter').partition(':')
  config = config_flags.config_flags._LoadConfigModule('vgg16', path).get_config(arg)  # noqa: SLF001
  assert (config.model.name, config.data.scale_min, config.data.scale_max) == ('vgg16', 256, 512)


def _build_wheel(out) -> str:
  """The wheel of a copy of the source tree (a build leaves nothing in the checkout)."""
  src = out / 'src'
  ignore = shutil.ignore_patterns('__pycache__', '*.egg-info')
  for name in ('vggjax', 'configs'):
    shutil.copytree(REPO / name, src / name, symlinks=True, ignore=ignore)
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy2(REPO / name, src / name)
  # Without build isolation where a recent enough setuptools is at hand (no download); else pip fetches the
  # build backend pyproject.toml asks for (a fresh venv's bundled setuptools is too old).
  isolation = ['--no-build-isolation'] if _setuptools_version() >= (77,) else []
  p = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', *isolation, '-w', str(out),
                      str(src)], capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  (wheel,) = out.glob('vggjax-*.whl')
  return str(wheel)


def _setuptools_version() -> tuple[int, ...]:
  try:
    from importlib.metadata import version
    return tuple(int(x) for x in version('setuptools').split('.')[:2])
  except Exception:  # not installed, or an unusual version string
    return (0,)


def _fresh_venv(root, wheel: str) -> dict:
  """A new virtual environment with the wheel installed (pip install --no-deps). To stay quick, it sees the
  test environment's installed dependencies through a .pth file (a path only: the test environment's own
  editable vggjax, installed through a .pth import hook there, stays invisible)."""
  venv = root / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
  py = venv / 'bin' / 'python'
  purelib = subprocess.run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                           check=True, capture_output=True, text=True).stdout.strip()
  deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()['purelib']] if os.path.isdir(p)]
  with open(os.path.join(purelib, 'test-deps.pth'), 'w') as f:
    f.write('\n'.join(dict.fromkeys(deps)) + '\n')
  subprocess.run([sys.executable, '-m', 'pip', '--python', str(py), 'install', '-q', '--no-deps', wheel],
                 check=True, capture_output=True, text=True, timeout=300)
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env.update(PATH=f'{venv / "bin"}{os.pathsep}{env.get("PATH", "")}', JAX_PLATFORMS='cpu',
             VGGJAX_NUM_CPU_DEVICES='2')
  return env


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_outside_the_checkout(tmp_path):
  wheel = _build_wheel(tmp_path / 'wheel')
  names = zipfile.ZipFile(wheel).namelist()
  assert 'vggjax/configs/demo.py' in names and 'vggjax/configs/vgg16.py' in names
  assert not [n for n in names if n.split('/')[0] not in ('vggjax',) and '.dist-info/' not in n], names
  entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith('entry_points.txt')))
  assert b'vggjax = vggjax.cli:main' in entry_points

  env = _fresh_venv(tmp_path, wheel)
  work = tmp_path / 'elsewhere'
  work.mkdir()

  def run(*args, timeout=600):
    p = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f'{args} exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}'
    return p.stdout + p.stderr

  where = run('python', '-c', 'import vggjax, vggjax.configs.demo as d; print(vggjax.__file__, d.__file__)')
  assert str(REPO) not in where and str(tmp_path / 'venv') in where, where
  no_configs = 'import importlib.util; print(importlib.util.find_spec("configs"))'
  assert run('python', '-c', no_configs).strip() == 'None'  # nothing installed as a top-level `configs`
  # The README quickstart: the demo (here a few steps of it), with the console command.
  out = run('vggjax', 'train', '--workdir=runs/demo', *TINY)
  assert 'done at step 4' in out, out
  for name in ('config.json', 'metrics.jsonl', 'checkpoints', 'curves.png'):
    assert (work / 'runs' / 'demo' / name).exists(), name
  # The paper's configs by path (not in this directory: the installed one) and by name.
  load = ('import sys; from absl import flags; from ml_collections import config_flags; '
          'from vggjax import cli; c = config_flags.DEFINE_config_file("config"); '
          'cli.resolve_config_args(sys.argv); flags.FLAGS(sys.argv); '
          'print(c.value.model.name, c.value.data.scale_min, c.value.data.scale_max)')
  assert run('python', '-c', load, '--config=configs/vgg16.py:jitter').split() == ['vgg16', '256', '512']
  assert run('python', '-c', load, '--config=vgg19:384').split() == ['vgg19', '384', '384']
  out = run('vggjax', 'evaluate', '--workdir=runs/demo', '--config=demo', '--protocols=single,dense',
            '--config.data.eval_split=validation[:64]')
  result = json.loads((work / 'runs' / 'demo' / 'eval.json').read_text())
  assert result['num_images'] == 64, result
  from PIL import Image
  from sklearn.datasets import load_digits
  Image.fromarray((load_digits().images[0] * 255 / 16).astype('uint8')).resize((32, 32)).save(work / 'd.png')
  out = run('vggjax', 'predict', '--checkpoint=runs/demo', '--json', 'd.png')
  (prediction,) = json.loads(out[out.index('['):out.rindex(']') + 1])
  assert len(prediction['names']) == 5, prediction
