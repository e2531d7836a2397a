"""Image descriptors from a VGG network, as in the paper's Appendix B.

An image is rescaled so that its smaller side is Q and goes through the fully convolutional network; the fc7
activations (4096-D, after ReLU) are averaged over the map, then averaged with those of the horizontally
flipped image. Descriptors of several scales Q are averaged ('average') or concatenated ('stack'), and the
result is L2-normalised.

    python -m vggjax.features --checkpoint=weights/vgg16_tv --out=feats.npz FOLDER [FOLDER_OR_IMAGE ...]

writes feats.npz with 'features' (N, D) float32 and 'files' (N,) (a .npy --out writes the features and lists
the files in OUT.files.txt). From Python:

    variables, meta = vggjax.checkpoints.load_weights('weights/vgg16_tv')
    feats = vggjax.features.extract(variables, meta, images, scales=(256, 384, 512))
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from vggjax import checkpoints, cli
from vggjax.data.transforms import dimensions, list_images
from vggjax.descriptors import COMBINE, PAPER_SCALES, Descriptors, check_combine, combine_scales


def extract(variables: Any, meta: dict, images: Sequence[Any], scales: Sequence[int] = PAPER_SCALES,
            combine: str = 'average', *, batch_size: int = 8, progress: bool = False, flip: bool = True
            ) -> np.ndarray:
  """L2-normalised fc7 descriptors (N, D) of images (uint8 RGB arrays or paths): D = fc7's width for
  'average', len(scales) times that for 'stack'.

  Args:
    variables: the model's variables, e.g. from checkpoints.load_weights.
    meta: the weights metadata (model, normalization).
    scales: the smaller-side sizes Q (each at least the training size).
    combine: 'average' or 'stack' the per-scale descriptors.
    batch_size: images of equal size per forward pass.
    progress: show a progress bar on stderr.
    flip: average with the horizontally flipped image's descriptor (the paper's; False: the image alone).
  """
  check_combine(combine)
  # Images are decoded a chunk at a time, so a large folder is never held in memory at once.
  per_scale = Descriptors(batch_size=batch_size, progress=progress).of_images(variables, meta, images, scales,
                                                                              flip=flip)
  return combine_scales(per_scale, combine)


def save(out: str | os.PathLike, features: np.ndarray, files: Sequence[str], **info) -> pathlib.Path:
  """Writes features and file names: OUT.npz ('features', 'files', and ``info``) or OUT.npy plus
  OUT.files.txt."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  if out.suffix == '.npy':
    np.save(out, features)
    out.with_suffix('.files.txt').write_text(''.join(f'{f}\n' for f in files))
  else:
    if out.suffix != '.npz':
      out = out.with_name(out.name + '.npz')
    np.savez(out, features=features, files=np.asarray(list(files), dtype=str),
             **{k: np.asarray(v) for k, v in info.items()})
  return out


def _define_flags():
  flags.DEFINE_string('checkpoint', None, 'A weights directory (from vggjax.convert) or a training workdir.')
  flags.DEFINE_string('out', None, 'Output file: .npz (features, files) or .npy (plus OUT.files.txt).')
  flags.DEFINE_list('scales', [str(q) for q in PAPER_SCALES], 'Smaller-side sizes Q (paper: 256,384,512).')
  flags.DEFINE_enum('combine', 'average', list(COMBINE), 'Average the per-scale descriptors, or stack them.')
  flags.DEFINE_integer('batch_size', 8, 'Images of equal size per forward pass.')
  flags.mark_flags_as_required(['checkpoint', 'out'])


def main(argv):
  f = flags.FLAGS
  if not f['verbosity'].present:  # library INFO logs (Orbax) only when asked for
    absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) < 2:
    raise SystemExit('usage: python -m vggjax.features --checkpoint=DIR --out=feats.npz FOLDER_OR_IMAGE...')
  files = list_images(argv[1:])
  if not files:
    raise SystemExit(f'no images found in {argv[1:]}')
  files, skipped = cli.readable_images(files, dimensions)  # an unreadable one is named on stderr; the rest go on
  variables, meta = checkpoints.load_weights(f.checkpoint)
  scales = [int(q) for q in f.scales]
  feats = extract(variables, meta, files, scales, f.combine, batch_size=f.batch_size, progress=True)
  out = save(f.out, feats, files, scales=scales, combine=f.combine)
  print(f'{feats.shape[0]} descriptors of {feats.shape[1]} dimensions -> {out}', file=sys.stderr)
  cli.skipped_images(skipped, f'{feats.shape[0]} descriptors written')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
