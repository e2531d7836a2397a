"""The paper's net C (vgg16_c): D with 1x1 convolutions ending blocks 3-5. ImageNet recipe of section 3.1; the
chain (configs/common.py):

    python -m vggjax.main --config=configs/vgg16_c.py --workdir=C256 --config.init_from=A256  # 7 layers of A
    python -m vggjax.main --config=configs/vgg16_c.py:384 --workdir=C384 --config.init_from=C256
    python -m vggjax.main --config=configs/vgg16_c.py:jitter --workdir=Cjitter --config.init_from=C384
"""

from vggjax.configs import common, default


def get_config(scale: str | None = None):
  config = default.get_config()
  config.model.name = 'vgg16_c'
  common.set_scale(config, scale)
  return config
