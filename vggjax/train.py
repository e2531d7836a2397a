"""Training: the train state, the jitted data-parallel train and eval steps, and the loop.

Why one module of about 600 lines: the train state, the step functions and the loop share the state's
sharding and the fault bookkeeping, and notebooks import them from one place; checkpointing (checkpoints.py),
the data (data/), the settings (settings.py) and the run directory (rundir.py) live apart.

Plain functions a notebook can import (create_train_state, make_train_step, make_eval_step, evaluate,
train_and_evaluate); main.py only parses flags and calls train_and_evaluate.

* The train state is a pytree (TrainState), initialised by a jitted init straight into its replicated
  sharding (no host copy first), donated to every step.
* The step takes uint8 images sharded on 'data'; the cast, AlexNet's colour shift and the mean subtraction
  run inside it (docs/design.md, decision 4). Its randomness is fold_in(rng, step): a resumed run repeats it.
* The learning rate is an argument (no recompilation when a schedule changes it).
* A non-finite loss, gradient or update never reaches the parameters: that step's update is dropped and the
  first fault's step and kind are kept in the state; the host reads them at each log step and stops
  ('stop', all later updates are dropped too, so nothing after the fault is learnt) or counts them ('skip').
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import PartitionSpec as P

from vggjax import checkpoints, models, optim, parallel, preemption, rundir, settings
from vggjax import runlog as vlog
from vggjax.evaluation import inference
from vggjax.evaluation.evaluators import EvalInterrupted, ValidationEvaluator  # noqa: F401 - train's names
from vggjax.preprocessing import IMAGENET_EIGVAL, IMAGENET_EIGVEC, Normalization, normalize, pca_lighting

if TYPE_CHECKING:  # configs are ml_collections ConfigDicts; the step functions need no ml_collections
  import ml_collections

log = logging.getLogger('vggjax')
FAULTS = {1: 'loss', 2: 'gradients', 3: 'update'}


class NonFiniteError(RuntimeError):
  """The loss or the gradients became NaN or Inf."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # a raw uint32[2] key: every step's randomness is fold_in(rng, step)
  fault: jax.Array  # 0, or the kind of the first non-finite quantity (FAULTS)
  fault_step: jax.Array  # the step of the first fault, -1 if none

  @property
  def variables(self) -> dict:
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v


def build_model(config: ml_collections.ConfigDict, **overrides) -> models.VGG:
  m = settings.ModelSettings.from_config(config.model)
  options = dict(num_classes=m.num_classes, width=m.width, fc_features=m.fc_features or None,
                 image_size=settings.DataSettings.from_config(config.data).image_size,
                 dropout_rate=m.dropout_rate, dtype=m.dtype, init=m.init, init_std=m.init_std)
  if m.pool_ceil:
    options['pool_ceil'] = True
  if m.head != 'classify':  # localisation (paper Appendix A): fc8 regresses boxes
    from vggjax import localization_model
    options['num_classes'] = localization_model.box_outputs(m.head, m.num_classes)
  options.update(overrides)
  return models.get_model(m.name, **options)


def normalization(config: ml_collections.ConfigDict) -> Normalization:
  d = settings.DataSettings.from_config(config.data)
  return Normalization.from_rgb(d.mean_rgb, d.std_rgb, d.color_order)


def _init_state(model: models.VGG, tx: optax.GradientTransformation, key: jax.Array) -> TrainState:
  init_key, state_key = jax.random.split(key)
  size = model.image_size
  variables = model.init({'params': init_key}, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=state_key,
                    fault=jnp.zeros((), jnp.int32), fault_step=jnp.full((), -1, jnp.int32))


def create_train_state(model: models.VGG, tx: optax.GradientTransformation, mesh, seed: int) -> TrainState:
  """Initialises parameters and optimizer state with one jitted call, directly replicated on the mesh."""
  init = functools.partial(_init_state, model, tx)
  return jax.jit(init, out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(seed))


def abstract_train_state(model: models.VGG, tx: optax.GradientTransformation, mesh) -> TrainState:
  """The train state's shapes, dtypes and shardings, without allocating it (the target of a restore)."""
  shapes = jax.eval_shape(functools.partial(_init_state, model, tx), jax.random.PRNGKey(0))
  rep = parallel.replicated(mesh)
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


