"""The paper's net A (vgg11), ImageNet recipe of section 3.1. Trained from random initialisation (the paper's shallowest net, the warm start of B-E).

    python -m vggjax.main --config=configs/vgg11.py[:256|384|jitter] --workdir=DIR [--config.init_from=A_RUN]
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg11'
  common.set_scale(config, scale)
  return config
