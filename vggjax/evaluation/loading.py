"""The networks to evaluate: a module, its variables, its test scales, from a run or a weights directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from vggjax import checkpoints, models
from vggjax.evaluation.scales import default_scales
from vggjax.preprocessing import Normalization

@dataclasses.dataclass
class EvalModel:
  """One network to evaluate: the module, its variables, its test scales and how its inputs are made."""
  model: models.VGG
  variables: Any
  scales: tuple[int, ...]
  norm: Normalization = Normalization()
  label: str = ''
  train_scale: tuple[int, int] | None = None  # (Smin, Smax) of training, if known
  checkpoint: str = ''
  step: int | None = None

  def __post_init__(self):
    self.scales = tuple(sorted({int(q) for q in self.scales}))
    if not self.scales:
      raise ValueError('a model needs at least one test scale')
    size = self.model.image_size
    if self.scales[0] < size:
      raise ValueError(f'test scale Q={self.scales[0]} is below the training size {size}: the crop and the '
                       f'dense evaluation need Q >= {size}')
    self.label = self.label or _arch_label(self.model)


def _arch_name(model: models.VGG) -> str:
  """The configuration's vggjax name (vgg16, ...) from the module's layer table."""
  for name, arch in models.ARCHS.items():
    if arch.stages == model.stages and arch.lrn == model.lrn and arch.batch_norm == model.batch_norm:
      return name
  return 'vgg'


def _arch_label(model: models.VGG) -> str:
  """The paper's letter (A, A-LRN, B, C, D, E) where there is one, else the vggjax name."""
  arch = models.ARCHS.get(_arch_name(model))
  return (arch.paper_name if arch else None) or _arch_name(model)


def load_model(path: str, *, scales: Sequence[int] | None = None, multiscale: bool = False,
               fallback_train_scale: tuple[int, int] | None = None, dtype: str | None = None) -> EvalModel:
  """An EvalModel from a training workdir (latest checkpoint), a checkpoint step directory or a weights
  directory. Test scales: `scales`, else the paper's defaults for the training scale S recorded with the
  weights (or `fallback_train_scale` when they record none, e.g. imported weights)."""
  variables, meta = checkpoints.load_weights(path)
  overrides = {'dtype': dtype} if dtype else {}
  model = checkpoints.model_from_meta(meta, dropout_rate=0.0, **overrides)
  data = meta.get('data') or {}
  train_scale = ((int(data['scale_min']), int(data['scale_max'])) if 'scale_min' in data else None)
  if scales:
    qs = tuple(int(q) for q in scales)
  else:
    s = train_scale or fallback_train_scale
    if s is None:
      raise ValueError(f'{path} records no training scale: pass --scales (or a config with data.scale_min)')
    qs = default_scales(s[0], s[1], model.image_size, multiscale)
  return EvalModel(model=model, variables=variables, scales=qs,
                   norm=checkpoints.normalization_from_meta(meta), label=_arch_label(model),
                   train_scale=train_scale, checkpoint=str(path), step=meta.get('step'))


def _unique_labels(labels: Sequence[str]) -> list[str]:
  out = []
  for i, label in enumerate(labels):
    n = labels[:i].count(label)
    out.append(label if labels.count(label) == 1 else f'{label}#{n + 1}')
  return out
