"""The paper's net E (vgg19), ImageNet recipe of section 3.1. Warm-started from A when config.init_from names an A run.

    python -m vggjax.main --config=configs/vgg19.py[:256|384|jitter] --workdir=DIR [--config.init_from=A_RUN]
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg19'
  common.set_scale(config, scale)
  return config
