"""The localisation evaluation of the paper (section 4.5, Appendix A): class guesses from a classification
net, boxes from a localisation net, and the ILSVRC localisation error.

    python -m vggjax.localize --workdir=OUT --classifier=CLS_RUN --localizer=LOC_RUN [--protocols=crop,dense]

Per image (rescaled so its smaller side is Q, by default the localisation run's test scale):

* the classifier gives the top-5 classes (the class score map averaged over the whole image for ``dense``,
  the central crop's scores for ``crop``);
* ``crop``: the localisation net on the central crop; each guessed class gets its box (per-class regression)
  or the shared box (single-class regression);
* ``dense``: the localisation net over the whole image (fully convolutional) gives a box per cell of its
  output map, per class or shared. For each guessed class, those boxes are merged greedily (OverFeat's
  merging, ``vggjax.boxes.greedy_merge``) with, as each cell's score, the classifier's posterior of the class
  at the same cell (the two nets' maps line up when they share the training size; otherwise the image's
  posterior), and the merged box with the highest summed score is the guess.

A guess is right when its class is the image's and its box overlaps a ground-truth box by IoU > 0.5; an
image counts as right at top-5 if one of its five guesses is (``vggjax.boxes.localization_error``). The same
class guesses are also scored with the whole image as the box (the trivial baseline), and the boxes alone
with the true class given (``gt_class_error``: the localisation net's own error).

Results go to WORKDIR/eval.json and WORKDIR/localization.png (test images with the true box in green and the
top-1 guesses of each protocol). ``localize(...)`` does the same from Python
(vggjax.evaluation.localization, the library of this command).
"""

from __future__ import annotations

from absl import app, flags

from vggjax import cli
from vggjax.evaluation.localization import (PROTOCOLS, TOP_K, format_table, localize,  # noqa: F401
                                            save_figure, write_results)

def _define_flags():
  f = {}
  f['workdir'] = flags.DEFINE_string('workdir', None, 'Where eval.json and localization.png go.')
  f['classifier'] = flags.DEFINE_string('classifier', None, 'The classification run (workdir, checkpoint '
                                        'step directory or weights directory) that guesses the classes.')
  f['localizer'] = flags.DEFINE_string('localizer', None, 'The localisation run (model.head scr or pcr).')
  f['protocols'] = flags.DEFINE_list('protocols', list(PROTOCOLS), f'Any of {", ".join(PROTOCOLS)}.')
  f['scale'] = flags.DEFINE_integer('scale', 0, 'The test scale Q (0: the localisation run\'s).')
  f['split'] = flags.DEFINE_string('split', '', 'The split (default: the localisation run\'s eval split).')
  f['data_dir'] = flags.DEFINE_string('data_dir', '', 'The data directory (default: the localisation '
                                      'run\'s).')
  f['max_images'] = flags.DEFINE_integer('max_images', 0, 'Evaluate the first N images only (0: all).')
  f['merge_threshold'] = flags.DEFINE_float('merge_threshold', 0.5, 'IoU at which greedy merging joins two '
                                            'boxes (dense).')
  f.update(cli.define_cpu_flag())
  flags.mark_flags_as_required(['workdir', 'classifier', 'localizer'])
  return f


def main(argv, flag_holders) -> None:
  f = cli.start_command(argv, flag_holders)
  try:
    result = localize(f['classifier'], f['localizer'], protocols=f['protocols'], scale=f['scale'],
                      split=f['split'], max_images=f['max_images'], merge_threshold=f['merge_threshold'],
                      data_dir=f['data_dir'])
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e))
  path = write_results(result, f['workdir'])
  print(format_table(result))
  print(f'{result["num_images"]} images in {result["wall_s"]:.1f} s; results in {path}', flush=True)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
