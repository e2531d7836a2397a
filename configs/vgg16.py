"""The paper's net D (vgg16), ImageNet recipe of section 3.1. The chain (configs/common.py):

    python -m vggjax.main --config=configs/vgg16.py --workdir=D256 --config.init_from=A256     # 7 layers of A
    python -m vggjax.main --config=configs/vgg16.py:384 --workdir=D384 --config.init_from=D256
    python -m vggjax.main --config=configs/vgg16.py:jitter --workdir=Djitter --config.init_from=D384
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg16'
  common.set_scale(config, scale)
  return config
