"""The training step and its parts: data parallelism, the optimizer, schedules, faults, warm start."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import default
from vggjax import checkpoints, config_lib, models, optim, parallel, train

SMALL = dict(width=1 / 8, fc_features=32, num_classes=10, image_size=32, init='glorot')


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return {'image': rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
          'label': rng.randint(0, 10, n).astype(np.int32)}


def _run(name, devices, steps=3, **step_options):
  model = models.get_model(name, **SMALL)
  tx = optim.make_optimizer(default.get_config().optimizer)
  mesh = parallel.make_mesh(devices)
  state = train.create_train_state(model, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, **step_options)
  for i in range(steps):
    state, metrics = step(state, parallel.global_batch(_batch(seed=i), mesh), np.float32(0.05))
  return state, metrics


@pytest.mark.parametrize('name', ['vgg11', 'vgg11_bn'])
def test_eight_devices_equal_one_device_with_dropout(name):
  devices = parallel.devices_in_order()
  assert len(devices) == 8
  s8, m8 = _run(name, devices, color_shift=0.1)
  s1, m1 = _run(name, devices[:1], color_shift=0.1)
  assert s8.params['fc8']['kernel'].sharding.is_fully_replicated
  p8, p1 = jax.device_get((s8.params, s1.params))
  diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), p8, p1)
  assert max(jax.tree_util.tree_leaves(diff)) <= 1e-5
  if name.endswith('_bn'):  # batch statistics over the global batch (synchronous batch norm)
    b8, b1 = jax.device_get((s8.batch_stats, s1.batch_stats))
    np.testing.assert_allclose(b8['bn1_1']['mean'], b1['bn1_1']['mean'], atol=1e-5)
  assert float(m8['loss']) == pytest.approx(float(m1['loss']), abs=1e-5)
  assert int(s8.step) == 3


def test_bfloat16_step_keeps_float32_params_and_optimizer_state():
  model = models.get_model('vgg11', **SMALL, dtype='bfloat16')
  tx = optim.make_optimizer(default.get_config().optimizer)
  mesh = parallel.make_mesh()
  state = train.create_train_state(model, tx, mesh, seed=0)
  state, metrics = train.make_train_step(model, tx, mesh)(state, parallel.global_batch(_batch(), mesh),
                                                         np.float32(0.01))
  assert metrics['loss'].dtype == jnp.float32 and np.isfinite(float(metrics['loss']))
  for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype


def test_coupled_l2_on_weights_only():
  cfg = ml_collections.ConfigDict(dict(lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.01,
                                       decay_biases=False))
  params = {'conv1_1': {'kernel': jnp.full((2,), 3.0), 'bias': jnp.full((2,), 3.0)},
            'bn1_1': {'scale': jnp.full((2,), 3.0), 'bias': jnp.full((2,), 3.0)}}
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
  tx = optim.make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['conv1_1']['kernel'], -0.1 * (0.5 + 0.01 * 3.0), rtol=1e-6)
  for leaf in (updates['conv1_1']['bias'], updates['bn1_1']['scale'], updates['bn1_1']['bias']):
    np.testing.assert_allclose(leaf, -0.1 * 0.5, rtol=1e-6)
  cfg.decay_biases = True
  tx = optim.make_optimizer(cfg)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['conv1_1']['bias'], -0.1 * (0.5 + 0.01 * 3.0), rtol=1e-6)
  # The learning rate is injected: set per step, no recompilation.
  state = optim.set_learning_rate(tx.init(params), jnp.float32(1.0))
  updates, _ = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['conv1_1']['bias'], -1.0 * (0.5 + 0.01 * 3.0), rtol=1e-6)


def test_plateau_schedule_the_papers_three_reductions():
  s = optim.Schedule(base_lr=0.01, kind='plateau', patience=2, max_reductions=3)
  history = []
  for top1 in [0.1, 0.2, 0.3, 0.3, 0.29, 0.31, 0.31, 0.31, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]:
    history.append(s.on_eval(top1))
    assert s.reductions <= 3
  assert history.count(True) == 3
  assert s.lr(0) == pytest.approx(1e-5)
  # The state survives a checkpoint round trip (JSON).
  t = optim.Schedule(base_lr=0.01)
  t.load_state_dict(s.state_dict())
  assert t.lr(0) == s.lr(0) and t.best == s.best and t.reductions == 3
  # Cooldown: evaluations after a reduction that do not count.
  c = optim.Schedule(base_lr=1.0, patience=1, cooldown=2)
  assert [c.on_eval(x) for x in (0.5, 0.5, 0.5, 0.5, 0.5)] == [False, True, False, False, True]


def test_step_cosine_warmup_schedules():
  s = optim.Schedule(base_lr=1.0, kind='step', steps_per_epoch=10, total_steps=100, step_epochs=(3, 6))
  assert [s.lr(i) for i in (0, 29, 30, 59, 60)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
  c = optim.Schedule(base_lr=1.0, kind='cosine', steps_per_epoch=10, total_steps=100, warmup_epochs=1)
  assert c.lr(0) == pytest.approx(0.1) and c.lr(9) == pytest.approx(1.0)
  assert c.lr(55) == pytest.approx(0.5) and c.lr(100) == pytest.approx(0.0)
  assert not c.on_eval(0.1)  # only the plateau schedule reacts to validation


def test_nonfinite_loss_gradient_or_update_is_caught_and_never_applied():
  model = models.get_model('vgg11', **SMALL)
  tx = optim.make_optimizer(default.get_config().optimizer)
  mesh = parallel.make_mesh()
  batch = parallel.global_batch(_batch(), mesh)
  for policy in ('stop', 'skip'):
    state = train.create_train_state(model, tx, mesh, seed=0)
    step = train.make_train_step(model, tx, mesh, nan_policy=policy)
    state, _ = step(state, batch, np.float32(0.01))
    good = jax.device_get(state.params)
    state, m = step(state, batch, np.float32(np.inf))  # finite loss and gradients, infinite update
    assert int(m['skipped']) == 1
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(jax.device_get(state.params)))
    state, m = step(state, batch, np.float32(0.01))
    if policy == 'stop':
      # Nothing after the first fault is learnt; the fault names its step and quantity.
      assert int(m['skipped']) == 1
      jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), good)
      with pytest.raises(train.NonFiniteError, match='non-finite update at step 1'):
        train._check_faults(state, 'stop')
    else:
      assert int(m['skipped']) == 0
      train._check_faults(state, 'skip')
  # A NaN in the forward pass: the loss is named.
  state = train.create_train_state(model, tx, mesh, seed=0)
  poisoned = jax.tree_util.tree_map(lambda p: p, state.params)
  poisoned['fc8']['bias'] = jnp.full_like(poisoned['fc8']['bias'], jnp.nan)
  state = state.replace(params=poisoned)
  state, m = train.make_train_step(model, tx, mesh)(state, batch, np.float32(0.01))
  with pytest.raises(train.NonFiniteError, match='non-finite loss at step 0'):
    train._check_faults(state, 'stop')


def test_warm_start_copies_exactly_the_named_layers(tmp_path):
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(default.get_config().optimizer)
  a = models.get_model('A', **SMALL)
  a_vars = a.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)))
  meta = {'model': {'name': 'vgg11', 'num_classes': 10, 'image_size': 32, 'width': 1 / 8, 'fc_features': 32}}
  checkpoints.save_weights(tmp_path / 'a', a_vars, meta)
  d = models.get_model('D', **SMALL)
  fresh = train.create_train_state(d, tx, mesh, seed=0)
  fresh_params = jax.device_get(fresh.params)
  warm = train.warm_start(fresh, str(tmp_path / 'a'), models.WARM_START_LAYERS, mesh)
  warm_params = jax.device_get(warm.params)
  for layer in models.layer_names('D'):
    want = a_vars['params'][layer] if layer in models.WARM_START_LAYERS else fresh_params[layer]
    for k in ('kernel', 'bias'):
      np.testing.assert_array_equal(warm_params[layer][k], want[k])
  # A layer whose shape differs is named with both shapes.
  wide = models.get_model('D', **{**SMALL, 'width': 1 / 4})
  state = train.create_train_state(wide, tx, mesh, seed=0)
  with pytest.raises(ValueError, match=r'conv1_1/(kernel|bias) has shape \((3, 3, 3, )?8,?\) in .* but \((3, 3, 3, )?16,?\)'):
    train.warm_start(state, str(tmp_path / 'a'), models.WARM_START_LAYERS, mesh)
  with pytest.raises(ValueError, match='conv5_3 is not in'):
    train.warm_start(fresh, str(tmp_path / 'a'), ['conv5_3'], mesh)


@pytest.mark.parametrize('field,value,message', [
    ('model.name', 'vgg17', 'one of vgg11, vgg11_lrn'),
    ('model.init', 'he', 'one of paper, glorot, torchvision'),
    ('model.dtype', 'float16', 'one of float32, bfloat16'),
    ('data.source', 'imagenet', 'one of tfds, folder'),
    ('data.image_size', 100, 'a multiple of 32'),
    ('data.scale_min', 200, 'at least data.image_size'),
    ('data.scale_max', 250, 'at least data.scale_min'),
    ('optimizer.schedule', 'poly', 'one of plateau, step, cosine, constant'),
    ('optimizer.lr', -1.0, 'a positive learning rate'),
    ('train.nan_policy', 'ignore', 'one of stop, skip'),
    ('model.dropout_rate', 1.0, 'a probability'),
])
def test_config_validation_names_field_value_and_allowed(field, value, message):
  config = default.get_config()
  section, key = field.split('.')
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config)
  assert f'config.{field}={value!r}' in str(e.value) and message in str(e.value)


def test_paper_configs_are_valid_and_select_the_scale():
  import importlib
  for name in ('vgg11', 'vgg11_lrn', 'vgg13', 'vgg16_c', 'vgg16', 'vgg19', 'demo'):
    config = importlib.import_module(f'configs.{name}').get_config()
    config_lib.validate(config)
  vgg16 = importlib.import_module('configs.vgg16')
  c = vgg16.get_config('jitter')
  assert (c.data.scale_min, c.data.scale_max) == (256, 512) and config_lib.eval_scale(c.data) == 384
  c = vgg16.get_config()
  assert (c.train.global_batch_size, c.optimizer.momentum, c.optimizer.weight_decay, c.model.dropout_rate,
          c.optimizer.lr, c.optimizer.plateau_max_reductions, c.train.num_epochs) == (256, 0.9, 5e-4, 0.5,
                                                                                      0.01, 3, 74)
  assert config_lib.eval_scale(c.data) == 256
  with pytest.raises(ValueError, match="'512' is not one of 256, 384, jitter"):
    vgg16.get_config('512')
  assert math.isclose(vgg16.get_config('384').optimizer.lr, 1e-3)
