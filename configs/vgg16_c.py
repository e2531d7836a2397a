"""The paper's net C (vgg16_c), ImageNet recipe of section 3.1. D with 1x1 convolutions ending blocks 3-5; warm-started from A when init_from is given.

    python -m vggjax.main --config=configs/vgg16_c.py[:256|384|jitter] --workdir=DIR [--config.init_from=A_RUN]
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg16_c'
  common.set_scale(config, scale)
  return config
