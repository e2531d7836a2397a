"""The paper's training recipe: warm starts along the S=256 -> 384 -> jitter chain, freezing, gradient
accumulation, dataset colour statistics, Caffe-style pooling and the one definition of the test scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from vggjax import checkpoints, config_lib, models, optim, parallel, preprocessing, train

SMALL = dict(width=1 / 8, fc_features=32, num_classes=10, image_size=32, init='glorot')


def _batch(n=16, seed=0, classes=10):
  rng = np.random.RandomState(seed)
  return {'image': rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
          'label': rng.randint(0, classes, n).astype(np.int32)}


def _save(tmp_path, name, model_name, seed=1, **options):
  net = models.get_model(model_name, **{**SMALL, **options})
  variables = net.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)))
  meta = {'model': {'name': models.canonical_name(model_name), 'image_size': 32, 'width': 1 / 8,
                    'fc_features': 32, 'num_classes': options.get('num_classes', 10)}}
  checkpoints.save_weights(tmp_path / name, variables, meta)
  return str(tmp_path / name), variables


def _optimizer(**overrides):
  cfg = default.get_config().optimizer
  cfg.update(overrides)
  return cfg


# ---------------------------------------------------------------------------------------------------------
# Warm start: init_layers


@pytest.mark.slow
def test_init_layers_all_copies_every_layer_of_the_same_net(tmp_path):
  """The S=384 net starts from the S=256 net: every layer (and every batch-norm statistic) is copied."""
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(_optimizer())
  for name in ('vgg16', 'vgg16_bn'):
    src, src_vars = _save(tmp_path, name, name)
    fresh = train.create_train_state(models.get_model(name, **SMALL), tx, mesh, seed=0)
    warm = train.warm_start(fresh, src, 'all', mesh, model_name=name)
    got = jax.device_get(warm.variables)
    bn = {k for k in got['params'] if k.startswith('bn')}
    assert set(got['params']) == set(models.layer_names(name)) | bn and bool(bn) == name.endswith('_bn')
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, jax.device_get(src_vars))


@pytest.mark.slow
def test_init_layers_all_keeps_a_new_fc8_and_paper_copies_seven(tmp_path):
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(_optimizer())
  src, src_vars = _save(tmp_path, 'd1000', 'vgg16', num_classes=7)
  fresh = train.create_train_state(models.get_model('vgg16', **SMALL), tx, mesh, seed=0)
  fresh_params = jax.device_get(fresh.params)
  warm = jax.device_get(train.warm_start(fresh, src, 'all', mesh).params)
  for layer in models.layer_names('vgg16'):
    want = fresh_params[layer] if layer == 'fc8' else src_vars['params'][layer]
    np.testing.assert_array_equal(warm[layer]['kernel'], want['kernel'])
  # 'paper' (the default) is the paper's seven layers of A; 'all' from A copies what matches by shape.
  a_src, a_vars = _save(tmp_path, 'a', 'vgg11')
  warm = jax.device_get(train.warm_start(fresh, a_src, 'paper', mesh).params)
  for layer in models.layer_names('vgg16'):
    want = a_vars['params'][layer] if layer in models.WARM_START_LAYERS else fresh_params[layer]
    np.testing.assert_array_equal(warm[layer]['kernel'], want['kernel'])
  assert train.parse_init_layers('conv1_1, fc6') == ('conv1_1', 'fc6')
  assert train.parse_init_layers(('all',)) == 'all'
  assert default.get_config().init_layers == 'paper'
  bad = default.get_config()
  bad.init_from, bad.init_layers = 'runs/a', 'conv1_1,conv9_9'
  with pytest.raises(config_lib.ConfigError, match="config.init_layers='conv1_1,conv9_9'"):
    config_lib.validate(bad)


# ---------------------------------------------------------------------------------------------------------
# Freezing: train.trainable


@pytest.mark.slow
def test_frozen_layers_get_no_update_no_decay_and_no_optimizer_state():
  mesh = parallel.make_mesh()
  model = models.get_model('vgg11_bn', **SMALL)
  tx = optim.make_optimizer(_optimizer(weight_decay=5e-4), trainable='fc*')
  state = train.create_train_state(model, tx, mesh, seed=0)
  # Optimizer state (momentum) only for fc6-fc8.
  momentum_layers = {path[-2].key for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
                     if len(path) >= 2 and hasattr(path[-2], 'key')}
  assert momentum_layers == {'fc6', 'fc7', 'fc8'}
  before = jax.device_get((state.params, state.batch_stats))
  step = train.make_train_step(model, tx, mesh)
  for i in range(2):
    state, metrics = step(state, parallel.global_batch(_batch(seed=i), mesh), np.float32(0.05))
  params, stats = jax.device_get((state.params, state.batch_stats))
  for layer in params:
    same = all(np.array_equal(params[layer][k], before[0][layer][k]) for k in params[layer])
    assert same == (not layer.startswith('fc')), layer
  # A frozen conv's batch norm keeps its running statistics.
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats, before[1])
  assert np.isfinite(float(metrics['loss']))
  # A pattern that matches nothing is an error naming the layers; bnX_Y follows convX_Y.
  with pytest.raises(ValueError, match="'fc9' matches no layer"):
    optim.check_patterns(models.layer_names('vgg11'), ('fc9',))
  assert optim.is_trainable('bn5_1', ('conv5_*',)) and not optim.is_trainable('bn4_1', ('conv5_*',))
  assert optim.parse_patterns('fc6, fc7') == ('fc6', 'fc7') and optim.parse_patterns('*') == ()
  bad = default.get_config()
  bad.train.trainable = 'fc6,conv9_1'
  with pytest.raises(config_lib.ConfigError, match='config.train.trainable'):
    config_lib.validate(bad)


@pytest.mark.slow
def test_frozen_step_equals_zero_lr_on_frozen_layers():
  """Trainable layers move exactly as in a full step whose frozen layers are simply not updated."""
  mesh = parallel.make_mesh()
  model = models.get_model('vgg11', **SMALL)
  batch = parallel.global_batch(_batch(), mesh)
  full_tx = optim.make_optimizer(_optimizer())
  fc_tx = optim.make_optimizer(_optimizer(), trainable='fc8')
  full = train.create_train_state(model, full_tx, mesh, seed=0)
  fc = train.create_train_state(model, fc_tx, mesh, seed=0)
  full, m_full = train.make_train_step(model, full_tx, mesh)(full, batch, np.float32(0.05))
  fc, m_fc = train.make_train_step(model, fc_tx, mesh)(fc, batch, np.float32(0.05))
  np.testing.assert_allclose(jax.device_get(fc.params['fc8']['kernel']),
                             jax.device_get(full.params['fc8']['kernel']), atol=1e-6)
  assert float(m_fc['loss']) == pytest.approx(float(m_full['loss']), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Gradient accumulation: train.accumulate_steps


def _accumulated(name, k, n=256, steps=2):
  mesh = parallel.make_mesh()
  model = models.get_model(name, **SMALL)
  tx = optim.make_optimizer(_optimizer())
  state = train.create_train_state(model, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, color_shift=0.1, accumulate_steps=k)
  out = []
  for i in range(steps):
    state, metrics = step(state, parallel.global_batch(_batch(n, seed=i), mesh), np.float32(0.05))
    out.append(jax.device_get(metrics))
  return jax.device_get(state), out


@pytest.mark.slow
def test_accumulation_4x64_equals_1x256():
  s1, m1 = _accumulated('vgg11', 1)
  s4, m4 = _accumulated('vgg11', 4)
  diff = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), (s1.params, s1.opt_state),
                                (s4.params, s4.opt_state))
  assert max(jax.tree_util.tree_leaves(diff)) <= 1e-5
  for a, b in zip(m1, m4):
    assert float(a['loss']) == pytest.approx(float(b['loss']), abs=1e-5)
    assert float(a['grad_norm']) == pytest.approx(float(b['grad_norm']), rel=1e-5)
    assert float(a['train_top1']) == pytest.approx(float(b['train_top1']), abs=1e-6)


@pytest.mark.slow
def test_accumulated_steps_resume_exactly():
  """A resumed run repeats the accumulated step bit for bit: the step is a function of the state (its step
  counter and RNG) and the batch, whatever was computed before."""
  mesh = parallel.make_mesh()
  model = models.get_model('vgg11', **SMALL)
  tx = optim.make_optimizer(_optimizer())
  step = train.make_train_step(model, tx, mesh, color_shift=0.1, accumulate_steps=4)
  batches = [parallel.global_batch(_batch(64, seed=i), mesh) for i in range(2)]
  state = train.create_train_state(model, tx, mesh, seed=0)
  for b in batches:
    state, _ = step(state, b, np.float32(0.05))
  resumed = train.create_train_state(model, tx, mesh, seed=0)
  resumed, _ = step(resumed, batches[0], np.float32(0.05))
  host = jax.device_get(resumed)  # what a checkpoint holds
  resumed = jax.device_put(host, parallel.replicated(mesh))
  resumed, _ = step(resumed, batches[1], np.float32(0.05))
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed), jax.device_get(state))


@pytest.mark.slow
def test_accumulation_with_batch_norm_uses_micro_batch_statistics():
  """_bn nets: each micro-batch is normalised with its own statistics and the running averages are updated
  once per micro-batch, in order: k micro-batches equal k forward passes, not one big batch."""
  mesh = parallel.make_mesh()
  model = models.get_model('vgg11_bn', **SMALL)
  tx = optim.make_optimizer(_optimizer())
  state = train.create_train_state(model, tx, mesh, seed=0)
  start = jax.device_get(state)
  batch = _batch(64, seed=3)
  step = train.make_train_step(model, tx, mesh, color_shift=0.0, accumulate_steps=4)
  state, metrics = step(state, parallel.global_batch(batch, mesh), np.float32(0.05))
  # The same running statistics from four train-mode forward passes over examples j, j+4, j+8, ...
  variables = {'params': start.params, 'batch_stats': start.batch_stats}
  x = preprocessing.normalize(jnp.asarray(batch['image'], jnp.float32), preprocessing.Normalization())
  apply = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)},
                                           mutable=['batch_stats'])[1])
  for j in range(4):
    variables = {'params': start.params, 'batch_stats': apply(variables, x[j::4])['batch_stats']}
  got = jax.device_get(state.batch_stats)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got,
                         jax.device_get(variables['batch_stats']))
  # ... which differ from one pass over the whole batch.
  whole = apply({'params': start.params, 'batch_stats': start.batch_stats}, x)
  assert not np.allclose(got['bn1_1']['mean'], jax.device_get(whole['batch_stats']['bn1_1']['mean']))
  assert np.isfinite(float(metrics['loss']))


def test_accumulate_steps_is_validated():
  config = default.get_config()
  config.train.accumulate_steps = 3
  with pytest.raises(config_lib.ConfigError, match='config.train.accumulate_steps=3 .* divisor of'):
    config_lib.validate(config)
  config.train.accumulate_steps = 4
  config_lib.validate(config)


# ---------------------------------------------------------------------------------------------------------
# The chain's configs and guards


def test_384_and_jitter_configs_continue_the_previous_scale():
  import importlib
  for net in ('vgg16_c', 'vgg16', 'vgg19'):
    module = importlib.import_module(f'configs.{net}')
    c256 = module.get_config()
    assert c256.init_layers == 'paper' and not c256.init_required and c256.optimizer.lr == 0.01
    for scale, parent in (('384', '256'), ('jitter', '384')):
      c = module.get_config(scale)
      assert c.init_layers == 'all' and c.optimizer.lr == 1e-3
      assert f'S={parent} run of {c.model.name}' in c.init_required
      config_lib.validate(c)  # a valid config (to plan or evaluate with) ...
      with pytest.raises(config_lib.ConfigError, match=f'config.init_from=.*S={parent} run of {net}'):
        config_lib.check_init_required(c)  # ... that does not train without init_from
      c.init_from = f'runs/{net}_{parent}'
      config_lib.check_init_required(c)
      c.init_from, c.init_required = '', ''  # from scratch on purpose
      config_lib.check_init_required(c)


def test_deep_net_from_scratch_with_the_paper_init_warns(caplog):
  config = default.get_config()
  with caplog.at_level('WARNING', logger='vggjax'):
    assert train.warn_deep_from_scratch(config)
  text = caplog.text
  assert 'vgg16 (net D)' in text and 'init_from=A_RUN' in text and 'init=glorot' in text
  assert 'bad initialisation stalls deep nets' in text
  for field, value in (('init_from', 'runs/A'), ('model.init', 'glorot'), ('model.name', 'vgg11'),
                       ('model.name', 'vgg16_bn')):
    c = default.get_config()
    if '.' in field:
      c.model[field.split('.')[1]] = value
    else:
      c[field] = value
    assert not train.warn_deep_from_scratch(c), field


# ---------------------------------------------------------------------------------------------------------
# Colour statistics, pooling, test scales


@pytest.mark.slow
def test_dataset_colour_pca_reaches_the_step():
  from vggjax import preprocessing
  from vggjax.data import prepare
  config = default.get_config()
  assert config.data.pca_eigval == preprocessing.IMAGENET_EIGVAL
  assert config.data.pca_eigvec == preprocessing.IMAGENET_EIGVEC
  mesh = parallel.make_mesh()
  model = models.get_model('vgg11', **SMALL, dropout_rate=0.0)
  tx = optim.make_optimizer(_optimizer())
  batch = parallel.global_batch(_batch(), mesh)

  state = train.create_train_state(model, tx, mesh, seed=0)

  def loss(**kw):  # the step donates its state: give it a copy
    fresh = jax.tree_util.tree_map(jnp.copy, state)
    return float(train.make_train_step(model, tx, mesh, **kw)(fresh, batch, np.float32(0.01))[1]['loss'])

  # The step's colour shift uses the given eigen-decomposition: zero eigenvalues shift nothing ...
  assert loss(color_shift=0.1, eigval=(0, 0, 0)) == loss(color_shift=0.0)
  # ... and another dataset's shifts along its own eigenvectors, by its own eigenvalues.
  images = jnp.zeros((4, 2, 2, 3))
  shifted = preprocessing.pca_lighting(jax.random.key(0), images, 0.1, (30.0, 0.0, 0.0), np.eye(3))
  assert np.all(np.asarray(shifted[..., 1:]) == 0) and np.all(np.asarray(shifted[..., 0]) != 0)
  # prepare stats prints the overrides; they parse and validate.
  flags = prepare.pca_flags({'eigval': [50.0, 5.0, 1.0], 'eigvec': np.eye(3).tolist()})
  assert '--config.data.pca_eigval="(50, 5, 1)"' in flags and 'pca_eigvec="((1.0000, 0.0000' in flags
  config.data.pca_eigvec = ((1.0, 0.0), (0.0, 1.0))
  with pytest.raises(config_lib.ConfigError, match='config.data.pca_eigvec'):
    config_lib.validate(config)


def test_pool_ceil_gives_caffes_dense_score_map():
  """The released models (Caffe, ceil pooling) give a 2x5 class score map on a 256x341 image; floor: 2x4."""
  x = jax.ShapeDtypeStruct((1, 256, 341, 3), jnp.float32)
  for ceil, want in ((False, (2, 4)), (True, (2, 5))):
    net = models.get_model('vgg16', width=1 / 16, fc_features=16, num_classes=10, pool_ceil=ceil)
    variables = models.variable_shapes(net)
    out = jax.eval_shape(lambda v, x: net.apply(v, x, method=net.score_map), variables, x)
    assert out.shape[1:3] == want, (ceil, out.shape)
  # Identical at even sizes; the odd border becomes a window of its own.
  a = jnp.arange(2 * 5 * 5 * 1, dtype=jnp.float32).reshape(2, 5, 5, 1)
  even = a[:, :4, :4]
  np.testing.assert_array_equal(models.max_pool_2x2(even, ceil=True), models.max_pool_2x2(even))
  np.testing.assert_array_equal(models.max_pool_2x2(a, ceil=True)[:, 2, 2, 0], a[:, 4, 4, 0])
  config = default.get_config()
  config.model.pool_ceil = True
  assert train.build_model(config).pool_ceil


def test_one_definition_of_the_test_scales():
  from vggjax import evaluate, features, predict, preprocessing
  from vggjax.data import pipeline
  for smin, smax, q in ((256, 256, 256), (384, 384, 384), (256, 512, 384), (256, 511, 384)):
    assert preprocessing.single_test_scale(smin, smax) == q
    cfg = default.get_config().data
    cfg.scale_min, cfg.scale_max = smin, smax
    assert pipeline.eval_scale(cfg) == q
    assert evaluate.single_scale(smin, smax) == q
    assert predict.default_scale({'data': {'scale_min': smin, 'scale_max': smax}, 'model': {}}) == q
  assert evaluate.default_scales(256, 512, 224, multiscale=True) == (256, 384, 512) == features.PAPER_SCALES
  assert evaluate.default_scales(256, 256, 224, multiscale=True) == (224, 256, 288)
