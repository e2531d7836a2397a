"""The localisation test bed (benchmarks/make_box_testbed.py: Fashion-MNIST items on real photographs): a
narrow VGG-A with batch norm (vgg11_bn) that classifies and localises on a 2-core CPU in minutes.

    python benchmarks/make_box_testbed.py --out=data/boxes_testbed
    python -m vggjax.main --config=configs/boxes_testbed.py:classify --workdir=runs/tb_cls \
        --config.data.data_dir=data/boxes_testbed
    python -m vggjax.main --config=configs/boxes_testbed.py:pcr --workdir=runs/tb_pcr \
        --config.data.data_dir=data/boxes_testbed --config.init_from=runs/tb_cls
    python -m vggjax.localize --workdir=runs/tb_pcr/localize --classifier=runs/tb_cls --localizer=runs/tb_pcr

The paper's setting scaled down: 64x64 crops of pictures rescaled to S = 96 (fixed), so a crop sees two thirds
of the shorter side, as 224 of 256 sees most of an ImageNet picture but not all; the localisation nets start
from the classifier (conv body, fc6, fc7) with lr 1e-3 as Appendix A. The argument is the head: classify
(the classifier), pcr or scr. Batch norm (torchvision's _bn variant) because the net trains from scratch, with
no net A to start from.
"""

from vggjax.configs import default


def get_config(head: str | None = None):
  head = head or 'pcr'
  if head not in ('classify', 'pcr', 'scr'):
    raise ValueError(f'boxes_testbed: the argument is the head, classify, pcr or scr; got {head!r}')
  config = default.get_config()
  config.model.name = 'vgg11_bn'
  config.model.head = head
  config.model.width = 0.25          # conv widths 16-32-64-128-128
  config.model.fc_features = 256
  config.model.init = 'glorot'
  config.data.source = 'folder'
  config.data.name = ''
  config.data.data_dir = 'data/boxes_testbed'
  config.data.boxes_file = 'boxes.json'
  config.data.image_size = 64
  config.data.scale_min = config.data.scale_max = 96
  config.data.eval_scale = 96
  config.data.num_workers = 0        # small pictures: decoding in the main process keeps up
  config.train.global_batch_size = 64
  config.train.log_every_steps = 10
  config.train.checkpoint_every_steps = 500
  config.optimizer.plateau_patience = 2
  if head == 'classify':
    config.train.num_epochs = 20
    config.optimizer.lr = 0.05
  else:
    config.train.num_epochs = 10
    config.optimizer.lr = 1e-3       # Appendix A
    config.model.dropout_rate = 0.0  # measured here: without dropout the box nets learn several times faster
    config.init_layers = 'all'  # every layer whose name and shape match: all but fc8
  return config
