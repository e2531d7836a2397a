"""The training step and its parts: data parallelism, the optimizer, schedules, faults, warm start."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bfloat16_step_keeps_float32_params_and_optimizer_state():
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(default.get_config().optimizer)
  results = {}
  for dtype in ('bfloat16', 'float32'):
    model = models.get_model('vgg11', **SMALL, dtype=dtype)
    state = train.create_train_state(model, tx, mesh, seed=0)
    before = jax.device_get(state.params)
    state, metrics = train.make_train_step(model, tx, mesh)(state, parallel.global_batch(_batch(), mesh),
                                                           np.float32(0.01))
    results[dtype] = before, jax.device_get(state.params), float(metrics['loss']), metrics['loss'].dtype
    if dtype == 'bfloat16':
      for leaf in jax.tree_util.tree_leaves((state.params, state.opt_state)):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  (b0, b1, b_loss, b_dtype), (f0, f1, f_loss, _) = results['bfloat16'], results['float32']
  assert b_dtype == jnp.float32
  # The same step as in float32, to bfloat16's precision: the loss, and every layer's update (the direction
  # agrees closely; the size within bfloat16's noise, which grows towards conv1_1).
  assert b_loss == pytest.approx(f_loss, rel=1e-2)
  for layer in models.layer_names('vgg11'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, b0[layer], f0[layer])  # same init
    db, df = b1[layer]['kernel'] - b0[layer]['kernel'], f1[layer]['kernel'] - f0[layer]['kernel']
    assert np.abs(df).max() > 0, layer
    cosine = float((db * df).sum() / np.linalg.norm(db) / np.linalg.norm(df))
    assert cosine > 0.9 and np.linalg.norm(db - df) < 0.5 * np.linalg.norm(df), (layer, cosine)


def test_nonfinite_gradient_with_a_finite_loss_is_named():
  """A gradient-only fault: sqrt(|v|) at v = 0 is finite forward, infinite backward."""
  import flax.linen as nn

  class SqrtNet(nn.Module):
    image_size: int = 32
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train=False, **unused):
      w = self.param('w', nn.initializers.normal(0.01), (3, 10))
      v = self.param('v', nn.initializers.zeros, (10,))
      return x.mean(axis=(1, 2)) @ w + jnp.sqrt(jnp.abs(v))

  model = SqrtNet()
  tx = optim.make_optimizer(default.get_config().optimizer)
  mesh = parallel.make_mesh()
  for policy in ('stop', 'skip'):
    state = train.create_train_state(model, tx, mesh, seed=0)
    before = jax.device_get(state.params)
    state, m = train.make_train_step(model, tx, mesh, nan_policy=policy)(
        state, parallel.global_batch(_batch(), mesh), np.float32(0.01))
    assert np.isfinite(float(m['loss'])) and not np.isfinite(float(m['grad_norm']))
    assert int(m['skipped']) == 1 and int(state.step) == 1
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    if policy == 'stop':
      with pytest.raises(train.NonFiniteError, match='non-finite gradients at step 0'):
        train._check_faults(state, policy)
    else:
      train._check_faults(state, policy)


@pytest.mark.slow
def test_remat_recomputes_and_gives_the_same_step():
  model = models.get_model('vgg11', **{**SMALL, 'width': 1 / 16, 'fc_features': 16})
  tx = optim.make_optimizer(default.get_config().optimizer)
  mesh = parallel.make_mesh()
  batch = parallel.global_batch(_batch(), mesh)
  out = {}
  for remat in (False, True):
    step = train.make_train_step(model, tx, mesh, remat=remat)
    state = train.create_train_state(model, tx, mesh, seed=0)
    jaxpr = str(jax.make_jaxpr(step)(state, batch, np.float32(0.01)))
    assert ('checkpoint' in jaxpr or 'remat' in jaxpr) == remat, remat  # remat is there only when asked
    state, m = step(state, batch, np.float32(0.05))
    out[remat] = jax.device_get(state.params), float(m['loss'])
  assert out[True][1] == pytest.approx(out[False][1], rel=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         out[True][0], out[False][0])


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


def test_coupled_l2_with_momentum_three_steps_by_hand():
  """Caffe's rule with momentum 0.9 over 3 steps and a learning-rate change, computed by hand. With momentum
  (and more than one step) it differs from decoupled decay (SGDW), which the test checks it is not."""
  lr, mu, wd = [0.1, 0.1, 0.05], 0.9, 0.1
  cfg = ml_collections.ConfigDict(dict(lr=lr[0], momentum=mu, nesterov=False, weight_decay=wd,
                                       decay_biases=False))
  tx = optim.make_optimizer(cfg)
  p0 = {'fc8': {'kernel': np.array([2.0, -1.0], np.float32), 'bias': np.array([1.0, 4.0], np.float32)}}
  grad = lambda p: {'fc8': {k: 0.5 * v + 0.25 for k, v in p['fc8'].items()}}  # noqa: E731 (depends on p)
  params, opt_state = jax.tree_util.tree_map(jnp.asarray, p0), tx.init(p0)
  for t in range(3):
    opt_state = optim.set_learning_rate(opt_state, jnp.float32(lr[t]))
    updates, opt_state = tx.update(grad(jax.device_get(params)), opt_state, params)
    params = optax.apply_updates(params, updates)
  got = jax.device_get(params)['fc8']

  def by_hand(coupled):
    w, b = p0['fc8']['kernel'].astype(np.float64), p0['fc8']['bias'].astype(np.float64)
    mw, mb = np.zeros(2), np.zeros(2)
    for t in range(3):
      gw, gb = 0.5 * w + 0.25, 0.5 * b + 0.25  # the gradient at the current parameters
      mw = mu * mw + (gw + wd * w if coupled else gw)  # coupled: decay enters the momentum buffer
      mb = mu * mb + gb  # biases are not decayed
      w = w - lr[t] * mw - (0 if coupled else lr[t] * wd * w)
      b = b - lr[t] * mb
    return w, b

  w, b = by_hand(coupled=True)
  np.testing.assert_allclose(got['kernel'], w, rtol=1e-5)
  np.testing.assert_allclose(got['bias'], b, rtol=1e-5)
  w_decoupled, _ = by_hand(coupled=False)
  assert np.abs(w_decoupled - w).min() > 100 * 1e-5 * np.abs(w).max()  # the two rules are told apart


def test_plateau_schedule_the_papers_three_reductions():
  s = optim.Schedule(base_lr=0.01, kind='plateau', patience=2, max_reductions=3)
  top1 = [0.1, 0.2, 0.3, 0.3, 0.29, 0.31, 0.31, 0.31, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
  history, lrs = [], []
  for x in top1:
    history.append(s.on_eval(x))
    lrs.append(s.lr(0))
  # By hand: a reduction at the 2nd evaluation in a row without improvement, at most 3 of them.
  assert [i for i, r in enumerate(history) if r] == [4, 7, 10]
  assert lrs == pytest.approx([1e-2] * 4 + [1e-3] * 3 + [1e-4] * 3 + [1e-5] * 5)
  # The state survives a checkpoint round trip (JSON).
  t = optim.Schedule(base_lr=0.01)
  t.load_state_dict(s.state_dict())
  assert t.lr(0) == s.lr(0) and t.best == s.best and t.reductions == 3
  # Mid-patience state survives too: one bad evaluation before the save, one after it reduces.
  u = optim.Schedule(base_lr=1.0, patience=2)
  assert [u.on_eval(x) for x in (0.5, 0.5)] == [False, False]
  v = optim.Schedule(base_lr=1.0, patience=2)
  v.load_state_dict(json.loads(json.dumps(u.state_dict())))
  assert v.on_eval(0.5) and v.lr(0) == pytest.approx(0.1)
  # min_delta: an improvement smaller than it is no improvement.
  d = optim.Schedule(base_lr=1.0, patience=1, min_delta=0.01)
  assert [d.on_eval(x) for x in (0.5, 0.505, 0.52)] == [False, True, False]
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


@pytest.mark.slow
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


@pytest.mark.slow
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
    ('model.dtype', 'float64', 'one of float32, bfloat16, float16'),
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


def test_init_compiles_at_level_0_on_a_cpu_up_to_the_threshold(monkeypatch):
  """create_train_state's init on a CPU: XLA's backend optimisation level 0 up to INIT_FAST_COMPILE_PARAMS
  parameters (a 10x faster compile: benchmarks/init_compile.py), the defaults above it."""
  from vggjax import train_step
  mesh = parallel.make_mesh(jax.devices()[:1])
  params = jax.eval_shape(lambda: models.get_model('vgg11', **SMALL).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))['params']
  assert train_step.init_compiler_options(mesh, params) == {'xla_backend_optimization_level': 0}
  monkeypatch.setattr(train_step, 'INIT_FAST_COMPILE_PARAMS', 1000)
  assert train_step.init_compiler_options(mesh, params) is None


@pytest.mark.slow
def test_glorot_init_at_level_0_is_bitwise_the_default_compiles(monkeypatch):
  """Glorot's uniform init (the study's, configs/paper_mini.py) is the same bits at level 0 as at the
  default optimisation: the fast compile changed no run that uses it."""
  from vggjax import train_step
  model = models.get_model('vgg11', **{**SMALL, 'width': 1 / 16, 'fc_features': 16})
  tx = optim.make_optimizer(default.get_config().optimizer)
  mesh = parallel.make_mesh(jax.devices()[:1])
  fast = train.create_train_state(model, tx, mesh, seed=3)
  monkeypatch.setattr(train_step, 'INIT_FAST_COMPILE_PARAMS', 0)
  slow = train.create_train_state(model, tx, mesh, seed=3)
  for a, b in zip(jax.tree_util.tree_leaves(fast.params), jax.tree_util.tree_leaves(slow.params)):
    assert np.array_equal(np.asarray(a), np.asarray(b))
