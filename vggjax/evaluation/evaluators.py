"""The evaluator interface: built once from a predict function (or the networks) and its settings, then run on
the variables; it returns metrics (validation, the paper's protocols) or per-image outputs (predict,
features). Training's validation, ``vggjax.evaluate``, ``vggjax.predict``, ``vggjax.features`` and transfer
all go through one of the three evaluators here, and so through ``vggjax.evaluation.inference`` (the one
path from uint8 images to posteriors or descriptors) and ``vggjax.data.transforms`` (the one image
convention). docs/design.md, decision 29, says why.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vggjax import parallel, runlog
from vggjax.data import transforms
from vggjax.evaluation import engine
from vggjax.evaluation.inference import apply_batched
from vggjax.evaluation.scales import ASPECT_BUCKETS, PROTOCOLS


class Evaluator(abc.ABC):
  """Built from a predict function and its settings; ``run`` evaluates some variables."""

  @abc.abstractmethod
  def run(self, variables: Any, *args, **kwargs) -> Any:
    """The metrics, or the per-image outputs, of the network with these variables."""


# ----------------------------------------------------------------------------------------------------------
# Validation during training: summed metrics over every example of a split.


class EvalInterrupted(Exception):
  """A preemption notice arrived during an evaluation pass (ValidationEvaluator's `stop`)."""


class ValidationEvaluator(Evaluator):
  """Validation during training: an eval step (variables, batch with 'mask') -> per-batch sums (top1, top5,
  loss, count, ...) run over every batch of a split (padding masked, never dropped). Returns
  {'val_top1', 'val_top5', 'val_loss', 'val_count', 'val_<other sums>'} (means over the examples)."""

  def __init__(self, eval_step: Callable, mesh, batches: Callable[[], Iterable[dict]]):
    self.eval_step, self.mesh, self.batches = eval_step, mesh, batches

  def run(self, variables: Any, stop: Callable[[], bool] | None = None) -> dict:
    """`stop` is polled before each batch (host-only, no device wait): True raises EvalInterrupted."""
    total = None
    for batch in self.batches():
      if stop is not None and stop():
        raise EvalInterrupted()
      sums = self.eval_step(variables, parallel.global_batch(batch, self.mesh))
      total = sums if total is None else jax.tree_util.tree_map(jnp.add, total, sums)
    if total is None:
      raise ValueError('the evaluation split is empty')
    total = parallel.to_host(total)
    n = float(total['count'])
    return {'val_top1': float(total['top1']) / n, 'val_top5': float(total['top5']) / n,
            'val_loss': float(total['loss']) / n, 'val_count': int(n),
            **{f'val_{k}': float(v) / n for k, v in total.items()
               if k not in ('top1', 'top5', 'loss', 'count')}}


# ----------------------------------------------------------------------------------------------------------
# The paper's protocols over a split (vggjax.evaluate).


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
  """How ``evaluate`` runs (see its docstring)."""
  protocols: tuple[str, ...] = PROTOCOLS
  batch_size: int = 0
  num_threads: int = 0
  aspect_buckets: tuple[float, ...] = ASPECT_BUCKETS
  dct_scaling: bool = True
  flip: bool = True
  crops_per_step: int = 5
  progress: bool = True
  return_posteriors: bool = False


class ProtocolEvaluator(Evaluator):
  """The paper's protocols (single, dense, multi-crop, their combination; multi-scale; fusion) of one or
  several networks (EvalModels: module, normalisation, test scales) over every image of a source."""

  def __init__(self, eval_models: Sequence[Any], source, settings: ProtocolSettings = ProtocolSettings(),
               mesh=None):
    self.eval_models, self.source, self.settings, self.mesh = list(eval_models), source, settings, mesh

  def run(self, variables: Sequence[Any] | None = None):
    """An EvalResult. variables: one per model (default: each EvalModel's own)."""
    models = self.eval_models
    if variables is not None:
      if len(variables) != len(models):
        raise ValueError(f'{len(variables)} variables given for {len(models)} models')
      models = [dataclasses.replace(m, variables=v) for m, v in zip(models, variables)]
    s = self.settings
    return engine.evaluate(models, self.source, protocols=s.protocols, batch_size=s.batch_size,
                           mesh=self.mesh, num_threads=s.num_threads, aspect_buckets=s.aspect_buckets,
                           dct_scaling=s.dct_scaling, flip=s.flip, crops_per_step=s.crops_per_step,
                           progress=s.progress, return_posteriors=s.return_posteriors)


# ----------------------------------------------------------------------------------------------------------
# Per-image outputs of image files or arrays at several scales (predict, features, transfer).


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """scales: the smaller-side sizes Q; crop: the central crop at the training size of each rescaled image
  (predict's single protocol) or the whole image (dense, descriptors); style: the rescale and crop
  convention (vggjax.data.transforms.STYLES); batch_size: images of equal shape per forward pass."""
  scales: tuple[int, ...]
  crop: int | None = None
  style: str = 'torchvision'
  batch_size: int = 8
  progress: bool = False
  desc: str = ''


class ImageEvaluator(Evaluator):
  """A jitted fn(variables, uint8 images) -> per-image rows (posteriors, descriptors) applied to images
  (uint8 RGB arrays or files) rescaled to each scale Q (and centrally cropped if asked for)."""

  CHUNK = 64  # images decoded at once at least (a large folder is never held in memory at once)

  def __init__(self, fn: Callable, settings: ImageSettings):
    transforms.check_style(settings.style)
    self.fn, self.settings = fn, settings

  def at_scale(self, variables: Any, images: Sequence[np.ndarray], q: int, progress=None) -> list[np.ndarray]:
    """The rows of decoded images at one scale Q, in order."""
    s = self.settings
    inputs = [transforms.rescale(im, q, s.style) for im in images]
    if s.crop:
      inputs = [transforms.center_crop(im, s.crop, s.style) for im in inputs]
    return self.fn_rows(variables, inputs, progress)

  def fn_rows(self, variables: Any, inputs: Sequence[np.ndarray], progress=None) -> list[np.ndarray]:
    return apply_batched(self.fn, variables, inputs, self.settings.batch_size, progress)

  def run(self, variables: Any, images: Sequence[Any]) -> list[np.ndarray]:
    """Per scale, the rows (N, D) of the images (arrays or paths), decoded a chunk at a time."""
    s = self.settings
    variables = jax.device_put(variables)
    images = list(images)
    bar = runlog.progress_bar(len(images) * len(s.scales), s.desc, unit='img', enabled=s.progress)
    per_scale: list[list[np.ndarray]] = [[] for _ in s.scales]
    chunk = max(s.batch_size * 16, self.CHUNK)
    for start in range(0, len(images), chunk):
      decoded = [transforms.as_image(im) for im in images[start:start + chunk]]
      for k, q in enumerate(s.scales):
        per_scale[k] += self.at_scale(variables, decoded, q, bar)
    bar.close()
    return [np.stack(rows) if rows else None for rows in per_scale]
