"""The train state and the jitted data-parallel train and eval steps (the loop is ``vggjax.train``, which
exports these names too).

* The train state is a pytree (TrainState), initialised by a jitted init straight into its replicated
  sharding (no host copy first), donated to every step.
* The step takes uint8 images sharded on 'data'; the cast, AlexNet's colour shift and the mean subtraction
  run inside it (docs/design.md, decision 4). Its randomness is fold_in(rng, step): a resumed run repeats it.
* The learning rate is an argument (no recompilation when a schedule changes it).
* A non-finite loss, gradient or update never reaches the parameters: that step's update is dropped and the
  first fault's step and kind are kept in the state (FAULTS); the loop reads them at each log step and stops
  or counts them (train.nan_policy).
* model.dtype=float16: dynamic loss scaling (jmp.DynamicLossScale, kept in state.loss_scale). A step whose
  gradients overflow while its loss is finite is skipped and counted (state.loss_scale['overflows'], the
  metric 'overflow'), and the scale halves; it doubles after 2000 good steps. Only a non-finite loss, an
  overflow at the smallest scale (1) or a non-finite update is a fault for train.nan_policy.
* The objective is the head's (localization_model.get_head): the steps never branch on the head.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jmp
import optax
from jax.sharding import PartitionSpec as P

from vggjax import localization_model, models, optim, parallel
from vggjax.evaluation import inference
from vggjax.preprocessing import IMAGENET_EIGVAL, IMAGENET_EIGVEC, Normalization, normalize, pca_lighting

FAULTS = {1: 'loss', 2: 'gradients', 3: 'update'}
MIN_LOSS_SCALE = 1.0  # float16: an overflow at this scale is a divergence, not an overflow

@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # a raw uint32[2] key: every step's randomness is fold_in(rng, step)
  fault: jax.Array  # 0, or the kind of the first non-finite quantity (FAULTS)
  fault_step: jax.Array  # the step of the first fault, -1 if none
  # train.ema_decay > 0: the exponential moving average of params, updated after each applied step ({}: none)
  ema_params: Any = flax.struct.field(default_factory=dict)
  # model.dtype=float16: the dynamic loss scale {'scale', 'counter' (good steps since the last change),
  # 'overflows' (steps skipped for an overflow)}; {}: no loss scaling
  loss_scale: Any = flax.struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    v = {'params': self.params}
    if self.batch_stats:
      v['batch_stats'] = self.batch_stats
    return v

  @property
  def ema_variables(self) -> dict:
    """The variables with the EMA parameters (batch statistics: the trained net's)."""
    return {**self.variables, 'params': self.ema_params}


def initial_loss_scale(scale: float) -> dict:
  """state.loss_scale at the start of a float16 run (scale 0: no loss scaling, {})."""
  if not scale:
    return {}
  return {'scale': jnp.asarray(scale, jnp.float32), 'counter': jnp.zeros((), jnp.int32),
          'overflows': jnp.zeros((), jnp.int32)}


def _init_state(model: models.VGG, tx: optax.GradientTransformation, key: jax.Array,
                ema: bool = False, loss_scale: float = 0.0) -> TrainState:
  init_key, state_key = jax.random.split(key)
  size = model.image_size
  variables = model.init({'params': init_key}, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params), rng=state_key,
                    fault=jnp.zeros((), jnp.int32), fault_step=jnp.full((), -1, jnp.int32),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else {},
                    loss_scale=initial_loss_scale(loss_scale))


def create_train_state(model: models.VGG, tx: optax.GradientTransformation, mesh, seed: int,
                       ema: bool = False, loss_scale: float = 0.0) -> TrainState:
  """Initialises parameters and optimizer state with one jitted call, directly replicated on the mesh
  (``ema``: with an EMA of the parameters, starting at them; ``loss_scale`` > 0: dynamic loss scaling from
  that scale, for float16)."""
  init = functools.partial(_init_state, model, tx, ema=ema, loss_scale=loss_scale)
  key = jax.random.PRNGKey(seed)
  lowered = jax.jit(init, out_shardings=parallel.replicated(mesh)).lower(key)
  return lowered.compile(compiler_options=init_compiler_options(mesh, lowered.out_info.params))(key)


