"""The recipe knobs beyond the paper (README, "Recipe knobs"): their defaults leave the paper's step as it
was, bit for bit, and each knob does what it says."""

import functools
import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, reference_module, subprocess_env
from configs import default, tiny
from vggjax import checkpoints, config_lib, localization_model, models, optim, parallel, train
from vggjax.preprocessing import IMAGENET_EIGVAL, IMAGENET_EIGVEC, Normalization, normalize, pca_lighting

SMALL = dict(width=1 / 8, fc_features=32, num_classes=10, image_size=32, init='glorot')


def _batch(n=16, seed=0):
  rng = np.random.RandomState(seed)
  return {'image': rng.randint(0, 256, (n, 32, 32, 3)).astype(np.uint8),
          'label': rng.randint(0, 10, n).astype(np.int32)}


# ----------------------------------------------------------------------------------------------------------
# The reference: the paper's step (classify, one micro-batch, every layer trained) and optimizer as the code
# had them before the knobs (vggjax/train.py and vggjax/optim.py of commit 81c2bfa), copied here unchanged
# except for the removed branches (box heads, accumulation, freezing), so the default step of today's code
# is compared with it on the same machine, bit for bit.


def _reference_optimizer(opt_cfg):
  parts = []
  if opt_cfg.weight_decay:
    parts.append(optax.add_decayed_weights(opt_cfg.weight_decay,
                                           mask=lambda p: optim.decay_mask(p, opt_cfg.decay_biases)))
  parts.append(optax.inject_hyperparams(optax.sgd)(
      learning_rate=opt_cfg.lr, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov))
  return optax.chain(*parts)


def _reference_set_learning_rate(opt_state, lr):
  inner = opt_state[-1]
  return opt_state[:-1] + (inner._replace(hyperparams=dict(inner.hyperparams, learning_rate=lr)),)


def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _reference_step(model, tx, mesh, norm=Normalization(), color_shift=0.1, nan_policy='stop'):
  has_bn = bool(model.batch_norm)

  def step_fn(state, batch, lr):
    rng = jax.random.fold_in(state.rng, state.step)
    color_rng, dropout_rng = jax.random.split(rng)
    images = pca_lighting(color_rng, batch['image'].astype(jnp.float32), color_shift, IMAGENET_EIGVAL,
                          IMAGENET_EIGVEC)
    x = normalize(images, norm)
    labels = batch['label']
    n = batch['image'].shape[0]
    ids = jnp.arange(n, dtype=jnp.int32)

    def loss_fn(p, stats, x, labels, ids):
      variables = {'params': p}
      kw = dict(train=True, rngs={'dropout': dropout_rng}, example_ids=ids)
      if has_bn:
        variables['batch_stats'] = stats
        logits, new_vars = model.apply(variables, x, mutable=['batch_stats'], **kw)
        stats = new_vars['batch_stats']
      else:
        logits = model.apply(variables, x, **kw)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum() / n, (logits, stats)

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, x, labels, ids)
    hits = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
    opt_state = _reference_set_learning_rate(state.opt_state, lr)
    updates, new_opt_state = tx.update(grads, opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    fault_now = jnp.select([~jnp.isfinite(loss), ~_all_finite(grads), ~_all_finite(updates)], [1, 2, 3],
                           0).astype(jnp.int32)
    ok = fault_now == 0
    if nan_policy == 'stop':
      ok = ok & (state.fault == 0)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    first = (state.fault == 0) & (fault_now != 0)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        batch_stats=keep(new_stats, state.batch_stats), opt_state=keep(new_opt_state, opt_state),
        fault=jnp.where(first, fault_now, state.fault),
        fault_step=jnp.where(first, state.step, state.fault_step))
    metrics = {'loss': loss, 'train_top1': hits / n, 'grad_norm': optax.global_norm(grads),
               'skipped': 1 - ok.astype(jnp.int32), 'fault': new_state.fault, 'fault_step': new_state.fault_step}
    return new_state, metrics

  rep = parallel.replicated(mesh)
  return jax.jit(step_fn, donate_argnums=0, out_shardings=(rep, rep))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['vgg11', 'vgg11_bn'])
