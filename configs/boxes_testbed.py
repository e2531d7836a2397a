"""The localisation test bed (benchmarks/make_box_testbed.py: Fashion-MNIST items on real photographs): a
narrow VGG-A with batch norm (vgg11_bn) that classifies and localises on a 2-core CPU in minutes.

    python benchmarks/make_box_testbed.py --out=data/boxes_testbed
    python -m vggjax.main --config=configs/boxes_testbed.py:pretrain --workdir=runs/tb_pre
    python -m vggjax.main --config=configs/boxes_testbed.py:classify --workdir=runs/tb_cls \
        --config.data.data_dir=data/boxes_testbed --config.init_from=runs/tb_pre
    python -m vggjax.main --config=configs/boxes_testbed.py:pcr --workdir=runs/tb_pcr \
        --config.data.data_dir=data/boxes_testbed --config.init_from=runs/tb_cls
    python -m vggjax.localize --workdir=runs/tb_pcr/localize --classifier=runs/tb_cls --localizer=runs/tb_pcr

The paper's setting scaled down: 64x64 crops of pictures rescaled to S = 96 (fixed), so a crop sees two thirds
of the shorter side, as 224 of 256 sees most of an ImageNet picture but not all; the localisation nets start
from the classifier (conv body, fc6, fc7) with lr 1e-3 as Appendix A. The argument is the net:

* ``pretrain``: the classifier of plain Fashion-MNIST (Debian's dataset-fashion-mnist: the items on black),
  28x28 pictures rescaled to 64 so an item is about as large as in a test-bed crop. The test bed's classifier
  starts from it (the paper's way: a net starts from a simpler net it has already trained, as B-E from A).
  Measured: from scratch, the test-bed classifier stays at chance for the first hundreds of steps (an item in
  clutter, often cut by the crop, gives little gradient signal at first), while plain Fashion-MNIST reaches
  ~80% in 150 steps and the warm-started test-bed classifier learns from its first steps;
* ``classify``: the test bed's classifier (warm-started with ``--config.init_from=PRETRAIN_RUN``: every layer,
  fc8 included, since the test bed's class c is Fashion-MNIST's label c);
* ``pcr`` or ``scr``: the localisation nets (``--config.init_from=CLASSIFY_RUN``).

Batch norm (torchvision's _bn variant) on the convolutions, Glorot init. The FC layers have no batch norm, and
at lr 0.05 their ReLUs died within 200 steps (99% of fc7's units never active: a constant output, loss ln 10);
hence lr 0.01 for the classifiers. No dropout in these short runs: measured, with dropout 0.5 a box net
localised 6% of the crops after 240 steps against 18% without, and the classifier from scratch was at 8%
top-1 after 150 steps against 13% without; there are too few steps to overfit much.
"""

from vggjax.configs import default

NETS = ('pretrain', 'classify', 'pcr', 'scr')


def get_config(net: str | None = None):
  net = net or 'pcr'
  if net not in NETS:
    raise ValueError(f'boxes_testbed: the argument is the net, one of {", ".join(NETS)}; got {net!r}')
  config = default.get_config()
  config.model.name = 'vgg11_bn'
  config.model.head = 'classify' if net == 'pretrain' else net
  config.model.width = 0.25          # conv widths 16-32-64-128-128
  config.model.fc_features = 256
  config.model.init = 'glorot'
  config.model.dropout_rate = 0.0
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
  if net == 'pretrain':
    config.data.source = 'fashion_mnist'
    config.data.data_dir = ''        # Debian's /usr/share/datasets/fashion-mnist
    config.data.boxes_file = ''
    config.data.eval_split = 'test[:1000]'
    config.data.scale_min = config.data.scale_max = config.data.eval_scale = 64
    config.train.max_steps = 150
    config.optimizer.lr = 0.01
  elif net == 'classify':
    config.data.boxes_file = ''      # a classifier: the folder's labels only
    config.train.max_steps = 450
    config.optimizer.lr = 0.01
    config.init_layers = 'all'
  else:
    config.train.max_steps = 300
    config.optimizer.lr = 1e-3       # Appendix A
    config.init_layers = 'all'       # every layer whose name and shape match: all but fc8
  return config