# On a CPU, LLVM's default optimisation makes the init's compile slow and gains it nothing: the random draws
# of every layer's initializer take 7-10 s to compile for a 1/8-width VGG (16-19 s on a loaded machine), whose
# init then runs in 10 ms; at XLA's backend optimisation level 0 the compile takes 1.0-1.3 s. Level 0 runs
# the draws slower (VGG16 at full size: 6.5-7.2 s instead of 1.6-1.8 s, for a compile of 1.4-1.6 s instead of
# 4.3-5.9 s), so it is used up to INIT_FAST_COMPILE_PARAMS parameters, where the time it adds to the run stays
# under a second (BENCHMARKS.md, "The init's compile on a CPU"). Other platforms compile as always.
INIT_FAST_COMPILE_PARAMS = 20_000_000


def init_compiler_options(mesh, params) -> dict | None:
  """XLA options for compiling the init (None: the defaults): see INIT_FAST_COMPILE_PARAMS."""
  if mesh.devices.flat[0].platform != 'cpu':
    return None
  size = sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))
  return {'xla_backend_optimization_level': 0} if size <= INIT_FAST_COMPILE_PARAMS else None


def reset_ema(state: TrainState) -> TrainState:
  """The EMA restarted at the current parameters (after a warm start replaced them); no EMA: as it is."""
  if not state.ema_params:
    return state
  return state.replace(ema_params=jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p))(state.params))


def abstract_train_state(model: models.VGG, tx: optax.GradientTransformation, mesh,
                         ema: bool = False, loss_scale: float = 0.0) -> TrainState:
  """The train state's shapes, dtypes and shardings, without allocating it (the target of a restore)."""
  shapes = jax.eval_shape(functools.partial(_init_state, model, tx, ema=ema, loss_scale=loss_scale),
                          jax.random.PRNGKey(0))
  rep = parallel.replicated(mesh)
  return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


# The objective of config.model.head (localization_model.get_head): class scores with cross-entropy
# ('classify', the default), or boxes (paper Appendix A: 'scr', 'pcr') with the Euclidean loss.


def step_targets(batch: dict, head: str = 'classify') -> jax.Array:
  """What the step's outputs are trained against (labels; a box example's [label, box, valid] row)."""
  return localization_model.get_head(head).targets(batch)


def per_example_loss(outputs: jax.Array, targets: jax.Array, head: str = 'classify') -> jax.Array:
  """Cross-entropy, or half the squared distance of the class's box to the target (0 where the crop kept
  no box: such examples are masked out of the loss)."""
  return localization_model.get_head(head).loss(outputs, targets)


def per_example_hits(outputs: jax.Array, targets: jax.Array, head: str = 'classify') -> jax.Array:
  """Top-1 correct, or (boxes) the class's box overlaps the target by IoU > 0.5 (the class given)."""
  return localization_model.get_head(head).hits(outputs, targets)


