"""The built-in demo (the default of `python -m vggjax.main --workdir=DIR`): a narrow VGG-A on scikit-learn's
digits (real handwritten digits that ship with scikit-learn), at 32x32, on a CPU in about a minute.

The paper's recipe, scaled down: scale jittering S ~ U[32, 40] with random 32x32 crops, SGD with momentum 0.9,
L2 5e-4, dropout 0.5, lr divided by 10 when validation top-1 stops improving. Glorot init (the paper's note:
it trains without a warm start; N(0, 0.01) leaves this narrow net at chance). No flips (digits are not
mirror-symmetric) and no colour shift (grey images).
"""

from vggjax.configs import default


def get_config():
  config = default.get_config()
  config.model.name = 'vgg11'
  config.model.width = 0.25          # conv widths 16-32-64-128-128
  config.model.fc_features = 256
  config.model.init = 'glorot'
  config.data.source = 'digits'
  config.data.name = ''
  config.data.image_size = 32
  config.data.scale_min = 32
  config.data.scale_max = 40
  config.data.eval_scale = 36
  config.data.flip = False
  config.data.color_shift = 0.0
  config.data.mean_rgb = (78.0, 78.0, 78.0)  # digits' mean grey level on the 0-255 scale
  config.data.num_workers = 0        # an in-memory dataset: no worker processes needed
  config.train.global_batch_size = 64
  config.train.num_epochs = 15
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 200
  config.optimizer.lr = 0.01
  config.optimizer.plateau_patience = 2
  return config
