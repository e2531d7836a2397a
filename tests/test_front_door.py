"""What a user meets first, through the `vggjax` entry point (cli.main, as `python -m vggjax` runs it):
`vggjax COMMAND --help` for every command, `--version`, `train --dry_run`, and the errors a user causes by
what they type or point at: one line on stderr naming the bad value, a distinct exit status, a traceback
only with --verbosity=1; predict and features name and skip unreadable images and go on with the rest."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

import vggjax
from conftest import subprocess_env
from vggjax import cli, models

# A flag of each command's own, which its --help must list.
OWN_FLAG = {'train': '--workdir', 'evaluate': '--protocols', 'predict': '--checkpoint', 'features': '--out',
            'convert': '--from', 'export': '--format', 'prepare': '--config', 'benchmark': '--batch',
            'plan': '--topology', 'transfer': '--classifier', 'localize': '--localizer'}


def vggjax_cmd(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'vggjax', *map(str, args)], cwd=cwd, capture_output=True,
                        text=True, timeout=timeout, env=env or subprocess_env(num_devices=1))


def test_every_command_is_in_the_table():
  assert set(OWN_FLAG) == set(cli.COMMANDS)


@pytest.mark.parametrize('command', list(cli.COMMANDS))
def test_command_help_lists_its_flags_and_exits_0(command, tmp_path):
  p = vggjax_cmd(command, '--help' if command != 'predict' else '-h', cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  out = p.stdout
  assert out.startswith(f'usage: vggjax {command} [flags]'), out[:300]
  assert '\nflags:\n' in out and OWN_FLAG[command] in out, out
  assert '--logtostderr' not in out and '--verbosity:' not in out  # absl's logging flags: --helpfull only
  assert 'python -m vggjax' not in out  # the examples as the user types them
  for path in (os.path.dirname(os.path.dirname(vggjax.__file__)), str(tmp_path), os.path.expanduser('~')):
    assert path not in out, (path, out)  # no path of this installation or machine
  assert 'Why one module' not in out  # notes for maintainers stay in the source
  description = out.split('\n\n')[1]
  assert len(description) > 20  # the module's first sentence: what the command does


def test_version(tmp_path):
  p = vggjax_cmd('--version', cwd=tmp_path)
  assert p.returncode == 0 and p.stdout == f'vggjax {vggjax.__version__}\n'
  from importlib import metadata
  assert metadata.version('vggjax') == vggjax.__version__


def test_dry_run_prints_every_field_and_the_dataset_and_writes_nothing(tmp_path):
  """`--config=demo` in a working directory holding a run directory named `demo`: the config file, not the
  folder; --dry_run prints the resolved config (JSON, every field) and the split sizes."""
  (tmp_path / 'demo' / 'checkpoints').mkdir(parents=True)
  p = vggjax_cmd('train', '--config=demo', '--workdir=runs/x', '--dry_run', '--config.train.num_epochs=2',
                 cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-3000:]
  config_text, _, last = p.stdout.rpartition('}\n')
  config = json.loads(config_text + '}')
  assert config['data']['source'] == 'digits' and config['train']['num_epochs'] == 2
  assert {'model', 'data', 'optimizer', 'train'} <= set(config)
  assert '1497 training images' in last and '300 validation images' in last and '10 classes' in last
  assert 'Traceback' not in p.stderr
  assert not (tmp_path / 'runs').exists()


def one_line(p: subprocess.CompletedProcess, command: str, status: int, *named: str) -> str:
  lines = p.stderr.strip().splitlines()
  assert p.returncode == status, (p.returncode, p.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith(f'vggjax {command}: error: '), p.stderr[-3000:]
  for text in named:
    assert text in lines[0], lines[0]
  return lines[0]


@pytest.mark.parametrize('args,status,named', [
    (['--config.data.source=folder'], cli.EXIT_NO_INPUT, ['data.data_dir=ROOT', 'ROOT/train/<class>']),
    (['--config.data.source=folder', '--config.data.data_dir=nowhere'], cli.EXIT_NO_INPUT, ["'nowhere'"]),
    (['--config.data.source=folder', '--config.data.data_dir=empty'], cli.EXIT_NO_INPUT, ['empty']),
    (['--config=vgg16:999'], cli.EXIT_BAD_INPUT, ["'999' is not one of 256, 384, jitter"]),
])
def test_train_data_and_config_errors_are_one_line(tmp_path, args, status, named):
  (tmp_path / 'empty').mkdir()
  line = one_line(vggjax_cmd('train', '--workdir=run', '--dry_run', *args, cwd=tmp_path), 'train', status,
                  *named)
  assert 'Traceback' not in line and len(line) < 300


def test_a_workdir_with_no_run_says_so_not_that_config_is_missing(tmp_path):
  (tmp_path / 'empty').mkdir()
  line = one_line(vggjax_cmd('evaluate', '--workdir=empty', cwd=tmp_path), 'evaluate', cli.EXIT_NO_INPUT,
                  '--workdir=empty holds no training run')
  assert 'no --config given' not in line
  one_line(vggjax_cmd('evaluate', '--workdir=empty', '--config=demo', cwd=tmp_path), 'evaluate',
           cli.EXIT_NO_INPUT, 'neither a weights directory')
  # --verbosity=1: the same error with its traceback.
  p = vggjax_cmd('evaluate', '--workdir=empty', '--verbosity=1', cwd=tmp_path)
  assert p.returncode != 0 and 'Traceback' in p.stderr and 'holds no training run' in p.stderr


def random_variables(model, seed=0):
  """Random weights drawn with numpy (model.init would compile every initialiser: seconds on CPU)."""
  import jax
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(lambda s: (rng.randn(*s.shape) * 0.1).astype(np.float32),
                                models.variable_shapes(model))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """A training workdir of a tiny net (VGG-A at 1/16 width, 32x32 inputs) with random weights, a readable
  image, a text file named .jpg and a folder holding both."""
  from configs import default
  root = tmp_path_factory.mktemp('front_door')
  model = models.get_model('vgg11', width=1 / 16, fc_features=32, num_classes=10, image_size=32)
  config = default.get_config().to_dict()
  config['model'].update(name='vgg11', num_classes=10, width=1 / 16, fc_features=32)
  config['data'].update(image_size=32, scale_min=32, scale_max=32)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(root / 'run' / 'checkpoints' / '3' / 'state', {'step': 3, **random_variables(model)})
  ckptr.wait_until_finished()
  (root / 'run' / 'config.json').write_text(json.dumps(config))
  (root / 'images').mkdir()
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 48, 3), np.uint8)).save(
      root / 'images' / 'good.png')
  (root / 'images' / 'broken.jpg').write_text('not an image\n')
  return root


def test_predict_names_and_skips_an_unreadable_image_and_classifies_the_rest(tiny_run):
  # JAX_PLATFORMS unset, as a user runs it: with libtpu installed (the tpu extra) and no TPU, the command runs
  # on the CPU without libtpu's initialisation errors.
  env = {k: v for k, v in subprocess_env(num_devices=1).items() if k != 'JAX_PLATFORMS'}
  p = vggjax_cmd('predict', '--checkpoint=run', 'images', cwd=tiny_run, env=env)
  if not any(cli_gpu_plugin()):
    assert 'TPU_ACCELERATOR_TYPE' not in p.stderr and 'TPU_WORKER_HOSTNAMES' not in p.stderr, p.stderr
  assert p.returncode == cli.EXIT_UNREADABLE, p.stderr[-3000:]
  assert 'images/good.png' in p.stdout and ' 1. ' in p.stdout  # its top-5
  assert 'images/broken.jpg' not in p.stdout
  assert 'skipped images/broken.jpg: not a readable image' in p.stderr
  assert '1 unreadable image(s) skipped' in p.stderr.strip().splitlines()[-1]
  assert 'Traceback' not in p.stderr
  # Only unreadable images: one line naming the file.
  one_line(vggjax_cmd('predict', '--checkpoint=run', 'images/broken.jpg', cwd=tiny_run), 'predict',
           cli.EXIT_UNREADABLE, 'images/broken.jpg', 'no readable image')


def cli_gpu_plugin():
  import importlib.util
  for m in cli.GPU_PLUGINS:
    for name in (m, f'jax_plugins.{m}'):
      try:
        yield importlib.util.find_spec(name) is not None
      except ImportError:  # no jax_plugins package
        yield False


def test_predict_missing_image_or_checkpoint_is_one_line(tiny_run):
  one_line(vggjax_cmd('predict', '--checkpoint=run', 'missing.png', cwd=tiny_run), 'predict',
           cli.EXIT_NO_INPUT, 'missing.png')
  one_line(vggjax_cmd('predict', '--checkpoint=images', 'images/good.png', cwd=tiny_run), 'predict',
           cli.EXIT_NO_INPUT, 'images', 'neither a weights directory')


def test_features_skip_an_unreadable_image_and_write_the_rest(tiny_run):
  p = vggjax_cmd('features', '--checkpoint=run', '--out=feats.npz', '--scales=32,40', 'images', cwd=tiny_run)
  assert p.returncode == cli.EXIT_UNREADABLE, p.stderr[-3000:]
  assert 'skipped images/broken.jpg: not a readable image' in p.stderr
  saved = np.load(tiny_run / 'feats.npz')
  assert list(saved['files']) == ['images/good.png'] and saved['features'].shape == (1, 32)