# The objective of config.model.head: class scores with cross-entropy ('classify', the default), or boxes
# (paper Appendix A: 'scr', 'pcr') with the Euclidean loss. A box example's targets travel through the step as
# one float row [label, cx, cy, w, h, valid], so micro-batches split them as they split labels.


def step_targets(batch: dict, head: str = 'classify') -> jax.Array:
  if head == 'classify':
    return batch['label']
  return jnp.concatenate([batch['label'][:, None].astype(jnp.float32), batch['box'].astype(jnp.float32),
                          batch['box_valid'][:, None].astype(jnp.float32)], axis=1)


def per_example_loss(outputs: jax.Array, targets: jax.Array, head: str = 'classify') -> jax.Array:
  """Cross-entropy, or half the squared distance of the class's box to the target (0 where the crop kept
  no box: such examples are masked out of the loss)."""
  if head == 'classify':
    return _cross_entropy(outputs, targets)
  from vggjax import localization_model as lm
  pred = lm.class_box(outputs, targets[:, 0].astype(jnp.int32), head)
  return lm.euclidean_loss(pred, targets[:, 1:5]) * targets[:, 5]


def per_example_hits(outputs: jax.Array, targets: jax.Array, head: str = 'classify') -> jax.Array:
  """Top-1 correct, or (boxes) the class's box overlaps the target by IoU > 0.5 (the class given)."""
  if head == 'classify':
    return jnp.argmax(outputs, -1) == targets
  from vggjax import localization_model as lm
  pred = lm.class_box(outputs, targets[:, 0].astype(jnp.int32), head)
  return (lm.box_iou(pred, targets[:, 1:5]) > 0.5) & (targets[:, 5] > 0)


