"""The paper's net E (vgg19), ImageNet recipe of section 3.1. The chain (configs/common.py):

    python -m vggjax.main --config=configs/vgg19.py --workdir=E256 --config.init_from=A256     # 7 layers of A
    python -m vggjax.main --config=configs/vgg19.py:384 --workdir=E384 --config.init_from=E256
    python -m vggjax.main --config=configs/vgg19.py:jitter --workdir=Ejitter --config.init_from=E384
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg19'
  common.set_scale(config, scale)
  return config
