"""Shared by the paper's configs: the training scale (paper 3.1) chosen by the config argument, and with it
the step of the paper's chain that the run is:

* `256` (S = 256): net A from random initialisation; B-E from A (`init_from=A_RUN`, the paper's seven layers).
* `384` (S = 384): "initialised with the weights pre-trained with S = 256, and we used a smaller initial
  learning rate of 1e-3": `init_from` must name the S=256 run of the same net, and every layer is copied
  (`init_layers='all'`).
* `jitter` (S ~ U[256, 512]): "we fine-tuned all layers of a single-scale model with the same configuration,
  pre-trained with fixed S = 384": `init_from` must name the S=384 run, every layer is copied. The paper
  does not give this fine-tuning's learning rate; we use 1e-3, the rate it gives for the same kind of step
  (a converged net fine-tuned at another scale, 256 -> 384): 1e-2, the from-scratch rate, would move a
  converged net far from its start and undo much of the pre-training.

`init_required` makes a missing `init_from` an error (a 384 or jitter run from scratch at lr 1e-3 was the
silent failure this guards against); `--config.init_required=''` trains from scratch on purpose.
"""

SCALES = {'256': (256, 256), '384': (384, 384), 'jitter': (256, 512)}
FINE_TUNE_LR = 1e-3
# What init_from must be at each scale (None: optional), as {net} at S=...
PARENT = {'256': None, '384': '256', 'jitter': '384'}


def set_scale(config, scale: str | None) -> None:
  """`--config=configs/vgg16.py:384` (or 256, jitter): S fixed at 256 or 384, or S ~ U[256, 512]. Call it
  after setting config.model.name."""
  scale = scale or '256'
  if scale not in SCALES:
    raise ValueError(f'training scale {scale!r} is not one of {", ".join(SCALES)} (e.g. configs/vgg16.py:jitter)')
  config.data.scale_min, config.data.scale_max = SCALES[scale]
  parent = PARENT[scale]
  if parent:
    config.optimizer.lr = FINE_TUNE_LR
    config.init_layers = 'all'
    config.init_required = f'the S={parent} run of {config.model.name} (paper 3.1)'