def make_train_step(model: models.VGG, tx: optax.GradientTransformation, mesh, *,
                    norm: Normalization = Normalization(), color_shift: float = 0.1, remat: bool = False,
                    nan_policy: str = 'stop', accumulate_steps: int = 1,
                    eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC, head: str = 'classify') -> Callable:
  """The jitted step: (state, batch {'image': uint8, 'label': int32}, lr) -> (state, metrics).

  head: 'classify', or 'scr'/'pcr' for a box net (batches also hold 'box' and 'box_valid'; see
  per_example_loss; train_top1 is then the fraction of crops whose box has IoU > 0.5 with the true box).

  Freezing: with a transformation from optim.make_optimizer(..., trainable=...), only the trainable layers
  are differentiated and updated; the others are constants of the step.

  Gradient accumulation (``accumulate_steps`` = k): the global batch is split into k micro-batches
  (micro-batch j holds examples j, j+k, j+2k, ..., so each device keeps its share of every one), run one
  after another inside the step (lax.scan), and their gradients summed: one update per global batch, with
  the loss and gradients of the whole batch up to float rounding. Activation memory is that of one
  micro-batch. The colour shift is drawn for the whole batch and dropout per example (from the example's
  index in the global batch), so the randomness is the same for any k. Batch norm (the _bn nets) normalises
  each micro-batch with its own statistics and updates the running averages once per micro-batch, in
  order, as k forward passes of a small-batch run would; so for batch-norm nets k micro-batches are not one
  big batch.
  """
  has_bn = bool(model.batch_norm)
  patterns = optim.trainable_patterns(tx)
  k = int(accumulate_steps)
  if k < 1:
    raise ValueError(f'accumulate_steps={accumulate_steps} must be at least 1')

  def step_fn(state: TrainState, batch: dict, lr: jax.Array):
    rng = jax.random.fold_in(state.rng, state.step)
    color_rng, dropout_rng = jax.random.split(rng)
    images = pca_lighting(color_rng, batch['image'].astype(jnp.float32), color_shift, eigval, eigvec)
    x = normalize(images, norm)
    labels = step_targets(batch, head)
    n = batch['image'].shape[0]
    if n % k:
      raise ValueError(f'the batch of {n} does not split into {k} micro-batches (train.accumulate_steps)')
    ids = jnp.arange(n, dtype=jnp.int32)
    train_params, frozen_params = optim.split_trainable(state.params, patterns)

    def loss_fn(p, stats, x, labels, ids):
      """The micro-batch's summed loss / n (so the micro-batches' sum is the batch mean)."""
      variables = {'params': {**frozen_params, **p}}
      kw = dict(train=True, rngs={'dropout': dropout_rng}, example_ids=ids)
      if has_bn:
        variables['batch_stats'] = stats
        logits, new_vars = model.apply(variables, x, mutable=['batch_stats'], **kw)
        stats = new_vars['batch_stats']
      else:
        logits = model.apply(variables, x, **kw)
      return per_example_loss(logits, labels, head).sum() / n, (logits, stats)

    if remat:  # keep only the pooled output of each conv block; recompute inside blocks
      loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.save_only_these_names('block_out'))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
      (loss, (logits, new_stats)), grads = grad_fn(train_params, state.batch_stats, x, labels, ids)
      hits = jnp.sum(per_example_hits(logits, labels, head).astype(jnp.float32))
    else:
      def split(a):  # (n, ...) -> (k, n/k, ...): micro-batch j = examples j, j+k, ...
        a = a.reshape((n // k, k) + a.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(a, 0, 1),
                                                jax.sharding.NamedSharding(mesh, P(None, parallel.DATA_AXIS)))

      def body(carry, micro):
        loss_sum, hit_sum, grad_sum, stats = carry
        (loss, (logits, stats)), g = grad_fn(train_params, stats, *micro)
        grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, g)
        hits = jnp.sum(per_example_hits(logits, micro[1], head).astype(jnp.float32))
        return (loss_sum + loss, hit_sum + hits, grad_sum, stats), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, train_params)
      init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros, state.batch_stats)
      micro = jax.tree_util.tree_map(split, (x, labels, ids))
      (loss, hits, grads, new_stats), _ = jax.lax.scan(body, init, micro)
    opt_state = optim.set_learning_rate(state.opt_state, lr)
    updates, new_opt_state = tx.update(grads, opt_state, train_params)
    new_params = {**frozen_params, **optax.apply_updates(train_params, updates)}
    grad_norm = optax.global_norm(grads)
    fault_now = jnp.select([~jnp.isfinite(loss), ~_all_finite(grads), ~_all_finite(updates)], [1, 2, 3],
                           0).astype(jnp.int32)
    ok = fault_now == 0
    if nan_policy == 'stop':
      ok = ok & (state.fault == 0)
    if has_bn and patterns:  # a frozen layer's batch norm keeps its running statistics too
      new_stats = {name: (v if optim.is_trainable(name, patterns) else state.batch_stats[name])
                   for name, v in new_stats.items()}
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    first = (state.fault == 0) & (fault_now != 0)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        batch_stats=keep(new_stats, state.batch_stats), opt_state=keep(new_opt_state, opt_state),
        fault=jnp.where(first, fault_now, state.fault),
        fault_step=jnp.where(first, state.step, state.fault_step))
    metrics = {'loss': loss, 'train_top1': hits / n,
               'grad_norm': grad_norm, 'skipped': 1 - ok.astype(jnp.int32),
               'fault': new_state.fault, 'fault_step': new_state.fault_step}
    return new_state, metrics

  rep = parallel.replicated(mesh)
  return jax.jit(step_fn, donate_argnums=0, out_shardings=(rep, rep))


def make_eval_step(model: models.VGG, mesh, norm: Normalization = Normalization(),
                   head: str = 'classify') -> Callable:
  """The jitted eval step: (variables, batch with 'mask') -> sums of top-1/top-5 hits, loss and count."""
  if head != 'classify':
    return _make_box_eval_step(model, mesh, norm, head)
  k = min(5, model.num_classes)

  def eval_fn(variables, batch):
    logits = inference.logits(model, variables, batch['image'], norm)
    labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
    topk = jax.lax.top_k(logits, k)[1]
    hits = topk == labels[:, None]
    return {'top1': jnp.sum(hits[:, 0] * mask), 'top5': jnp.sum(jnp.any(hits, -1) * mask),
            'loss': jnp.sum(_cross_entropy(logits, labels) * mask), 'count': jnp.sum(mask)}

  return jax.jit(eval_fn, out_shardings=parallel.replicated(mesh))


