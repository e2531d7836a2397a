"""The steps ``vggjax.main`` runs, as ``train.train_and_evaluate`` builds them, and their abstract arguments.

The train step (``train.make_train_step`` with the config's model, optimizer, normalisation, colour shift,
remat, nan policy and accumulation), the validation step (``train.make_eval_step``, central crops) and the
dense evaluation step (``inference.dense_posteriors`` at the config's single test scale Q, on ImageNet's
common 4:3 image shape in its padded bucket, with the flip), with the train state's shapes and shardings
(``train.abstract_train_state``) on a mesh. Nothing is allocated: the arguments are ShapeDtypeStructs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from vggjax import optim, parallel, preprocessing, settings, train
from vggjax.evaluation import inference, scales

# ImageNet's most common photo is 500 x 375 (4:3): the dense step is planned on its padded bucket.
DENSE_IMAGE_HW = (375, 500)


def nbytes(tree) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a tree."""
  return int(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


@dataclasses.dataclass
class Steps:
  """A model, its optimizer and its jitted steps on a mesh, with the step options resolved once."""
  mesh: Any
  model: Any
  eval_model: Any
  tx: Any
  image_size: int
  norm: Any = preprocessing.Normalization()
  train_options: dict = dataclasses.field(default_factory=dict)  # make_train_step's keyword arguments
  head: str = 'classify'
  flip: bool = True
  test_scale: int | None = None  # Q of the dense step
  dtype: str = 'float32'

  @classmethod
  def build(cls, config, mesh) -> 'Steps':
    """The steps of a resolved config (``config_lib.resolve``) on `mesh`."""
    d = settings.DataSettings.from_config(config.data)
    m = settings.ModelSettings.from_config(config.model)
    t = settings.TrainSettings.from_config(config.train)
    options = dict(color_shift=d.color_shift, remat=m.remat, nan_policy=t.nan_policy,
                   accumulate_steps=t.accumulate_steps, head=m.head, eigval=d.pca_eigval, eigvec=d.pca_eigvec)
    return cls(mesh=mesh, model=train.build_model(config),
               eval_model=train.build_model(config, dropout_rate=0.0),
               tx=optim.make_optimizer(config.optimizer, trainable=t.trainable), image_size=d.image_size,
               norm=train.normalization(config), train_options=options, head=m.head, flip=d.flip,
               test_scale=preprocessing.single_test_scale(d.scale_min, d.scale_max), dtype=str(m.dtype))

  @property
  def accumulate_steps(self) -> int:
    return self.train_options.get('accumulate_steps', 1)

  @property
  def remat(self) -> bool:
    return bool(self.train_options.get('remat', False))

  def train_step(self, remat: bool | None = None, accumulate_steps: int | None = None):
    given = dict(remat=remat, accumulate_steps=accumulate_steps)
    options = {**self.train_options, **{k: v for k, v in given.items() if v is not None}}
    return train.make_train_step(self.model, self.tx, self.mesh, norm=self.norm, **options)

  def eval_step(self):
    return train.make_eval_step(self.eval_model, self.mesh, self.norm, head=self.head)

  def dense_step(self):
    dense = functools.partial(inference.dense_posteriors, self.eval_model, norm=self.norm, flip=self.flip)
    return jax.jit(dense, out_shardings=parallel.batch_sharding(self.mesh))

  # --- abstract arguments ---

  def abstract_state(self):
    return train.abstract_train_state(self.model, self.tx, self.mesh)

  def state_parts(self) -> dict:
    """Bytes of the train state per chip: parameters, optimizer state, the rest."""
    state = self.abstract_state()
    return {'parameters_bytes': nbytes(state.params), 'optimizer_state_bytes': nbytes(state.opt_state),
            'other_state_bytes': nbytes((state.step, state.batch_stats, state.rng, state.fault,
                                         state.fault_step))}

  def _batch(self, global_batch: int, hw: tuple[int, int], **extra) -> dict:
    shard = parallel.batch_sharding(self.mesh)
    batch = {'image': jax.ShapeDtypeStruct((global_batch, *hw, 3), jnp.uint8, sharding=shard),
             'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=shard)}
    for k, dtype in extra.items():
      batch[k] = jax.ShapeDtypeStruct((global_batch,), dtype, sharding=shard)
    return batch

  def train_args(self, global_batch: int) -> tuple:
    size = self.image_size
    lr = jax.ShapeDtypeStruct((), jnp.float32, sharding=parallel.replicated(self.mesh))
    return self.abstract_state(), self._batch(global_batch, (size, size)), lr

  def variables(self):
    state = self.abstract_state()
    v = {'params': state.params}
    if state.batch_stats:
      v['batch_stats'] = state.batch_stats
    return v

  def eval_args(self, global_batch: int) -> tuple:
    size = self.image_size
    return self.variables(), self._batch(global_batch, (size, size), mask=jnp.bool_)

  def dense_shape(self) -> tuple[int, int, int]:
    """(Q, padded height, padded width) of the dense step: the config's single test scale, 4:3 bucket."""
    q = self.test_scale
    h, w = DENSE_IMAGE_HW
    s = q / min(h, w)
    rh, rw = max(q, round(h * s)), max(q, round(w * s))
    return (q, *scales.bucket_shape(rh, rw, q))

  def dense_args(self, global_batch: int) -> tuple:
    _, bh, bw = self.dense_shape()
    shard = parallel.batch_sharding(self.mesh)
    images = jax.ShapeDtypeStruct((global_batch, bh, bw, 3), jnp.uint8, sharding=shard)
    hw = jax.ShapeDtypeStruct((global_batch, 2), jnp.int32, sharding=shard)
    return self.variables(), images, hw
