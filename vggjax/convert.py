"""Imports published VGG weights into a vggjax weights directory.

    python -m vggjax.convert --from=torchvision --src=vgg16-397923af.pth --model=vgg16 --out=weights/vgg16_tv
    python -m vggjax.convert --from=keras --src=vgg16_weights_tf_dim_ordering_tf_kernels.h5 --model=vgg16 \\
        --out=weights/vgg16_keras

Sources:

* torchvision vgg11/13/16/19 and their _bn variants, as a ``.pth`` state dict or a ``.safetensors`` file,
  also in timm's naming (``vgg16.tv_in1k`` and friends: pre_logits.fc1/fc2, head.fc);
* Keras applications VGG16 and VGG19: the published ``.h5`` weight files, a legacy full-model ``.h5``,
  Keras 3 ``.weights.h5`` or ``.keras``.

Files are read without running pickled code (torch.load(weights_only=True), safetensors, h5py). The weights
directory (DIR/variables, DIR/vggjax.json) records the model, the source and the preprocessing the weights
expect (torchvision: RGB in [0, 1] with ImageNet mean/std; Keras/Caffe: BGR, mean subtracted on the 0-255
scale), which vggjax applies; evaluate, predict, features and ``init_from`` read it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import sys
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from vggjax import checkpoints, labels as labels_lib, models, weights
from vggjax.preprocessing import Normalization

SOURCES = ('torchvision', 'keras')


def _sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _labels_for(labels: str | None, num_classes: int) -> Any:
  """What to record as the class names: ImageNet's for 1000-class weights ('auto'), a file's, or none."""
  if labels in (None, '', 'none'):
    return None
  if labels == 'auto':
    labels = labels_lib.IMAGENET if num_classes == labels_lib.NUM_IMAGENET_CLASSES else 'none'
    if labels == 'none':
      return None
  if labels == labels_lib.IMAGENET:
    try:
      names = list(labels_lib.imagenet_names())
    except (OSError, ValueError) as e:
      logging.warning('ImageNet class names unavailable (%s); recording %r', e, labels_lib.IMAGENET)
      return labels_lib.IMAGENET
  else:
    names = labels_lib.read_labels_file(labels)
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} class names for {num_classes} classes')
  return names


def convert(source: str, src: str | os.PathLike, out: str | os.PathLike, model: str | None = None, *,
            num_classes: int | None = None, image_size: int = 224, labels: str | None = 'auto') -> dict:
  """Converts the weight file ``src`` of ``source`` ('torchvision' or 'keras') to the weights directory
  ``out`` and returns its metadata.

  Args:
    model: the vggjax model name (vgg16, vgg16_bn, ...); inferred from the file when None.
    num_classes: checked against the file when given.
    image_size: the training resolution the weights were made for (224 for every published VGG).
    labels: class names to record: 'auto' (ImageNet's for 1000 classes), 'imagenet2012', a text file
      with one name per line, or None.
  """
  if source not in SOURCES:
    raise ValueError(f'unknown source {source!r}; valid: {", ".join(SOURCES)}')
  src = pathlib.Path(src)
  if not src.is_file():
    raise FileNotFoundError(f'no weight file {src}')
  variables, name = weights.load_file(source, src, model, num_classes=num_classes, image_size=image_size)
  fc8 = variables['params']['fc8']['kernel']
  fc6 = variables['params']['fc6']['kernel']
  meta = {
      'model': {'name': name, 'num_classes': int(fc8.shape[-1]), 'image_size': image_size, 'width': 1.0,
                'fc_features': int(fc6.shape[-1])},
      'normalization': Normalization.from_dict(weights.preprocessing_for(source)).to_dict(),
      'source': source,
      'source_file': src.name,
      'source_sha256': _sha256(src),
      'labels': _labels_for(labels, int(fc8.shape[-1])),
  }
  checkpoints.save_weights(out, variables, meta)
  return checkpoints.load_meta(out)  # as written (JSON: lists, not tuples)


def _define_flags():
  flags.DEFINE_enum('from', None, list(SOURCES),
                    'Framework the weights come from (default: from the file name: .pth/.pt/.bin/'
                    '.safetensors -> torchvision, .h5/.keras -> keras).')
  flags.DEFINE_string('src', None, 'The weight file: .pth/.safetensors (torchvision, timm) or '
                      '.h5/.weights.h5/.keras (Keras applications).')
  flags.DEFINE_string('model', None, f'vggjax model name ({", ".join(models.MODEL_NAMES)}); '
                      'inferred from the file when not given.')
  flags.DEFINE_string('out', None, 'Weights directory to write (DIR/variables, DIR/vggjax.json).')
  flags.DEFINE_integer('num_classes', None, 'Expected number of classes (checked; default: the file\'s).')
  flags.DEFINE_integer('image_size', 224, 'Training resolution of the weights (fc6 spans image_size // 32).')
  flags.DEFINE_string('labels', 'auto', "Class names to record: 'auto' (ImageNet's for 1000 classes), "
                      "'imagenet2012', a text file with one name per line, or 'none'.")
  flags.mark_flags_as_required(['src', 'out'])


def main(argv):
  if not flags.FLAGS['verbosity'].present:  # library INFO logs (Orbax) only when asked for
    absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise SystemExit(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  source = f['from'].value or weights.source_from_path(f.src)
  try:
    meta = convert(source, f.src, f.out, f.model, num_classes=f.num_classes, image_size=f.image_size,
                   labels=f.labels)
  except (weights.ConversionError, FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    raise SystemExit(1) from None
  m = meta['model']
  count = models.param_count(checkpoints.model_from_meta(meta))
  norm = meta['normalization']
  print(f'{m["name"]} ({count:,} parameters, {m["num_classes"]} classes) from {source} {meta["source_file"]}')
  print(f'preprocessing: {norm["color_order"]}, x * {norm["scale"]:.6g} - mean {norm["mean"]}, '
        f'/ std {norm["std"]}')
  print(f'wrote {os.path.abspath(f.out)}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