def _make_box_eval_step(model: models.VGG, mesh, norm: Normalization, head: str) -> Callable:
  """A box net's eval step on central crops: 'top1' (and 'top5', the same: the class is given) counts the
  crops whose box for the true class overlaps the true box by IoU > 0.5; 'iou' sums the IoUs; 'loss' the
  Euclidean loss."""
  from vggjax import localization_model as lm

  def eval_fn(variables, batch):
    outputs = model.apply(variables, normalize(batch['image'], norm), train=False)
    targets, mask = step_targets(batch, head), batch['mask'].astype(jnp.float32)
    hits = per_example_hits(outputs, targets, head).astype(jnp.float32) * mask
    iou = lm.box_iou(lm.class_box(outputs, batch['label'], head), batch['box']) * targets[:, 5] * mask
    return {'top1': jnp.sum(hits), 'top5': jnp.sum(hits), 'iou': jnp.sum(iou),
            'loss': jnp.sum(per_example_loss(outputs, targets, head) * mask), 'count': jnp.sum(mask)}

  return jax.jit(eval_fn, out_shardings=parallel.replicated(mesh))


def evaluate(eval_step: Callable, variables: dict, batches, mesh,
             stop: Callable[[], bool] | None = None) -> dict:
  """Top-1/top-5 accuracy and loss over every example of a split (padding masked, never dropped): the
  ValidationEvaluator of `eval_step` over `batches`. `stop` is polled before each batch (host-only, no device
  wait): True raises EvalInterrupted."""
  return ValidationEvaluator(eval_step, mesh, lambda: batches).run(variables, stop=stop)


def parse_init_layers(spec) -> str | tuple[str, ...]:
  """config.init_layers: 'paper' (the paper's warm start of B-E from A: conv1_1, conv2_1, conv3_1, conv3_2,
  fc6, fc7, fc8), 'all' (every layer whose name and shape match), or layer names ('conv1_1,fc6' or a
  sequence). Returns 'all' or a tuple of names."""
  if isinstance(spec, str):
    key = spec.strip().strip('()[]').strip('\'"').strip()
    if key in ('all', 'paper'):
      return 'all' if key == 'all' else models.WARM_START_LAYERS
    spec = spec.strip().strip('()[]').split(',')
  names = tuple(n.strip().strip('\'"').strip() for item in spec for n in str(item).split(','))
  names = tuple(n for n in names if n)
  if names in (('all',), ('paper',)):
    return parse_init_layers(names[0])
  if not names:
    raise ValueError("init_layers is empty: use 'paper', 'all' or layer names")
  return names


def _matching_layers(src: dict, params: dict, stats: dict) -> tuple[list[str], list[str]]:
  """init_layers='all': (layers whose every variable matches by name and shape, [why each other is fresh])."""
  copied, fresh = [], []
  for layer in list(params) + [s for s in stats if s not in params]:
    own = {**params.get(layer, {}), **stats.get(layer, {})}
    theirs = {**src.get('params', {}).get(layer, {}), **src.get('batch_stats', {}).get(layer, {})}
    if not theirs:
      fresh.append(f'{layer} (not in the source)')
    elif set(theirs) != set(own):
      fresh.append(f'{layer} (variables {sorted(theirs)} there, {sorted(own)} here)')
    elif any(tuple(np.shape(theirs[k])) != tuple(np.shape(own[k])) for k in own):
      k = next(k for k in own if tuple(np.shape(theirs[k])) != tuple(np.shape(own[k])))
      fresh.append(f'{layer} ({k} {tuple(np.shape(theirs[k]))} there, {tuple(np.shape(own[k]))} here)')
    else:
      copied.append(layer)
  return copied, fresh


