"""The base config: the paper's ImageNet recipe (section 3.1) for VGG-D. Every other config starts here.

Override any field on the command line: --config.optimizer.lr=0.02, --config.data.scale_max=512, ...
"""

import ml_collections

IMAGENET_MEAN_RGB = (123.68, 116.779, 103.939)
# AlexNet's ImageNet lighting statistics (the same numbers as vggjax.preprocessing's, which a test checks).
IMAGENET_EIGVAL = (55.46, 4.794, 1.148)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                   (-0.5808, -0.0045, -0.8140),
                   (-0.5836, -0.6948, 0.4203))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- model (vggjax.models.get_model) ---
  c.model = ml_collections.ConfigDict()
  c.model.name = 'vgg16'             # vgg11 vgg11_lrn vgg13 vgg16_c vgg16 vgg19, *_bn, or A A-LRN B C D E
  c.model.num_classes = 0            # 0: the dataset's number of classes
  c.model.width = 1.0                # multiplier of conv (and FC) widths; narrow nets for CPU runs
  c.model.fc_features = 0            # 0: 4096 * width
  c.model.dropout_rate = 0.5         # on fc6 and fc7
  c.model.init = 'paper'             # paper (Gaussian, std init_std), glorot, torchvision
  c.model.init_std = 0.01            # measured (docs/design.md 16): 0.1, the text's literal, diverges
  c.model.dtype = 'float32'          # compute dtype: float32, bfloat16, or float16 (with dynamic loss
                                     # scaling, train.loss_scale); params stay float32
  c.model.pool_ceil = False         # Caffe's ceil rounding in max pooling (dense eval of Caffe weights)
  c.model.remat = False              # recompute conv activations in the backward pass (saves memory)
  c.model.head = 'classify'          # classify, or a box regressor: scr, pcr (paper Appendix A; vgg16_loc)

  # --- data (vggjax.data) ---
  c.data = ml_collections.ConfigDict()
  c.data.source = 'tfds'             # tfds, folder, digits, mnist, fashion_mnist
  c.data.name = 'imagenet2012'       # TFDS dataset name (source=tfds)
  c.data.data_dir = ''               # TFDS data_dir, image folder root, or IDX directory ('' = default)
  c.data.train_split = 'train'
  c.data.eval_split = 'validation'
  c.data.image_size = 224            # training crop (and fc6's extent: image_size // 32)
  c.data.scale_min = 256             # training scale S; scale_min < scale_max: S ~ U[min, max] per image
  c.data.scale_max = 256
  c.data.eval_scale = 0              # Q for validation during training (0: S, or (Smin+Smax)/2 if jittered)
  c.data.flip = True                 # random horizontal flip
  c.data.color_shift = 0.1           # std of AlexNet's PCA lighting alpha (0 disables)
  c.data.pca_eigval = IMAGENET_EIGVAL  # the colour shift's RGB eigenvalues (0-1 pixels x 255) and eigenvectors
  c.data.pca_eigvec = IMAGENET_EIGVEC  # (columns): ImageNet's; `prepare stats` prints a dataset's own
  c.data.mean_rgb = IMAGENET_MEAN_RGB  # subtracted on the device (0-255 scale)
  c.data.std_rgb = (1.0, 1.0, 1.0)
  c.data.color_order = 'RGB'         # the network's input channel order (BGR for Keras/Caffe weights)
  c.data.num_workers = 8             # Grain worker processes per host (0: in the main process)
  c.data.num_threads = 2             # threads computing batches in each process
  c.data.prefetch = 2                # batches buffered per worker
  c.data.jpeg_dct_scaling = True     # decode large JPEGs at reduced size (same crop geometry, faster)
  c.data.max_consecutive_bad = 100   # unreadable images in a row before the run stops (each is skipped)
  c.data.image_key = 'image'         # TFDS feature names
  c.data.label_key = 'label'
  c.data.boxes_file = ''             # localisation (model.head scr/pcr): per-image boxes of a folder dataset
  c.data.bbox_key = ''               # ... or the TFDS bounding-box feature (objects/bbox)

  # --- training loop (vggjax.train) ---
  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 256    # split over all devices of all hosts (paper: 256 over 4 GPUs)
  c.train.num_epochs = 74            # the paper stopped after 370K iterations (74 epochs)
  c.train.max_steps = 0              # 0: num_epochs; otherwise stop after this many steps
  c.train.log_every_steps = 50
  c.train.eval_every_steps = 0       # 0: at the end of each epoch
  c.train.checkpoint_every_steps = 1000  # also at the end (and at each epoch end, see below)
  c.train.checkpoint_every_epoch = True  # a checkpoint at each epoch end too
  c.train.keep_checkpoints = 3
  c.train.keep_best = False          # also keep the checkpoint of the best val top-1 (WORKDIR/best reads it)
  c.train.nan_policy = 'stop'        # stop (keep the last good checkpoint) or skip (drop the step's update)
  c.train.plot = True                # WORKDIR/curves.png at the end
  c.train.tracker = ''               # '' (none) or wandb: a tracker beside TensorBoard (vggjax.tracking)
  c.train.trainable = ''             # layer-name patterns to train ('fc*', 'fc8', 'conv5_*,fc*'); '' = all
  c.train.accumulate_steps = 1       # micro-batches per global batch (one update each): the paper's 256 on a
                                     # small device, the same loss and gradients up to rounding
  # Recipe knobs beyond the paper (README, "Recipe knobs"); each default is the paper's behaviour.
  c.train.ema_decay = 0.0            # EMA of the parameters (0: none; 0.9999 as timm): evaluated beside them
  c.train.label_smoothing = 0.0      # optax.smooth_labels on the classifier's targets (0: none; 0.1 common)
  c.train.profile_steps = 0          # a jax.profiler trace of this many steps (after the first) in
                                     # WORKDIR/profile, for TensorBoard's profile tab (0: none)
  c.train.loss_scale = 2.0 ** 15     # model.dtype=float16: the initial dynamic loss scale (jmp's; halved on
                                     # an overflow, doubled after 2000 good steps); unused otherwise

  # --- optimizer (vggjax.optim) ---
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 0.01
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 5e-4    # coupled L2 (added to the gradient), as Caffe
  c.optimizer.decay_biases = False   # biases and norm parameters are not decayed by default
  c.optimizer.clip_norm = 0.0        # clip the gradients' global norm to this (0: no clipping, the paper's)
  c.optimizer.schedule = 'plateau'   # plateau (the paper's), step, cosine, constant
  c.optimizer.warmup_epochs = 0.0    # linear warm-up (modern use)
  c.optimizer.plateau_factor = 0.1   # lr divided by 10 ...
  c.optimizer.plateau_patience = 2   # ... when val top-1 has not improved for this many evaluations
  c.optimizer.plateau_cooldown = 0   # evaluations to wait after a reduction
  c.optimizer.plateau_min_delta = 0.0  # an improvement must exceed this (top-1 fraction)
  c.optimizer.plateau_max_reductions = 3  # the paper: lr decreased 3 times
  c.optimizer.step_epochs = (30, 60)  # step schedule: lr *= step_factor at these epochs
  c.optimizer.step_factor = 0.1

  # --- warm start (paper 3.1: B-E from A) ---
  c.init_from = ''                   # a workdir or checkpoint of a net to copy layers from
  c.init_layers = 'paper'            # paper (conv1_1 conv2_1 conv3_1 conv3_2 fc6 fc7 fc8), all (every layer
                                     # whose name and shape match), or names: 'conv1_1,fc6'
  c.init_required = ''               # what init_from must name (set by the :384 and :jitter configs); an
                                     # empty init_from is then an error ('' = optional)

  return c
