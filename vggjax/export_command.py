"""Exports a checkpoint for serving: a StableHLO or ONNX artefact of uint8 RGB images in, the network's
outputs out, with the weights' normalisation baked in, and a side file (labels, input contract, sha256 of
the weights, vggjax version).

    vggjax export --checkpoint=weights/vgg16_tv --format=onnx --out=serve/vgg16.onnx
    vggjax export --checkpoint=WORKDIR --format=stablehlo --out=serve/vgg16.stablehlo

writes OUT (the fixed entry: batch x S x S x 3, S the training size, batch symbolic), OUT with ``.dense``
before its suffix (the fully convolutional entry: height and width symbolic, the class score map averaged)
and OUT with the suffix ``.json`` (the side file). The checkpoint is anything ``vggjax predict`` accepts. Run
the ONNX one in ONNX Runtime with ``vggjax predict --backend=onnxruntime --checkpoint=OUT IMAGE...``; the
StableHLO one with ``jax.export.deserialize(open(OUT, 'rb').read()).call(images)``. See vggjax.export.
"""

from __future__ import annotations

import sys

from absl import app, flags
from absl import logging as absl_logging

from vggjax import cli, export, predict


def _define_flags():
  flags.DEFINE_string('checkpoint', None, 'A weights directory (from vggjax convert), a training workdir '
                      '(its latest checkpoint) or WORKDIR/checkpoints/<step>.')
  flags.DEFINE_enum('format', 'onnx', list(export.FORMATS), 'stablehlo: jax.export (run with jax alone); '
                    'onnx: jax2onnx (the export extra), for ONNX Runtime and other ONNX servers.')
  flags.DEFINE_string('out', None, 'The artefact\'s file (e.g. model.onnx); model.dense.onnx and model.json '
                      'are written next to it.')
  flags.DEFINE_list('platforms', ['cpu'], 'StableHLO only: the platforms to lower for (cpu, cuda, rocm, tpu).')
  flags.mark_flag_as_required('checkpoint')
  flags.mark_flag_as_required('out')


def main(argv):
  f = flags.FLAGS
  if not f['verbosity'].present:  # library INFO logs (Orbax) only when asked for
    absl_logging.set_verbosity(absl_logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; usage: vggjax export --checkpoint=DIR '
                         f'--format=stablehlo|onnx --out=FILE')
  try:
    export.paths(f.out)
    servable = export.load(f.checkpoint)
    files = export.write(servable, f.format, f.out, scale=predict.default_scale(servable.meta),
                         platforms=f.platforms)
  except ImportError as e:
    raise cli.CommandError(f'--format={f.format} needs {e.name}: pip install "vggjax[export]"') from None
  print(f'{servable.model.image_size}x{servable.model.image_size} {servable.head} net, weights sha256 '
        f'{servable.sha256[:12]}... -> {files["fixed"]}, {files["dense"]}, {files["side"]}', file=sys.stderr)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
