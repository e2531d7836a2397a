"""Imports published VGG weights into a vggjax weights directory: a local file, or a published one by name.

    python -m vggjax.convert --from=torchvision --src=vgg16-397923af.pth --model=vgg16 --out=weights/vgg16_tv
    python -m vggjax.convert --from=keras --src=vgg16_weights_tf_dim_ordering_tf_kernels.h5 --model=vgg16 \\
        --out=weights/vgg16_keras
    python -m vggjax.convert --from=torchvision --weights=vgg16       # downloaded, verified, cached (vggjax.hub)

Sources:

* torchvision vgg11/13/16/19 and their _bn variants, as a ``.pth`` state dict or a ``.safetensors`` file,
  also in timm's naming (``vgg16.tv_in1k`` and friends: pre_logits.fc1/fc2, head.fc);
* Keras applications VGG16 and VGG19: the published ``.h5`` weight files, a legacy full-model ``.h5``,
  Keras 3 ``.weights.h5`` or ``.keras``.

``--weights=NAME`` downloads the published file of that name (vggjax.hub: torchvision's, Keras', timm's) into
the cache ($VGGJAX_CACHE, default ~/.cache/vggjax), checks it against its published checksum, converts it
(to --out, or by default once into the cache) and reuses the cache on the next call.

Files are read without running pickled code (torch.load(weights_only=True), safetensors, h5py). The weights
directory (DIR/variables, DIR/vggjax.json) records the model, the source and the preprocessing the weights
expect (torchvision: RGB in [0, 1] with ImageNet mean/std; Keras/Caffe: BGR, mean subtracted on the 0-255
scale), which vggjax applies; evaluate, predict, features and ``init_from`` read it.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from vggjax import checkpoints, hub, models, weights

SOURCES = hub.SOURCES
convert = hub.convert_file  # the library function, under this module's name of old


def _define_flags():
  flags.DEFINE_enum('from', None, list(SOURCES),
                    'Framework the weights come from (default: from the file name: .pth/.pt/.bin/'
                    '.safetensors -> torchvision, .h5/.keras -> keras; with --weights: torchvision).')
  flags.DEFINE_string('src', None, 'The weight file: .pth/.safetensors (torchvision, timm) or '
                      '.h5/.weights.h5/.keras (Keras applications).')
  flags.DEFINE_string('weights', None, 'Published weights by name instead of --src: downloaded into the '
                      'cache ($VGGJAX_CACHE, default ~/.cache/vggjax), verified and converted once. '
                      'torchvision: ' + ', '.join(hub.names('torchvision')) + '; keras: ' +
                      ', '.join(hub.names('keras')) + '; timm: ' + ', '.join(hub.names('timm')) +
                      '. $VGGJAX_WEIGHTS_URL: a mirror of the source\'s base URL.')
  flags.DEFINE_string('model', None, f'vggjax model name ({", ".join(models.MODEL_NAMES)}); '
                      'inferred from the file when not given (--src).')
  flags.DEFINE_string('out', None, 'Weights directory to write (DIR/variables, DIR/vggjax.json); with '
                      '--weights, default: the one in the cache.')
  flags.DEFINE_integer('num_classes', None, 'Expected number of classes (checked; default: the file\'s).')
  flags.DEFINE_integer('image_size', 224, 'Training resolution of the weights (fc6 spans image_size // 32).')
  flags.DEFINE_string('labels', 'auto', "Class names to record: 'auto' (ImageNet's for 1000 classes), "
                      "'imagenet2012', a text file with one name per line, or 'none'.")


def _convert(f) -> tuple[str, dict, str]:
  """(source, metadata, weights directory) of what the flags ask for."""
  if bool(f.src) == bool(f.weights):
    raise ValueError('give either --src=FILE (a weight file) or --weights=NAME (published weights by name), '
                     + ('not both' if f.src else 'one of them'))
  if f.weights:
    source = f['from'].value or 'torchvision'
    out = hub.weights_dir(source, f.weights, out=f.out)
    return source, checkpoints.load_meta(out), os.fspath(out)
  if not f.out:
    raise ValueError('--out=DIR is needed with --src (the weights directory to write)')
  source = f['from'].value or weights.source_from_path(f.src)
  meta = convert(source, f.src, f.out, f.model, num_classes=f.num_classes, image_size=f.image_size,
                 labels=f.labels)
  return source, meta, f.out


def main(argv):
  if not flags.FLAGS['verbosity'].present:  # library INFO logs (Orbax) only when asked for
    absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  try:
    source, meta, out = _convert(flags.FLAGS)
  except (weights.ConversionError, hub.DownloadError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(1) from None
  m = meta['model']
  count = models.param_count(checkpoints.model_from_meta(meta))
  norm = meta['normalization']
  print(f'{m["name"]} ({count:,} parameters, {m["num_classes"]} classes) from {source} {meta["source_file"]}')
  print(f'preprocessing: {norm["color_order"]}, x * {norm["scale"]:.6g} - mean {norm["mean"]}, '
        f'/ std {norm["std"]}')
  print(f'weights directory: {os.path.abspath(out)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
