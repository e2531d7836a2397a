"""The paper's net B (vgg13), ImageNet recipe of section 3.1. The chain (configs/common.py):

    python -m vggjax.main --config=configs/vgg13.py --workdir=B256 --config.init_from=A256     # 7 layers of A
    python -m vggjax.main --config=configs/vgg13.py:384 --workdir=B384 --config.init_from=B256
    python -m vggjax.main --config=configs/vgg13.py:jitter --workdir=Bjitter --config.init_from=B384
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg13'
  common.set_scale(config, scale)
  return config