def test_default_knobs_leave_the_papers_step_unchanged_bit_for_bit(name):
  """configs/default.py's knobs (no EMA, no label smoothing, no clipping) give the step of commit 81c2bfa:
  parameters, batch statistics, optimizer state and metrics equal to the last bit over three steps."""
  config = default.get_config()
  t, o = config.train, config.optimizer
  assert (t.ema_decay, t.label_smoothing, t.profile_steps, o.clip_norm) == (0, 0, 0, 0)
  model = models.get_model(name, **SMALL)
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(o, trainable=t.trainable)
  step = train.make_train_step(model, tx, mesh, label_smoothing=t.label_smoothing, ema_decay=t.ema_decay,
                               accumulate_steps=t.accumulate_steps, nan_policy=t.nan_policy)
  ref_tx = _reference_optimizer(o)
  ref_step = _reference_step(model, ref_tx, mesh)
  state = train.create_train_state(model, tx, mesh, seed=0, ema=bool(t.ema_decay))
  ref = train.create_train_state(model, ref_tx, mesh, seed=0)
  for i in range(3):
    batch = parallel.global_batch(_batch(seed=i), mesh)
    state, metrics = step(state, batch, np.float32(0.05))
    ref, ref_metrics = ref_step(ref, batch, np.float32(0.05))
    got, want = jax.device_get((state.params, state.batch_stats, state.opt_state, metrics)), \
        jax.device_get((ref.params, ref.batch_stats, ref.opt_state, ref_metrics))
    leaves, tree = jax.tree_util.tree_flatten(got)
    ref_leaves, ref_tree = jax.tree_util.tree_flatten(want)
    assert tree == ref_tree
    for a, b in zip(leaves, ref_leaves):
      np.testing.assert_array_equal(a, b)
  assert not jax.device_get(state.ema_params)


# ----------------------------------------------------------------------------------------------------------
# Label smoothing, clipping, EMA: each on the step.


def test_label_smoothing_is_optax_smooth_labels_on_the_classifier_only():
  logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
  labels = jnp.array([0, 1])
  head = localization_model.get_head('classify', 0.1)
  # (1 - a) * cross-entropy + a * the mean over classes of -log softmax: the smoothed target written out.
  logp = jax.nn.log_softmax(logits)
  want = 0.9 * -logp[jnp.arange(2), labels] + 0.1 * -jnp.mean(logp, -1)
  np.testing.assert_allclose(head.loss(logits, labels), want, rtol=1e-6)
  # Evaluation reports the plain cross-entropy.
  mask = jnp.ones(2)
  plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(head.eval_sums(logits, {'label': labels}, mask)['loss'], plain.sum(), rtol=1e-6)
  with pytest.raises(ValueError, match='label_smoothing'):
    localization_model.get_head('scr', 0.1)


def _opt(**kw):
  o = default.get_config().optimizer
  o.update(kw)
  return o


@pytest.mark.slow
def test_clip_norm_clips_the_update_and_grad_norm_is_logged_before_clipping():
  model = models.get_model('vgg11', **SMALL)
  mesh = parallel.make_mesh()
  clip, lr = 1e-3, 0.5
  tx = optim.make_optimizer(_opt(clip_norm=clip, weight_decay=0.0))
  state = train.create_train_state(model, tx, mesh, seed=0)
  before = jax.device_get(state.params)
  state, m = train.make_train_step(model, tx, mesh)(state, parallel.global_batch(_batch(), mesh),
                                                    np.float32(lr))
  delta = jax.tree_util.tree_map(lambda a, b: a - b, jax.device_get(state.params), before)
  assert float(m['grad_norm']) > 10 * clip  # the gradient's own norm, before clipping
  # First step of SGD with momentum: the update is -lr * the clipped gradient, whose norm is clip.
  np.testing.assert_allclose(float(optax.global_norm(delta)), lr * clip, rtol=1e-4)


@pytest.mark.slow
def test_ema_is_the_moving_average_of_the_applied_parameters():
  model = models.get_model('vgg11', **SMALL)
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(_opt())
  decay = 0.75
  step = train.make_train_step(model, tx, mesh, ema_decay=decay)
  state = train.create_train_state(model, tx, mesh, seed=0, ema=True)
  ema = jax.device_get(state.params)
  for i in range(2):
    state, _ = step(state, parallel.global_batch(_batch(seed=i), mesh), np.float32(0.05))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, jax.device_get(state.params))
  got = jax.device_get(state.ema_params)
  jax.tree_util.tree_map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), got, ema)
  # A step whose update is dropped (an infinite learning rate: a non-finite update) leaves the average.
  kept, m = step(state, parallel.global_batch(_batch(), mesh), np.float32('inf'))
  assert int(m['skipped']) == 1 and int(m['fault']) == 3
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(kept.ema_params), got)


@pytest.mark.parametrize('field, value, message', [
    ('train.ema_decay', 1.0, 'a decay in'), ('train.label_smoothing', -0.1, 'in \\[0, 1\\)'),
    ('train.profile_steps', -1, 'a step count'), ('optimizer.clip_norm', -1.0, 'positive global norm')])
