"""The paper's training chain in miniature, for `launch/paper.py --tiny` (and its CI test): the same nets,
configs, warm starts, learning rates and evaluations as the ImageNet chain, with narrow nets (1/16 of the
widths, fc 32), 32x32 crops of scikit-learn's digits (built in) and a few steps per run.

    python -m vggjax.main --config=configs/tiny.py:D,384 --workdir=DIR --config.init_from=D256_RUN

The argument is NET,SCALE: NET one of A, B, C, D, E (the paper's letters), SCALE one of 256, 384, jitter as
in configs/vgg16.py; the scales are mapped to the 32x32 crop as 256 and 384 are to the 224 crop.
"""

from vggjax.configs import common, default

NETS = {'A': 'vgg11', 'B': 'vgg13', 'C': 'vgg16_c', 'D': 'vgg16', 'E': 'vgg19'}
TINY_SCALES = {'256': (36, 36), '384': (48, 48), 'jitter': (36, 60)}


def get_config(arg: str | None = None):
  net, _, scale = (arg or 'A,256').replace(':', ',').partition(',')
  if net.upper() not in NETS:
    raise ValueError(f'net {net!r} is not one of {", ".join(NETS)} (configs/tiny.py:D,384)')
  config = default.get_config()
  config.model.name = NETS[net.upper()]
  common.set_scale(config, scale or '256')  # the chain: lr, init_layers, init_required
  config.data.scale_min, config.data.scale_max = TINY_SCALES[scale or '256']
  config.model.width = 1 / 16
  config.model.fc_features = 32
  config.model.init = 'glorot'       # learns in a few steps; the chain's warm starts are what is tested
  config.data.source = 'digits'
  config.data.name = ''
  config.data.image_size = 32
  config.data.flip = False           # digits are not mirror-symmetric
  config.data.color_shift = 0.0      # grey images
  config.data.mean_rgb = (78.0, 78.0, 78.0)
  config.data.num_workers = 0
  config.train.global_batch_size = 32
  config.train.max_steps = 8
  config.train.log_every_steps = 4
  config.train.checkpoint_every_steps = 1000
  config.train.checkpoint_every_epoch = False
  config.train.plot = False
  return config