def warm_start(state: TrainState, source: str, layers, mesh, norm: Normalization | None = None,
               model_name: str | None = None) -> TrainState:
  """Copies layers from another run's (or a weights directory's) parameters; the rest stay fresh.

  ``layers`` (config.init_layers): 'paper' (default: conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8 of
  net A into B-E, paper 3.1), 'all' (every layer whose name and shape match: the S=384 net from the S=256
  net, multi-scale from S=384, transfer to another number of classes keeps its new fc8), or layer names
  (each must exist in both with the same shape)."""
  layers = parse_init_layers(layers)
  src, meta = checkpoints.load_weights(source)
  src_norm = checkpoints.normalization_from_meta(meta)
  src_name = (meta.get('model') or {}).get('name')
  if norm is not None and not src_norm.equivalent(norm):
    log.warning('warm start: %s was trained on inputs normalised as %s, this run feeds %s; set '
                'config.data.mean_rgb/std_rgb/color_order to match unless that is intended', source,
                src_norm, norm)
  params = flax.core.unfreeze(jax.device_get(state.params))
  stats = flax.core.unfreeze(jax.device_get(state.batch_stats)) if state.batch_stats else {}
  fresh: list[str] = []
  if layers == 'all':
    layers, fresh = _matching_layers(src, params, stats)
    if not layers:
      raise ValueError(f'warm start: no layer of {source} matches this model by name and shape '
                       f'({"; ".join(fresh)})')
    if model_name and src_name and models.canonical_name(src_name) != models.canonical_name(model_name):
      log.warning("warm start: init_layers='all' from %s into %s copies %d layers by name and shape; the "
                  "paper's warm start of a deeper net from A copies only %s (init_layers='paper')",
                  src_name, model_name, len(layers), ', '.join(models.WARM_START_LAYERS))
  for layer in layers:
    if layer not in params and layer not in stats:
      raise ValueError(f'warm start: layer {layer} is not in this model ({", ".join(params)})')
    found = False
    for coll, target in (('params', params), ('batch_stats', stats)):
      for name, value in src.get(coll, {}).get(layer, {}).items():
        found = True
        want = target[layer][name].shape
        if tuple(value.shape) != tuple(want):
          raise ValueError(f'warm start: {layer}/{name} has shape {tuple(value.shape)} in {source} but '
                           f'{tuple(want)} in this model')
        target[layer][name] = np.asarray(value, target[layer][name].dtype)
    if not found:
      raise ValueError(f'warm start: layer {layer} is not in {source} ({", ".join(src["params"])})')
  log.info('warm start from %s (%s): copied %d layers: %s%s', source, src_name, len(layers),
           ', '.join(layers), f'; fresh: {", ".join(fresh)}' if fresh else '')
  rep = parallel.replicated(mesh)
  return state.replace(params=jax.device_put(params, rep),
                       batch_stats=jax.device_put(stats, rep) if stats else state.batch_stats)


DEEP_NETS = ('vgg13', 'vgg16_c', 'vgg16', 'vgg19')  # B-E: the nets the paper warm-starts from A


def warn_deep_from_scratch(config: ml_collections.ConfigDict) -> bool:
  """Logs a warning (and returns True) when a deep net (B-E, no batch norm) with the paper's Gaussian init
  starts from scratch: the case the paper (3.1) says stalls ("bad initialisation can stall learning due to
  the instability of gradient in deep nets")."""
  name = models.canonical_name(config.model.name)
  if name not in DEEP_NETS or config.init_from or config.model.init != 'paper':
    return False
  log.warning('%s (net %s) starts from scratch with the paper\'s Gaussian init (std %g): the paper (3.1) '
              'trains only net A this way, because bad initialisation stalls deep nets, and initialises '
              'B-E from A. Either --config.init_from=A_RUN (a trained vgg11 run: conv1_1, conv2_1, '
              'conv3_1, conv3_2, fc6, fc7, fc8 are copied) or --config.model.init=glorot (the paper\'s '
              'note: Glorot init trains without pre-training).', name, models.ARCHS[name].paper_name,
              config.model.init_std)
  return True