def test_knob_validation_names_field_value_and_allowed(field, value, message):
  config = default.get_config()
  block, name = field.split('.')
  config[block][name] = value
  with pytest.raises(config_lib.ConfigError, match=f'config.{field}={value!r}.*{message}'):
    config_lib.validate(config)


# ----------------------------------------------------------------------------------------------------------
# A run with every knob: EMA evaluated and checkpointed, resumed, read back; the profile trace written.


def knobs_config():
  """Every knob on (float16 with its loss scale, keep_best too), 4 steps, 2 of them profiled."""
  config = tiny.get_config('A')
  config.model.dtype, config.train.keep_best, config.train.keep_checkpoints = 'float16', True, 1
  config.train.max_steps, config.train.eval_every_steps, config.train.checkpoint_every_steps = 4, 4, 4
  config.train.ema_decay, config.train.label_smoothing, config.train.profile_steps = 0.5, 0.1, 2
  config.optimizer.clip_norm = 1.0
  return config


# The profiled run in a process of its own: jax.profiler crashes a process that has PyTorch loaded
# (train.PROFILER_CONFLICTS), and this worker may have run the PyTorch cross-checks.
PROFILED_RUN = """
import sys
sys.path.insert(0, sys.argv[2] + '/tests')
import test_knobs  # through conftest: the 8 CPU devices of the resumed run here
from vggjax import train
train.train_and_evaluate(test_knobs.knobs_config(), sys.argv[1])
assert 'torch' not in sys.modules
"""


@pytest.mark.slow
def test_a_run_with_the_knobs_evaluates_and_resumes_the_ema_and_writes_a_profile(tmp_path):
  """Every knob on: one run of 4 steps (profiled, in a fresh process), resumed to 8 here."""
  workdir = str(tmp_path / 'run')
  out = subprocess.run([sys.executable, '-c', PROFILED_RUN, workdir, str(REPO)], capture_output=True, text=True,
                       env=subprocess_env(8), timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  config = knobs_config()
  profiles = [f for _, _, files in os.walk(os.path.join(workdir, 'profile')) for f in files]
  assert any(f.endswith('.xplane.pb') for f in profiles), profiles
  config.train.max_steps, config.train.profile_steps = 8, 0
  result = train.train_and_evaluate(config, workdir)  # resumes at step 4, the EMA from the checkpoint
  assert result.step == 8
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    evals = [r for r in map(json.loads, f) if 'val_top1' in r]
  assert [r['step'] for r in evals] == [4, 8]
  assert all(0 <= r['ema_val_top1'] <= 1 and r['ema_val_loss'] > 0 for r in evals)
  # float16: the loss scale is logged, checkpointed and resumed (its good-step counter goes on from step 4).
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logs = [r for r in map(json.loads, f) if 'loss' in r]
  assert all(r['loss_scale'] >= 1 and r['overflow_steps'] >= 0 for r in logs)
  scale = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'checkpoints', '8', 'state'))['loss_scale']
  assert int(scale['overflows']) == sum(r['overflow_steps'] for r in logs)
  if not int(scale['overflows']):
    assert int(scale['counter']) == 8 and float(scale['scale']) == config.train.loss_scale
  # keep_best: the best val top-1 step is kept beside the last one, and WORKDIR/best reads it.
  best = max(evals, key=lambda r: (r['val_top1'], r['step']))['step']  # a tie: the later (Orbax's order)
  assert checkpoints.best_step(workdir) == best
  assert checkpoints.load_weights(os.path.join(workdir, 'best'))[1]['step'] == best
  trained, _ = checkpoints.load_weights(workdir)
  ema, meta = checkpoints.load_weights(workdir, weights='ema')
  assert meta['weights'] == 'ema' and meta['step'] == 8
  assert jax.tree_util.tree_structure(ema) == jax.tree_util.tree_structure(trained)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(ema),
                                                      jax.tree_util.tree_leaves(trained)))
  # A run trained without EMA has none to read.
  path = os.path.join(workdir, 'config.json')
  with open(path) as f:
    saved = json.load(f)
  saved['train']['ema_decay'] = 0.0
  with open(path, 'w') as f:
    json.dump(saved, f)
  with pytest.raises(ValueError, match='no EMA weights'):
    checkpoints.load_weights(workdir, weights='ema')


