"""The paper's net A-LRN (vgg11_lrn), ImageNet recipe of section 3.1. A with local response normalisation after conv1_1 (the paper found it does not help).

    python -m vggjax.main --config=configs/vgg11_lrn.py[:256|384|jitter] --workdir=DIR [--config.init_from=A_RUN]
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg11_lrn'
  common.set_scale(config, scale)
  return config