def _micro_batches(grad_fn: Callable, hits_fn: Callable, params, stats, inputs: tuple, k: int, mesh):
  """(loss, hits, grads, batch_stats) of the batch ``inputs`` = (x, targets, ids), in k micro-batches (one
  after another, lax.scan; micro-batch j holds examples j, j+k, ...) whose losses, hits and gradients are
  summed; k = 1: the batch at once. grad_fn differentiates the (possibly loss-scaled) objective; its aux
  holds (outputs, batch_stats, the unscaled loss)."""
  if k == 1:
    (_, (outputs, stats, loss)), grads = grad_fn(params, stats, *inputs)
    return loss, jnp.sum(hits_fn(outputs, inputs[1]).astype(jnp.float32)), grads, stats
  n = inputs[0].shape[0]

  def split(a):  # (n, ...) -> (k, n/k, ...): micro-batch j = examples j, j+k, ...
    a = a.reshape((n // k, k) + a.shape[1:])
    return jax.lax.with_sharding_constraint(jnp.swapaxes(a, 0, 1),
                                            jax.sharding.NamedSharding(mesh, P(None, parallel.DATA_AXIS)))

  def body(carry, micro):
    loss_sum, hit_sum, grad_sum, stats = carry
    (_, (outputs, stats, loss)), g = grad_fn(params, stats, *micro)
    grad_sum = jax.tree_util.tree_map(jnp.add, grad_sum, g)
    hits = jnp.sum(hits_fn(outputs, micro[1]).astype(jnp.float32))
    return (loss_sum + loss, hit_sum + hits, grad_sum, stats), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros, stats)
  (loss, hits, grads, stats), _ = jax.lax.scan(body, init, jax.tree_util.tree_map(split, inputs))
  return loss, hits, grads, stats


def make_train_step(model: models.VGG, tx: optax.GradientTransformation, mesh, *,
                    norm: Normalization = Normalization(), color_shift: float = 0.1, remat: bool = False,
                    nan_policy: str = 'stop', accumulate_steps: int = 1,
                    eigval=IMAGENET_EIGVAL, eigvec=IMAGENET_EIGVEC, head: str = 'classify',
                    label_smoothing: float = 0.0, ema_decay: float = 0.0) -> Callable:
  """The jitted step: (state, batch {'image': uint8, 'label': int32}, lr) -> (state, metrics).

  Recipe knobs (0, the paper's, leaves the step as it was): ``label_smoothing`` (the classifier's targets,
  localization_model.Classify) and ``ema_decay`` (state.ema_params <- decay * ema + (1 - decay) * params
  after each applied update; a state from create_train_state(..., ema=True)).

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
  objective = localization_model.get_head(head, label_smoothing)
  patterns = optim.trainable_patterns(tx)
  k = int(accumulate_steps)
  if k < 1:
    raise ValueError(f'accumulate_steps={accumulate_steps} must be at least 1')

  def step_fn(state: TrainState, batch: dict, lr: jax.Array):
    rng = jax.random.fold_in(state.rng, state.step)
    color_rng, dropout_rng = jax.random.split(rng)
    images = pca_lighting(color_rng, batch['image'].astype(jnp.float32), color_shift, eigval, eigvec)
    x = normalize(images, norm)
    targets = objective.targets(batch)
    n = batch['image'].shape[0]
    if n % k:
      raise ValueError(f'the batch of {n} does not split into {k} micro-batches (train.accumulate_steps)')
    ids = jnp.arange(n, dtype=jnp.int32)
    train_params, frozen_params = optim.split_trainable(state.params, patterns)
    scaler = _loss_scaler(state.loss_scale)

    def loss_fn(p, stats, x, targets, ids):
      """The micro-batch's summed loss / n (so the micro-batches' sum is the batch mean)."""
      variables = {'params': {**frozen_params, **p}}
      kw = dict(train=True, rngs={'dropout': dropout_rng}, example_ids=ids)
      if has_bn:
        variables['batch_stats'] = stats
        outputs, new_vars = model.apply(variables, x, mutable=['batch_stats'], **kw)
        stats = new_vars['batch_stats']
      else:
        outputs = model.apply(variables, x, **kw)
      loss = objective.loss(outputs, targets).sum() / n
      return scaler.scale(loss), (outputs, stats, loss)

    if remat:  # keep only the pooled output of each conv block; recompute inside blocks
      loss_fn = jax.checkpoint(loss_fn, policy=jax.checkpoint_policies.save_only_these_names('block_out'))
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    loss, hits, grads, new_stats = _micro_batches(grad_fn, objective.hits, train_params, state.batch_stats,
                                                  (x, targets, ids), k, mesh)
    grads = scaler.unscale(grads)
    opt_state = optim.set_learning_rate(state.opt_state, lr)
    updates, new_opt_state = optim.update_trainable(tx, grads, opt_state, train_params, frozen_params)
    new_params = {**frozen_params, **optax.apply_updates(train_params, updates)}
    grad_norm = optax.global_norm(grads)
    fault_now, overflow = _faults(loss, grads, updates, scaler if state.loss_scale else None)
    ok = fault_now == 0
    if nan_policy == 'stop':
      ok = ok & (state.fault == 0)
    if has_bn and patterns:  # a frozen layer's batch norm keeps its running statistics too
      new_stats = {name: (v if optim.is_trainable(name, patterns) else state.batch_stats[name])
                   for name, v in new_stats.items()}
    skipped = 1 - ok.astype(jnp.int32)  # a fault's step (an overflow is counted apart)
    if state.loss_scale:
      ok = ok & ~overflow
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    first = (state.fault == 0) & (fault_now != 0)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        batch_stats=keep(new_stats, state.batch_stats), opt_state=keep(new_opt_state, opt_state),
        fault=jnp.where(first, fault_now, state.fault),
        fault_step=jnp.where(first, state.step, state.fault_step))
    if ema_decay:
      new_state = new_state.replace(ema_params=keep(
          optax.incremental_update(new_state.params, state.ema_params, 1.0 - ema_decay), state.ema_params))
    metrics = {'loss': loss, 'train_top1': hits / n,
               'grad_norm': grad_norm, 'skipped': skipped,
               'fault': new_state.fault, 'fault_step': new_state.fault_step}
    if state.loss_scale:
      new_state = new_state.replace(loss_scale=_next_loss_scale(state.loss_scale, scaler, grads, overflow))
      metrics.update(loss_scale=scaler.loss_scale, overflow=overflow.astype(jnp.int32))
    return new_state, metrics

  rep = parallel.replicated(mesh)
  return jax.jit(step_fn, donate_argnums=0, out_shardings=(rep, rep))


def _faults(loss, grads, updates, scaler) -> tuple[jax.Array, jax.Array | None]:
  """(the step's fault kind (FAULTS, 0: none), overflow). With a loss scaler (float16) an overflow (a finite
  loss, non-finite gradients, a scale above MIN_LOSS_SCALE) is skipped but is no fault."""
  if scaler is None:
    return jnp.select([~jnp.isfinite(loss), ~_all_finite(grads), ~_all_finite(updates)], [1, 2, 3],
                      0).astype(jnp.int32), None
  grads_finite = _all_finite(grads)
  overflow = jnp.isfinite(loss) & ~grads_finite & (scaler.loss_scale > MIN_LOSS_SCALE)
  return jnp.select([~jnp.isfinite(loss), ~grads_finite & ~overflow, ~overflow & ~_all_finite(updates)],
                    [1, 2, 3], 0).astype(jnp.int32), overflow


def _loss_scaler(loss_scale: dict):
  """jmp's dynamic loss scale of state.loss_scale (float16), or its no-op scale ({}: float32, bfloat16)."""
  if not loss_scale:
    return jmp.NoOpLossScale()
  return jmp.DynamicLossScale(loss_scale=loss_scale['scale'], counter=loss_scale['counter'],
                              min_loss_scale=jnp.asarray(MIN_LOSS_SCALE, jnp.float32))


def _next_loss_scale(loss_scale: dict, scaler, grads, overflow: jax.Array) -> dict:
  """state.loss_scale after a step: jmp's adjustment (halved on non-finite gradients, doubled after its
  period of finite steps), the overflow counted."""
  nxt = scaler.adjust(jmp.all_finite(grads))
  return {'scale': nxt.loss_scale, 'counter': nxt.counter.astype(jnp.int32),
          'overflows': loss_scale['overflows'] + overflow.astype(jnp.int32)}


def make_eval_step(model: models.VGG, mesh, norm: Normalization = Normalization(),
                   head: str = 'classify') -> Callable:
  """The jitted eval step: (variables, batch with 'mask') -> the head's sums (classify: top-1/top-5 hits and
  loss; a box head: box hits, IoU and loss) and the count of real examples."""
  objective = localization_model.get_head(head)

  def eval_fn(variables, batch):
    outputs = inference.logits(model, variables, batch['image'], norm)
    mask = batch['mask'].astype(jnp.float32)
    return {**objective.eval_sums(outputs, batch, mask), 'count': jnp.sum(mask)}

  return jax.jit(eval_fn, out_shardings=parallel.replicated(mesh))