def test_profile_steps_with_pytorch_loaded_warn_and_train_on(tmp_path, caplog):
  """With PyTorch in the process, jax.profiler would crash it (train.PROFILER_CONFLICTS): the steps are not
  traced, a warning says why, and nothing else changes."""
  reference_module('torch')
  run = types.SimpleNamespace(t=types.SimpleNamespace(profile_steps=2), workdir=str(tmp_path))
  profile = train._Profile(run, start=0)
  with caplog.at_level('WARNING', logger='vggjax'):
    for step in range(1, 5):
      profile.before(step)
      assert not profile.on
      profile.after(step, None)
  assert 'not profiled' in caplog.text and 'torch' in caplog.text
  assert not os.path.exists(os.path.join(tmp_path, 'profile'))


# ----------------------------------------------------------------------------------------------------------
# float16 with dynamic loss scaling (jmp), keep-best checkpoints.


@pytest.mark.slow
def test_float16_step_skips_an_overflow_halves_the_scale_and_stops_on_a_real_divergence():
  model = models.get_model('vgg11', **{**SMALL, 'dtype': 'float16'})
  mesh = parallel.make_mesh()
  tx = optim.make_optimizer(_opt())
  step = train.make_train_step(model, tx, mesh)
  # A huge initial scale: the float16 backward pass overflows, the step is skipped and the scale halves.
  state = train.create_train_state(model, tx, mesh, seed=0, loss_scale=2.0 ** 100)
  before = jax.device_get(state.params)
  state, m = step(state, parallel.global_batch(_batch(), mesh), np.float32(0.05))
  assert (int(m['overflow']), int(m['skipped']), int(m['fault'])) == (1, 0, 0)
  assert float(m['loss_scale']) == 2.0 ** 100 and np.isfinite(float(m['loss']))
  scale = jax.device_get(state.loss_scale)
  assert (float(scale['scale']), int(scale['overflows']), int(scale['counter'])) == (2.0 ** 99, 1, 0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params), before)
  # A scale that fits: the update is applied, with the unscaled gradients (finite, not scaled up).
  state = state.replace(loss_scale=train.initial_loss_scale(2.0 ** 10))
  state, m = step(state, parallel.global_batch(_batch(), mesh), np.float32(0.05))
  assert (int(m['overflow']), int(m['skipped']), int(m['fault'])) == (0, 0, 0)
  assert 0 < float(m['grad_norm']) < 100 and int(jax.device_get(state.loss_scale['counter'])) == 1
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                                                      jax.tree_util.tree_leaves(before)))
  # A real divergence (a non-finite update) is a fault, not an overflow: nan_policy=stop stops the run.
  state, m = step(state, parallel.global_batch(_batch(), mesh), np.float32('inf'))
  assert (int(m['overflow']), int(m['fault'])) == (0, 3)
  with pytest.raises(train.NonFiniteError, match='non-finite update at step 2'):
    train._raise_fault(int(m['fault']), int(m['fault_step']), 'stop')
  with pytest.raises(config_lib.ConfigError, match='config.train.loss_scale=0.5'):
    config = default.get_config()
    config.train.loss_scale = 0.5
    config_lib.validate(config)


class _Iterator:
  def get_state(self):
    return {'position': 0}

  def set_state(self, state):
    pass


def test_keep_best_keeps_the_best_val_top1_beside_the_last_k(tmp_path):
  workdir = tmp_path / 'run'
  ckpt = checkpoints.TrainCheckpointer(str(workdir), keep=2, async_save=False, keep_best=True)
  state = {'params': {'w': np.zeros(3, np.float32)}}
  for step, top1 in [(1, 0.5), (2, 0.9), (3, None), (4, 0.6), (5, 0.7)]:
    ckpt.save(step, state, _Iterator(), {}, metrics=None if top1 is None else {'step': step, 'val_top1': top1,
                                                                              'lr_reduced': False})
  ckpt.close()
  assert sorted(ckpt.manager.all_steps()) == [2, 4, 5]  # the last 2, and step 2's best val top-1
  (workdir / 'config.json').write_text('{}')
  assert checkpoints.best_step(workdir) == 2
  assert checkpoints._resolve(workdir / 'best')[1:] == (checkpoints.absolute(workdir), 2)
  assert checkpoints._resolve(workdir)[2] == 5
  # Without keep_best: the last K only; WORKDIR/best then has nothing to name.
  plain = tmp_path / 'plain'
  ckpt = checkpoints.TrainCheckpointer(str(plain), keep=2, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, state, _Iterator(), {})
  ckpt.close()
  (plain / 'config.json').write_text('{}')
  assert sorted(ckpt.manager.all_steps()) == [2, 3]
  with pytest.raises(FileNotFoundError, match='train.keep_best=True'):
    checkpoints._resolve(plain / 'best')
