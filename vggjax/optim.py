"""The optimizer and learning-rate schedules of the paper (3.1), and the modern ones beside them.

* SGD with momentum and coupled L2 weight decay: the decay term is added to the gradient before momentum,
  as Caffe did (``optax.add_decayed_weights`` then ``optax.sgd``). By default only weights (conv and FC
  kernels) are decayed; biases and batch-norm parameters are not (``decay_biases``). The momentum buffer
  holds gradients (the optax/PyTorch convention); Caffe's holds lr-scaled steps. The two are identical while
  the learning rate is constant and differ only for a few steps after a reduction.
* The learning rate is an argument of the jitted step (a scalar array), so a schedule never recompiles:
  ``Schedule.lr(step)`` on the host, with the paper's reduce-on-plateau driven by validation top-1 through
  ``Schedule.on_eval``. Its state is a small JSON-able dict saved in every checkpoint.
* Freezing (``train.trainable``, layer-name patterns): the optimizer sees only the matching layers, so a
  frozen layer gets no update, no weight decay and no optimizer state (no momentum buffer: FC-only training
  of VGG-16 holds momentum for 120M parameters, not 138M). The paper's localisation net fine-tunes only the
  FC layers (``trainable='fc*'``); transfer learning often trains fc8 alone. This is optax's own
  ``multi_transform``: the trainable layers get the optimizer, the others ``set_to_zero``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import optax

SCHEDULES = ('plateau', 'step', 'cosine', 'constant')


def decay_mask(params: Any, decay_biases: bool = False) -> Any:
  """True for the leaves weight decay applies to: kernels always, biases/norm parameters if asked."""
  def leaf(path, _):
    name = getattr(path[-1], 'key', str(path[-1]))
    return decay_biases or name == 'kernel'
  return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(opt_cfg, trainable: str | Sequence[str] = '') -> optax.GradientTransformation:
  """SGD + momentum with coupled L2; the learning rate is injected (set it in opt_state each step).
  ``optimizer.clip_norm`` > 0 clips the gradients' global norm first (optax.clip_by_global_norm).
  ``trainable`` (``train.trainable``): layer-name patterns; only those layers are optimised (see freeze)."""
  decay = opt_cfg.weight_decay
  parts = []
  clip = float(getattr(opt_cfg, 'clip_norm', 0.0) or 0.0)
  if clip:  # the raw gradients' global norm, before weight decay (as torch's clip_grad_norm_ then SGD)
    parts.append(optax.clip_by_global_norm(clip))
  if decay:
    parts.append(optax.add_decayed_weights(decay, mask=lambda p: decay_mask(p, opt_cfg.decay_biases)))
  parts.append(optax.inject_hyperparams(optax.sgd)(
      learning_rate=opt_cfg.lr, momentum=opt_cfg.momentum or None, nesterov=opt_cfg.nesterov))
  tx = optax.chain(*parts)
  patterns = parse_patterns(trainable)
  return freeze(tx, patterns) if patterns else tx


# ----------------------------------------------------------------------------------------------------------
# Freezing: train.trainable


def parse_patterns(spec: str | Sequence[str] | None) -> tuple[str, ...]:
  """Layer-name patterns from a config string ('fc6,fc7,fc8', 'fc*', 'conv5_*,fc*') or a sequence of them.
  '' , '*' or 'all' mean every layer (returned as ())."""
  if spec is None:
    return ()
  if isinstance(spec, str):
    spec = spec.strip().strip('()[]').split(',')
  out = []
  for item in spec:
    for piece in str(item).split(','):
      piece = piece.strip().strip('\'"').strip()
      if piece:
        out.append(piece)
  return () if not out or any(p in ('*', 'all') for p in out) else tuple(out)


def is_trainable(layer: str, patterns: Sequence[str]) -> bool:
  """Whether a top-level layer (a key of params: conv1_1, fc8, bn1_1, a head's name) is trained. A conv
  layer's batch norm (bnX_Y) follows its conv (convX_Y) unless a pattern names it."""
  if not patterns:
    return True
  names = [layer]
  if layer.startswith('bn') and layer[2:3].isdigit():
    names.append('conv' + layer[2:])
  return any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def split_trainable(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
  """(trainable layers, frozen layers) of a params dict keyed by layer name."""
  train = {k: v for k, v in params.items() if is_trainable(k, patterns)}
  return train, {k: v for k, v in params.items() if k not in train}


def check_patterns(layers: Sequence[str], patterns: Sequence[str]) -> None:
  """Raises ValueError naming a pattern that matches none of ``layers`` (a typo would freeze everything)."""
  for p in patterns:
    if not any(is_trainable(layer, (p,)) for layer in layers):
      raise ValueError(f'train.trainable pattern {p!r} matches no layer of this model; its layers: '
                       f'{", ".join(layers)}')
  if not any(is_trainable(layer, patterns) for layer in layers):
    raise ValueError(f'train.trainable={",".join(patterns)!r} leaves no layer to train')


TRAIN, FROZEN = 'trainable', 'frozen'  # the labels of optax.multi_transform


class FrozenTransformation(NamedTuple):
  """A GradientTransformation that runs ``inner`` on the layers matching ``trainable`` only: optax's
  ``multi_transform`` of {trainable: inner, frozen: ``set_to_zero``}, whose state holds the inner state of
  the trainable layers alone (frozen leaves are optax.MaskedNode: no momentum buffer). The train step reads
  ``trainable`` and differentiates only those layers (update_trainable)."""
  init: Callable
  update: Callable
  trainable: tuple[str, ...]


def freeze(tx: optax.GradientTransformation, patterns: Sequence[str]) -> FrozenTransformation:
  """``tx`` restricted to the layers matching ``patterns`` (top-level keys of the params dict)."""
  patterns = tuple(patterns)

  def layer_labels(layer, tree):  # every leaf of a layer gets the layer's label
    label = TRAIN if is_trainable(layer, patterns) else FROZEN
    return jax.tree_util.tree_map(lambda _: label, tree)

  def labels(params):
    return {k: layer_labels(k, v) for k, v in params.items()}

  mt = optax.multi_transform({TRAIN: tx, FROZEN: optax.set_to_zero()}, labels)
  return FrozenTransformation(mt.init, mt.update, patterns)


def update_trainable(tx, grads: dict, opt_state: Any, train_params: dict, frozen_params: dict):
  """(updates of the trainable layers, new opt_state): ``tx.update`` for a step that differentiated only
  the trainable layers. The frozen layers enter as their parameters (set_to_zero reads only their shapes;
  its zeros are unused and compiled away). Every layer trained: tx.update(grads, opt_state, params)."""
  if not frozen_params:
    return tx.update(grads, opt_state, train_params)
  params = {**frozen_params, **train_params}
  updates, opt_state = tx.update({**frozen_params, **grads}, opt_state, params)
  return {k: updates[k] for k in train_params}, opt_state


def trainable_patterns(tx) -> tuple[str, ...]:
  """The patterns of a frozen transformation (() when every layer is trained)."""
  return tuple(getattr(tx, 'trainable', ()) or ())


def set_learning_rate(opt_state: Any, lr: jax.Array) -> Any:
  """Returns opt_state with the injected learning rate replaced (inside the jitted step); a frozen
  transformation's: in its trainable part."""
  if isinstance(opt_state, optax.MultiTransformState):
    inner_states = dict(opt_state.inner_states)
    inner_states[TRAIN] = set_learning_rate(inner_states[TRAIN], lr)
    return opt_state._replace(inner_states=inner_states)
  if isinstance(opt_state, optax.MaskedState):
    return opt_state._replace(inner_state=set_learning_rate(opt_state.inner_state, lr))
  inner = opt_state[-1]
  hyper = dict(inner.hyperparams, learning_rate=lr)
  return opt_state[:-1] + (inner._replace(hyperparams=hyper),)


@dataclasses.dataclass
class Schedule:
  """The learning rate as a function of the step, on the host.

  lr(step) = base_lr * warmup(step) * shape(step) * plateau_scale, where shape is 1 (plateau, constant),
  step_factor ** (number of step_epochs passed) (step) or a half cosine to 0 over the run (cosine), and
  plateau_scale is divided by 1/factor each time validation top-1 stops improving (plateau only).
  """
  base_lr: float
  kind: str = 'plateau'
  steps_per_epoch: int = 1
  total_steps: int = 1
  warmup_epochs: float = 0.0
  step_epochs: tuple = ()
  step_factor: float = 0.1
  factor: float = 0.1
  patience: int = 2
  cooldown: int = 0
  min_delta: float = 0.0
  max_reductions: int = 3
  # Plateau state (saved in checkpoints).
  best: float = -math.inf
  bad_evals: int = 0
  cooldown_left: int = 0
  reductions: int = 0
  scale: float = 1.0

  STATE_FIELDS = ('best', 'bad_evals', 'cooldown_left', 'reductions', 'scale')

  @classmethod
  def from_config(cls, opt_cfg, steps_per_epoch: int, total_steps: int) -> 'Schedule':
    if opt_cfg.schedule not in SCHEDULES:
      raise ValueError(f'optimizer.schedule={opt_cfg.schedule!r}; valid: {", ".join(SCHEDULES)}')
    return cls(base_lr=opt_cfg.lr, kind=opt_cfg.schedule, steps_per_epoch=steps_per_epoch,
               total_steps=total_steps, warmup_epochs=opt_cfg.warmup_epochs,
               step_epochs=tuple(opt_cfg.step_epochs), step_factor=opt_cfg.step_factor,
               factor=opt_cfg.plateau_factor, patience=opt_cfg.plateau_patience,
               cooldown=opt_cfg.plateau_cooldown, min_delta=opt_cfg.plateau_min_delta,
               max_reductions=opt_cfg.plateau_max_reductions)

  def lr(self, step: int) -> float:
    lr = self.base_lr * self.scale
    warmup = self.warmup_epochs * self.steps_per_epoch
    if warmup and step < warmup:
      lr *= (step + 1) / warmup
    if self.kind == 'step':
      epoch = step / self.steps_per_epoch
      lr *= self.step_factor ** sum(epoch >= e for e in self.step_epochs)
    elif self.kind == 'cosine':
      t = min(1.0, max(0.0, (step - warmup) / max(1, self.total_steps - warmup)))
      lr *= 0.5 * (1 + math.cos(math.pi * t))
    return lr

  def on_eval(self, top1: float) -> bool:
    """Feeds one validation top-1; returns True when the learning rate was reduced."""
    if self.kind != 'plateau':
      return False
    if top1 > self.best + self.min_delta:
      self.best, self.bad_evals = top1, 0
      return False
    if self.cooldown_left > 0:
      self.cooldown_left -= 1
      return False
    self.bad_evals += 1
    if self.bad_evals < self.patience or self.reductions >= self.max_reductions:
      return False
    self.scale *= self.factor
    self.reductions += 1
    self.bad_evals = 0
    self.cooldown_left = self.cooldown
    return True

  def state_dict(self) -> dict:
    return {k: (None if k == 'best' and self.best == -math.inf else getattr(self, k))
            for k in self.STATE_FIELDS}

  def load_state_dict(self, state: dict) -> None:
    for k in self.STATE_FIELDS:
      if k in state:
        setattr(self, k, -math.inf if (k == 'best' and state[k] is None) else state[k])