@dataclasses.dataclass
class RunResult:
  step: int
  epoch: float
  metrics: dict
  preempted: bool = False
  skipped_images: int = 0  # unreadable training images skipped over the whole run (all processes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains (or resumes) the run in `workdir` and evaluates it as it goes. Returns the last metrics."""
  from vggjax import config_lib
  from vggjax.data import pipeline  # the data layer (imported here: the step functions need none of it)

  config_lib.validate(config)
  config_lib.check_init_required(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  info = pipeline.dataset_info(config.data)
  config = config_lib.resolve(config, info.num_classes)
  # The config read once: typed settings below (each default defined in configs/default.py).
  data = settings.DataSettings.from_config(config.data)
  t = settings.TrainSettings.from_config(config.train)
  m = settings.ModelSettings.from_config(config.model)
  seed = int(settings.value(config, 'seed'))
  mesh = parallel.make_mesh()
  parallel.check_batch_size(t.global_batch_size, mesh)
  steps_per_epoch = rundir.steps_per_epoch(info.num_train, t.global_batch_size)
  if steps_per_epoch == 0:
    raise config_lib.ConfigError(f'config.train.global_batch_size={t.global_batch_size} is larger than the '
                                 f'training split ({info.num_train} examples)')
  total_steps = rundir.total_steps(t.max_steps, t.num_epochs, steps_per_epoch)
  eval_every = t.eval_every_steps or steps_per_epoch

  model = build_model(config)
  tx = optim.make_optimizer(config.optimizer, trainable=t.trainable)
  if optim.trainable_patterns(tx):
    optim.check_patterns(list(models.variable_shapes(model)['params']), optim.trainable_patterns(tx))
  accumulate = t.accumulate_steps
  parallel.check_batch_size(t.global_batch_size // accumulate, mesh)
  schedule = optim.Schedule.from_config(config.optimizer, steps_per_epoch, total_steps)
  norm = normalization(config)
  train_step = make_train_step(model, tx, mesh, norm=norm, color_shift=data.color_shift,
                               remat=m.remat, nan_policy=t.nan_policy, accumulate_steps=accumulate,
                               eigval=data.pca_eigval, eigvec=data.pca_eigvec, head=m.head)
  eval_model = build_model(config, dropout_rate=0.0)
  eval_step = make_eval_step(eval_model, mesh, norm, head=m.head)
  it = pipeline.train_iterator(data, global_batch_size=t.global_batch_size, seed=seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
  ckpt = checkpoints.TrainCheckpointer(workdir, keep=t.keep_checkpoints)
  writer = vlog.MetricWriter(workdir, enabled=is_main)
  start = ckpt.latest_step()
  history: list[dict] = []
  pending_eval = False
  skipped_before = 0  # unreadable training images skipped before this process started (a resumed run)
  if start is not None:
    state, host = ckpt.restore(start, abstract_train_state(model, tx, mesh), it)
    schedule.load_state_dict(host.get('schedule', {}))
    history = host.get('evals', [])
    skipped_before = int(host.get('skipped_images', 0))
    pending_eval = bool(host.get('pending_eval'))  # preempted during this step's evaluation: run it again
    writer.truncate_after(start)
    log.info('resumed from %s at step %d', ckpt.manager.directory, start)
  else:
    start = 0
    warn_deep_from_scratch(config)
    state = create_train_state(model, tx, mesh, seed)
    if settings.value(config, 'init_from'):
      state = warm_start(state, config.init_from, settings.value(config, 'init_layers'), mesh, norm,
                         model_name=m.name)
  if is_main:
    config_lib.write(config, workdir, {'labels': info.class_names,
                                       'dataset': {'num_train': info.num_train, 'num_eval': info.num_eval}})
  log.info('%s: %s parameters, %d devices over %d processes, %d steps/epoch, %d steps',
           m.name, f'{models.param_count(model):,}', mesh.devices.size, jax.process_count(),
           steps_per_epoch, total_steps)

  def skipped_images() -> int:
    """Unreadable training images skipped so far in the run (all processes; the same point on each)."""
    return skipped_before + parallel.sum_over_processes(it.skipped)

  def host_state():
    return {'schedule': schedule.state_dict(), 'evals': history, 'epoch': step / steps_per_epoch,
            'pending_eval': pending_eval, 'skipped_images': skipped_images()}

  def run_eval(step: int) -> dict:
    batches = pipeline.eval_iterator(data, global_batch_size=t.global_batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count())
    log.info('step %d: evaluating on %s', step, data.eval_split)
    result = evaluate(eval_step, state.variables, batches, mesh, stop=stop.in_eval)
    reduced = schedule.on_eval(result['val_top1'])
    row = {'step': step, 'epoch': step / steps_per_epoch, **result, 'lr_reduced': reduced}
    skipped = parallel.sum_over_processes(batches.skipped)
    if skipped:  # unreadable validation images (left out of val_count)
      row['val_skipped_images'] = skipped
    history.append(row)
    writer.write(row)
    log.info('step %d: val top-1 %.4f, top-5 %.4f (%d images)%s', step, result['val_top1'],
             result['val_top5'], result['val_count'], ' -> lr reduced' if reduced else '')
    return row

  stop = preemption.StopRequest()
  stop.attach(ckpt.manager)  # Orbax's own preemption queries would break the sync point ids (preemption.py)
  bar = vlog.ProgressBar(total_steps, start=start, enabled=is_main)
  step, last_eval, preempted = start, None, False
  window: list[dict] = []
  t_log, step_log = time.time(), start
  pending = None  # a logging window whose metrics are read once the next step is queued
  skipped_logged = skipped_before  # unreadable training images up to the last row written

  def flush():
    """Writes the pending window's row. Called after the next step is dispatched, so reading the metrics
    waits only for the window's last step while the device already works on the next one: no bubble."""
    nonlocal pending, t_log, step_log, skipped_logged
    if pending is None:
      return
    metrics, end, lr, skipped_local = pending
    pending = None
    host = parallel.to_host(metrics)
    last = host[-1]
    _raise_fault(int(last['fault']), int(last['fault_step']), t.nan_policy)
    now = time.time()
    row = {'step': end, 'epoch': end / steps_per_epoch, 'lr': lr,
           'loss': float(np.mean([m['loss'] for m in host])),
           'train_top1': float(np.mean([m['train_top1'] for m in host])),
           'grad_norm': float(np.mean([m['grad_norm'] for m in host])),
           'img_per_s': (end - step_log) * t.global_batch_size / max(now - t_log, 1e-9)}
    skipped = int(sum(m['skipped'] for m in host))
    if skipped:
      row['skipped_steps'] = skipped
    skipped_total = skipped_before + parallel.sum_over_processes(skipped_local)
    if skipped_total > skipped_logged:  # unreadable images replaced in this window's batches
      row['skipped_images'] = skipped_total - skipped_logged
    skipped_logged = skipped_total
    writer.write(row)
    bar.update(end, epoch=round(row['epoch'], 2), loss=row['loss'], lr=lr,
               **{'img/s': round(row['img_per_s'], 1)})
    t_log, step_log = now, end

  try:
    if pending_eval:  # the evaluation a preemption interrupted: the schedule must see it
      try:
        last_eval = run_eval(step)
        pending_eval = False
        ckpt.resave(step, state, it, host_state())
      except EvalInterrupted:
        preempted = True
        log.warning('stopped during the evaluation of step %d for preemption; the same command resumes', step)
    while step < total_steps and not preempted:
      batch = parallel.global_batch(next(it), mesh)
      lr = schedule.lr(step)
      state, metrics = train_step(state, batch, np.float32(lr))
      step += 1
      if step == start + 1:  # a marker for whoever waits for the loop (the signal handler is installed)
        log.info('training started at step %d', start)
      flush()
      window.append(metrics)
      if step % t.log_every_steps == 0 or step == total_steps:
        pending, window = (window, step, lr, it.skipped), []
      evaluate_now = step % eval_every == 0 or step == total_steps
      preempted = stop.requested(step)
      epoch_end = t.checkpoint_every_epoch and step % steps_per_epoch == 0
      save_now = step % t.checkpoint_every_steps == 0 or epoch_end or step == total_steps or preempted
      if evaluate_now or save_now:  # both wait for the device anyway
        flush()
      if evaluate_now:
        try:
          last_eval = run_eval(step)
        except EvalInterrupted:  # checkpoint without it; the resumed run evaluates this step first
          pending_eval = preempted = save_now = True
          log.warning('evaluation of step %d interrupted by a preemption notice', step)
        t_log = time.time()  # evaluation time is not training throughput
      if save_now:
        _check_faults(state, t.nan_policy)
        ckpt.save(step, state, it, host_state())
        writer.flush()  # on gs://, where rows are uploaded in batches: every row up to the checkpoint
      if preempted:
        log.warning('stopped at step %d for preemption; the same command resumes', step)
        break
  finally:
    ckpt.close()
    bar.close()
    stop.restore()
  if is_main and t.plot and not preempted:
    vlog.plot_curves(workdir)
  writer.close()
  return RunResult(step=step, epoch=step / steps_per_epoch, metrics=last_eval or {}, preempted=preempted,
                   skipped_images=skipped_images())


def _check_faults(state: TrainState, policy: str) -> None:
  fault, at = (int(x) for x in jax.device_get((state.fault, state.fault_step)))
  _raise_fault(fault, at, policy)


def _raise_fault(fault: int, at: int, policy: str) -> None:
  if fault and policy == 'stop':
    raise NonFiniteError(
        f'non-finite {FAULTS[fault]} at step {at} (the update of step {at} and later were not applied); '
        f'the last good checkpoint is kept. Lower optimizer.lr, or set train.nan_policy=skip to drop such '
        f'steps and go on.')
