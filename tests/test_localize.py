"""The localisation nets (SCR/PCR heads, the dense box map), the box loss in the train step, config checks,
and the test bed end to end: build it, train, evaluate with both protocols."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from vggjax import boxes, config_lib, localization_model, train

SMALL = dict(width=0.125, fc_features=32, image_size=32, init='glorot')


@pytest.mark.slow
@pytest.mark.parametrize('head,outputs', [('scr', 4), ('pcr', 40), ('classify', 10)])
def test_head_shapes(head, outputs):
  model = localization_model.get_box_model('vgg11', head, 10, **SMALL)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))  # shapes only
  assert jax.eval_shape(model.apply, variables, jnp.zeros((2, 32, 32, 3))).shape == (2, outputs)
  assert variables['params']['fc8']['kernel'].shape[-1] == outputs
  # fc7 and everything below are the classifier's layers, same shapes: a warm start copies them.
  classifier = jax.eval_shape(localization_model.get_box_model('vgg11', 'classify', 10, **SMALL).init,
                              jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  for layer in ('conv1_1', 'conv5_2', 'fc6', 'fc7'):
    assert variables['params'][layer]['kernel'].shape == classifier['params'][layer]['kernel'].shape
  if head != 'classify':
    per = localization_model.per_class(jnp.zeros((2, outputs)), head)
    assert per.shape == (2, 1 if head == 'scr' else 10, 4)


def test_class_box_picks_the_label_box():
  out = jnp.arange(2 * 12, dtype=jnp.float32).reshape(2, 12)  # pcr, 3 classes
  got = localization_model.class_box(out, jnp.array([2, 0]), 'pcr')
  np.testing.assert_array_equal(got, [[8, 9, 10, 11], [12, 13, 14, 15]])
  scr = localization_model.class_box(out[:, :4], jnp.array([2, 0]), 'scr')
  np.testing.assert_array_equal(scr, out[:, :4])


@pytest.mark.slow
def test_dense_box_map_at_training_size_is_the_crop_prediction():
  model = localization_model.get_box_model('vgg11', 'pcr', 3, **SMALL)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  crop = model.apply(variables, x)
  box_map = model.apply(variables, x, method='score_map')
  assert box_map.shape == (2, 1, 1, 12)
  np.testing.assert_allclose(box_map[:, 0, 0], crop, rtol=1e-5, atol=1e-6)
  cells = localization_model.cell_boxes(np.asarray(box_map[0]), 32, 'pcr')
  np.testing.assert_allclose(cells[0, 0], boxes.from_target(np.asarray(crop[0]).reshape(3, 4), 32), atol=1e-5)
  # On a larger picture the map has one cell per 32-pixel step; a cell's box lives in its window.
  big = model.apply(variables, jax.random.normal(jax.random.key(3), (1, 64, 96, 3)), method='score_map')
  assert big.shape == (1, 2, 3, 12)


def test_cell_boxes_offsets_hand_computed():
  # Every cell predicts the window's centre box of half its size: (0.5, 0.5, 0.5, 0.5) of a 64 window.
  box_map = np.full((2, 3, 4), 0.5)
  cells = localization_model.cell_boxes(box_map, 64, 'scr')
  assert cells.shape == (2, 3, 1, 4)
  np.testing.assert_allclose(cells[0, 0, 0], [16, 16, 48, 48])
  np.testing.assert_allclose(cells[1, 2, 0], [16 + 64, 16 + 32, 48 + 64, 48 + 32])  # row 1, column 2


def test_box_loss_and_hits_hand_computed():
  out = jnp.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.2, 0.2]])  # scr
  batch = {'label': jnp.array([0, 3]), 'box': jnp.array([[0.5, 0.5, 0.5, 0.25], [0.1, 0.1, 0.2, 0.2]]),
           'box_valid': jnp.array([True, False])}
  t = train.step_targets(batch, 'scr')
  assert t.shape == (2, 6)
  # Example 0: half the squared distance, 0.5 * 0.25^2; example 1 kept no box: masked.
  np.testing.assert_allclose(train.per_example_loss(out, t, 'scr'), [0.5 * 0.0625, 0.0], rtol=1e-6)
  # IoU of example 0: the target is half the prediction's height inside it: 0.5 > 0.5 is False.
  assert train.per_example_hits(out, t, 'scr').tolist() == [False, False]
  batch['box'] = batch['box'].at[0, 3].set(0.3)  # IoU 0.6
  assert train.per_example_hits(out, train.step_targets(batch, 'scr'), 'scr').tolist() == [True, False]


def _cfg(**model):
  from vggjax.configs import default
  c = default.get_config()
  for k, v in model.items():
    c.model[k] = v
  return c


def test_config_checks_the_head():
  with pytest.raises(config_lib.ConfigError, match='model.head'):
    config_lib.validate(_cfg(head='boxes'))
  with pytest.raises(config_lib.ConfigError, match='data.boxes_file'):
    config_lib.validate(_cfg(head='pcr'))


@pytest.mark.slow
def test_box_train_step_learns_a_fixed_batch():
  """The train step with a box head lowers the Euclidean loss on a repeated batch (and leaves masked
  examples out)."""
  from vggjax import optim, parallel
  model = localization_model.get_box_model('vgg11', 'pcr', 3, dropout_rate=0.0, **SMALL)
  ocfg = ml_collections.ConfigDict(dict(lr=0.01, momentum=0.9, nesterov=False, weight_decay=0.0,
                                        decay_biases=False))
  tx = optim.make_optimizer(ocfg)
  mesh = parallel.make_mesh()
  state = train.create_train_state(model, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, color_shift=0.0, head='pcr')
  rng = np.random.default_rng(0)
  batch = {'image': rng.integers(0, 4, (8, 32, 32, 3), dtype=np.uint8), 'label': np.arange(8) % 3,
           'box': rng.uniform(0.2, 0.8, (8, 4)).astype(np.float32), 'box_valid': np.arange(8) < 6}
  losses = []
  for _ in range(30):
    state, metrics = step(state, parallel.global_batch(batch, mesh), np.float32(0.01))
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.5 * losses[0], losses


def test_testbed_classes_are_fashion_mnist_labels(tmp_path):
  """The test bed's class c is Fashion-MNIST's label c (so the plain Fashion-MNIST classifier warm-starts the
  test bed's, fc8 included), every picture has a box inside it, and the pretrain config reads Fashion-MNIST
  at the test bed's crop size."""
  import pathlib
  testbed = pytest.importorskip('benchmarks.make_box_testbed')
  if not pathlib.Path(testbed.FASHION_DIR).is_dir():
    pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
  from vggjax.configs import default
  from vggjax.data import boxes_source, sources
  root = testbed.build(tmp_path / 'tb', num_train=24, num_val=4, progress=False)
  cfg = default.get_config().data
  cfg.source, cfg.data_dir, cfg.boxes_file = 'folder', str(root), 'boxes.json'
  src = boxes_source.open_source(cfg, 'train')
  # The folder's class c (its sorted directories) is the directory of Fashion-MNIST's label c.
  assert src.class_names == list(testbed.CLASS_DIRS)
  for c, name in enumerate(src.class_names):  # '0_tshirt_top' is T-shirt/top, label 0
    assert name.split('_', 1)[0] == str(c)
    assert name.split('_', 1)[1][:3] == sources.FASHION_MNIST_CLASSES[c].lower().replace('-', '')[:3]
  for i in range(len(src)):
    rel = src.path(i).relative_to(root).as_posix()
    assert src.record(i)[1] == int(rel.split('/')[1].split('_')[0])
    b = src.boxes(i)[0]
    assert 0 <= b[0] < b[2] and 0 <= b[1] < b[3]
  from vggjax.configs import boxes_testbed  # the pretrain net: plain Fashion-MNIST at the test bed's crops
  c = boxes_testbed.get_config('pretrain')
  config_lib.validate(c)
  assert (c.data.source, c.data.image_size, c.model.head) == ('fashion_mnist', 64, 'classify')
  with pytest.raises(ValueError, match='pretrain, classify, pcr, scr'):
    boxes_testbed.get_config('boxes')


@pytest.mark.slow
def test_testbed_learns_and_localize_cli(tmp_path):
  """The test bed end to end through the real commands: build it, train a classifier and a PCR net, evaluate
  both protocols. The PCR net localises (the true class given) better than the whole-image box."""
  fashion = pytest.importorskip('benchmarks.make_box_testbed').FASHION_DIR
  import pathlib
  if not pathlib.Path(fashion).is_dir():
    pytest.skip("Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
  env = subprocess_env(num_devices=1)
  root = tmp_path / 'testbed'
  subprocess.run([sys.executable, str(REPO / 'benchmarks' / 'make_box_testbed.py'), f'--out={root}',
                  '--train=768', '--val=128'], check=True, env=env, cwd=tmp_path, capture_output=True)
  common = ['--config.data.data_dir=' + str(root), '--config.model.width=0.125', '--config.train.plot=false']
  # A classifier only to guess classes (a few steps, its config's lr), and a PCR net trained from scratch at a
  # higher lr than the fine-tuning recipe's 1e-3: the paper's chain (a Fashion-MNIST net, the classifier from
  # it, the box nets from that: benchmarks/localization_experiment.py) took about 50 minutes on the shared CPU,
  # too much for CI; this checks that a box net learns, through the same commands.
  runs = {'classify': (8, 0.01), 'pcr': (240, 0.05)}
  for head, (steps, lr) in runs.items():
    subprocess.run([sys.executable, '-m', 'vggjax.main', f'--config={REPO}/configs/boxes_testbed.py:{head}',
                    f'--workdir={tmp_path / head}', f'--config.train.max_steps={steps}',
                    f'--config.optimizer.lr={lr}', f'--config.train.eval_every_steps={steps}', *common],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
  out = subprocess.run([sys.executable, '-m', 'vggjax.localize', f'--workdir={tmp_path / "eval"}',
                        f'--classifier={tmp_path / "classify"}', f'--localizer={tmp_path / "pcr"}'],
                       check=True, env=env, cwd=tmp_path, capture_output=True, text=True)
  assert 'localisation error' in out.stdout
  result = json.loads((tmp_path / 'eval' / 'eval.json').read_text())
  assert (tmp_path / 'eval' / 'localization.png').stat().st_size > 10_000
  assert result['num_images'] == 128 and result['head'] == 'pcr'
  for protocol in ('crop', 'dense'):
    r = result['protocols'][protocol]
    assert 0 <= r['top1_error'] <= 1 and r['top5_error'] <= r['top1_error']
    assert r['whole_image_gt_class_error'] > 0.9  # the trivial box almost never overlaps by IoU > 0.5
  # The PCR net (true class given, central crop) beats the whole-image box. Measured with these settings
  # (BENCHMARKS.md, Localisation): 10-12% of the boxes right (error 0.898, and 0.883 with the classes in
  # Fashion-MNIST's order) where the whole image gets none, mean IoU 0.214 and 0.208 against 0.149; the
  # bounds below keep about half of each margin.
  crop = result['protocols']['crop']
  assert crop['gt_class_error'] <= 0.95 < crop['whole_image_gt_class_error'], crop
  assert crop['mean_iou_gt_class'] > crop['whole_image_mean_iou'] + 0.03, crop
