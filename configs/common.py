"""Shared by the paper's configs: the training scale (paper 3.1) chosen by the config argument."""

SCALES = {'256': (256, 256), '384': (384, 384), 'jitter': (256, 512)}


def set_scale(config, scale: str | None) -> None:
  """`--config=configs/vgg16.py:384` (or 256, jitter): S fixed at 256 or 384, or S ~ U[256, 512]."""
  scale = scale or '256'
  if scale not in SCALES:
    raise ValueError(f'training scale {scale!r} is not one of {", ".join(SCALES)} (e.g. configs/vgg16.py:jitter)')
  config.data.scale_min, config.data.scale_max = SCALES[scale]
  if scale == '384':
    # The paper: S=384 nets start from the S=256 net's weights (init_from) with lr 1e-3.
    config.optimizer.lr = 1e-3
