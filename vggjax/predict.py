"""Classifies images with a weights directory or a training run: top-5 classes and their probabilities.

    python -m vggjax.predict --checkpoint=weights/vgg16_tv photo.jpg [more.jpg | folder ...]
    python -m vggjax.predict --checkpoint=weights/vgg16_tv --protocol=dense --scales=256,384,512 --json *.jpg

Protocols (paper section 3.2):

* ``single``: the image is rescaled so that its smaller side is Q, and the central crop of the training size
  is classified. By default Q = image_size * 256 / 224 (256 at 224, as torchvision and Caffe evaluate), or,
  for a vggjax training run, the paper's Q for its training scales: S, or (Smin + Smax) / 2 if jittered;
* ``dense``: the whole image rescaled to Q goes through the fully convolutional network; the class score map
  is averaged over space, and the softmax posteriors of the image and its horizontal flip are averaged.

With several scales (``--scales=256,384,512``) the posteriors of all scales are averaged. The images are
normalised as the weights' metadata says (vggjax.json's normalization), so converted weights see exactly
what their source framework fed them; they are read upright (EXIF orientation) and rescaled and cropped in
torchvision's style (``vggjax.data.transforms``, style='torchvision'). The classification runs through
``vggjax.evaluation``'s ImageEvaluator and posterior function, as every evaluation in vggjax does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from vggjax import checkpoints, cli, export, labels as labels_lib
from vggjax.data.transforms import dimensions, list_images
from vggjax.evaluation import ImageEvaluator, ImageSettings, posterior_fn
from vggjax.preprocessing import single_test_scale

PROTOCOLS = ('single', 'dense')
BACKENDS = ('jax', 'onnxruntime')


# ------------------------------------------------------------------------------------------------ predict

def default_scale(meta: dict) -> int:
  """The default Q: for a training run the paper's (section 4.1): S, or (Smin + Smax) / 2 for jittered S;
  otherwise image_size * 256 / 224 (256 at 224: the ratio torchvision and Caffe evaluate at)."""
  data = meta.get('data') or {}
  if data.get('scale_min') and data.get('scale_max'):
    return single_test_scale(data['scale_min'], data['scale_max'])
  return int(round(meta['model']['image_size'] * 256 / 224))


def predict(variables: Any, meta: dict, images: Sequence[Any], *, protocol: str = 'single',
            scales: Sequence[int] | None = None, batch_size: int = 8, progress: bool = False,
            fn: Any = None) -> np.ndarray:
  """Class posteriors (N, num_classes) of images (uint8 RGB arrays or paths).

  Args:
    variables: the model's variables ({'params', ['batch_stats']}), e.g. from checkpoints.load_weights.
    meta: the weights metadata (model, normalization).
    protocol: 'single' (central crop of the image rescaled to Q) or 'dense' (whole image at Q, score map
      averaged, averaged with the flipped image).
    fn: the posterior function (variables, uint8 images) in place of the network's (e.g. an exported model
      in ONNX Runtime: ``export.onnx_posterior_fn``).
    scales: the Qs whose posteriors are averaged (default: ``default_scale(meta)``).
  """
  if protocol not in PROTOCOLS:
    raise ValueError(f'unknown protocol {protocol!r}; valid: {", ".join(PROTOCOLS)}')
  model = checkpoints.model_from_meta(meta)
  size = model.image_size
  scales = [int(q) for q in (scales or [default_scale(meta)])]
  if min(scales) < size:
    raise ValueError(f'scales {scales} must be at least the training size {size}')
  images = list(images)
  fn = fn or posterior_fn(model, checkpoints.normalization_from_meta(meta), flip=protocol == 'dense')
  settings = ImageSettings(scales=tuple(scales), crop=size if protocol == 'single' else None,
                           style='torchvision', batch_size=batch_size, progress=progress, desc='predict')
  per_scale = ImageEvaluator(fn, settings).run(variables, images)
  total = np.zeros((len(images), model.num_classes), np.float64)
  for rows in per_scale:
    if rows is not None:
      total += rows
  return (total / len(scales)).astype(np.float32)


@dataclasses.dataclass
class Prediction:
  file: str
  indices: list[int]
  names: list[str] | None
  probabilities: list[float]

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def top_k(probabilities: np.ndarray, files: Sequence[str], names: Sequence[str] | None = None,
          k: int = 5) -> list[Prediction]:
  """The k most probable classes of each image, most probable first."""
  k = min(k, probabilities.shape[1])
  out = []
  for f, p in zip(files, probabilities):
    idx = np.argsort(-p, kind='stable')[:k]
    out.append(Prediction(file=str(f), indices=[int(i) for i in idx],
                          names=[names[i] for i in idx] if names is not None else None,
                          probabilities=[float(p[i]) for i in idx]))
  return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
  lines = []
  for pred in predictions:
    lines.append(pred.file)
    for rank, (i, p) in enumerate(zip(pred.indices, pred.probabilities)):
      name = f'  {pred.names[rank]}' if pred.names is not None else ''
      lines.append(f'  {rank + 1}. {p:8.4f}  {i:5d}{name}')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------------------ CLI

def _define_flags():
  flags.DEFINE_string('checkpoint', None, 'A weights directory (from vggjax.convert) or a training workdir '
                      '(its latest checkpoint), WORKDIR/best (its best val top-1 one, train.keep_best) or '
                      'WORKDIR/checkpoints/<step>.')
  flags.DEFINE_enum('protocol', 'single', list(PROTOCOLS), 'single: central crop of the image rescaled to Q; '
                    'dense: the whole image at Q, score map averaged, averaged with its flip.')
  flags.DEFINE_list('scales', [], 'Q values whose posteriors are averaged (default: image_size * 256 / 224; '
                    'for a training run S, or (Smin + Smax) / 2 if S was jittered).')
  flags.DEFINE_boolean('json', False, 'Print a JSON list (per image: file, indices, names, probabilities).')
  flags.DEFINE_integer('top_k', 5, 'How many classes to print per image.')
  flags.DEFINE_integer('batch_size', 8, 'Images per forward pass.')
  flags.DEFINE_string('labels', None, 'A text file of class names (one per line) overriding the '
                      'checkpoint\'s.')
  flags.DEFINE_enum('backend', 'jax', list(BACKENDS), 'jax: the checkpoint in vggjax; onnxruntime: an ONNX '
                    'model from `vggjax export --format=onnx` (--checkpoint=MODEL.onnx) in ONNX Runtime.')
  flags.mark_flag_as_required('checkpoint')


def main(argv):
  f = flags.FLAGS
  if not f['verbosity'].present:  # library INFO logs (Orbax) only when asked for
    absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) < 2:
    raise SystemExit('usage: python -m vggjax.predict --checkpoint=DIR [--protocol=single|dense] '
                     '[--scales=256,384] [--json] IMAGE_OR_FOLDER...')
  files = list_images(argv[1:])
  if not files:
    raise SystemExit(f'no images found in {argv[1:]}')
  files, skipped = cli.readable_images(files, dimensions)  # an unreadable one is named on stderr; the rest go on
  fn = None
  if f.backend == 'onnxruntime':
    fn, meta = export.onnx_posterior_fn(f.checkpoint, flip=f.protocol == 'dense')
    variables = None
  else:
    variables, meta = checkpoints.load_weights(f.checkpoint)
  num_classes = meta['model']['num_classes']
  names = labels_lib.resolve(f.labels or meta.get('labels'), num_classes)
  probs = predict(variables, meta, files, protocol=f.protocol, scales=[int(s) for s in f.scales] or None,
                  batch_size=f.batch_size, progress=len(files) > 16, fn=fn)
  predictions = top_k(probs, files, names, f.top_k)
  if f.json:
    print(json.dumps([p.to_dict() for p in predictions], indent=1))
  else:
    print(format_predictions(predictions))
  cli.skipped_images(skipped, f'{len(predictions)} image(s) classified')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
