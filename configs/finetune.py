"""Fine-tuning a trained net on another dataset: the modern alternative to the paper's Appendix B (fixed fc7
descriptors and linear SVMs, `python -m vggjax.transfer`), scored with the same metrics by
`python -m vggjax.transfer --classifier=net`.

    python -m vggjax.main --config=configs/finetune.py:vgg16 --workdir=runs/ft \\
        --config.init_from=weights/vgg16_tv --config.data.source=folder --config.data.data_dir=ROOT
    python -m vggjax.main --config=configs/finetune.py:vgg16,fc* ...     # fc6-fc8 only (frozen convs)
    python -m vggjax.transfer --weights=runs/ft --config=configs/finetune.py:vgg16 \\
        --config.data.source=folder --config.data.data_dir=ROOT --classifier=net --workdir=runs/ft_eval

The config argument is BASE[,TRAINABLE]: BASE is the shipped config whose architecture the pretrained
weights have (vgg16 by default; demo for the narrow demo net, vgg11 ... vgg19), TRAINABLE the layer-name
patterns to train (train.trainable: 'fc*', 'fc8', 'conv5_*,fc*'; all layers when left out). Every layer
whose name and shape match is copied from init_from (init_layers='all'), so fc8 - sized for the source's
classes - starts afresh for the target's (model.num_classes=0: the target dataset's count).

What changes from training from scratch, and why: the learning rate is 10x lower (1e-3; the paper's own
S=384 nets start from S=256 weights at 1e-3), because the copied layers are already good and a large step
would destroy them; fewer epochs (10, plateau schedule as the paper's), since only the adaptation is learnt.
Set data.mean_rgb/std_rgb/color_order to the pretrained weights' normalisation (README: imported weights).
"""

import importlib


def _base_config(name: str):
  for package in ('vggjax.configs', 'configs'):  # the installed configs, or a checkout's top-level configs/
    try:
      return importlib.import_module(f'{package}.{name}').get_config()
    except ModuleNotFoundError as e:
      if e.name not in (package, f'{package}.{name}', package.split('.')[0]):
        raise
  raise ValueError(f'configs/finetune.py:{name}: no shipped config named {name!r} (e.g. vgg16, vgg19, demo)')


def get_config(arg: str | None = None):
  base, _, trainable = (arg or 'vgg16').partition(',')
  config = _base_config(base.strip() or 'vgg16')
  config.model.num_classes = 0       # the target dataset's classes: a new fc8
  config.init_layers = 'all'         # every layer whose name and shape match (fc8 differs: stays new)
  config.train.trainable = trainable.strip()  # '' = every layer
  config.optimizer.lr = config.optimizer.lr / 10
  config.train.num_epochs = 10
  config.optimizer.warmup_epochs = 0.0
  return config
