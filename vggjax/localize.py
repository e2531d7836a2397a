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
top-1 guesses of each protocol). ``localize(...)`` does the same from Python.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vggjax import boxes as boxes_lib
from vggjax import checkpoints, cli, localization_model, runlog
from vggjax.data import boxes_source, transforms
from vggjax.evaluation import inference
from vggjax.settings import DataSettings

log = logging.getLogger('vggjax')
PROTOCOLS = ('crop', 'dense')
TOP_K = 5


class _Net:
  """A jitted net (variables bound) over uint8 images, with a cache of compiled shapes."""

  def __init__(self, model, variables, norm, method: str):
    variables = jax.device_put(variables)

    def fn(x):
      return inference.logits(model, variables, x, norm, method=method)

    self._fn = jax.jit(fn)
    self.image_size = model.image_size

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(self._fn(jnp.asarray(images)))


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _mean_best_iou(pred: np.ndarray, gts) -> float:
  """The mean over images of the IoU of each image's box with its best-matching true box."""
  return float(np.mean([np.max(boxes_lib.iou(pred[i], gts[i])) for i in range(len(gts))]))


def _crops_in_batches(net: _Net, crops: list[np.ndarray], batch: int) -> np.ndarray:
  out = []
  for i in range(0, len(crops), batch):
    chunk = np.stack(crops[i:i + batch])
    n = len(chunk)
    if n < batch:  # one compiled shape: pad the last batch
      chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(net(chunk)[:n])
  return np.concatenate(out)


def localize(classifier: str, localizer: str, *, protocols: Sequence[str] = PROTOCOLS, scale: int = 0,
             split: str = '', max_images: int = 0, merge_threshold: float = 0.5, batch_size: int = 64,
             data_dir: str = '', progress: bool = True) -> dict:
  """Evaluates (classifier run, localisation run) on a split with boxes; returns eval.json's content plus
  'examples' (per image: the picture at Q and the boxes, for the figure)."""
  unknown = [p for p in protocols if p not in PROTOCOLS]
  if unknown or not protocols:
    raise ValueError(f'protocols {list(protocols)}: unknown {unknown}; valid: {", ".join(PROTOCOLS)}')
  loc_vars, loc_meta = checkpoints.load_weights(localizer)
  head = localization_model.box_head(loc_meta, localizer)
  loc_model = checkpoints.model_from_meta(loc_meta, dropout_rate=0.0)
  cls_vars, cls_meta = checkpoints.load_weights(classifier)
  cls_model = checkpoints.model_from_meta(cls_meta, dropout_rate=0.0)
  num_classes = int(cls_meta['model']['num_classes'])
  if int(loc_meta['model']['num_classes']) != num_classes:
    raise ValueError(f'the classifier {classifier} has {num_classes} classes but the localisation net '
                     f'{localizer} was trained on {loc_meta["model"]["num_classes"]}')
  with open(os.path.join(checkpoints.absolute(localizer), 'config.json')) as f:
    loc_config = json.load(f)
  import ml_collections
  data_cfg = ml_collections.ConfigDict(loc_config['data'])
  if data_dir:
    data_cfg.data_dir = data_dir
  split = split or data_cfg.eval_split
  source = boxes_source.open_source(data_cfg, split)
  data_settings = DataSettings.from_config(data_cfg)  # a field the run's config lacks: configs/default.py's
  q = int(scale or data_settings.eval_scale or data_settings.scale_min)
  size_c, size_l = cls_model.image_size, loc_model.image_size
  if q < max(size_c, size_l):
    raise ValueError(f'the test scale {q} is below a training size ({size_c}, {size_l})')
  k = min(TOP_K, num_classes)
  norm_c = checkpoints.normalization_from_meta(cls_meta)
  norm_l = checkpoints.normalization_from_meta(loc_meta)
  nets = {'cls_crop': _Net(cls_model, cls_vars, norm_c, '__call__'),
          'loc_crop': _Net(loc_model, loc_vars, norm_l, '__call__'),
          'cls_map': _Net(cls_model, cls_vars, norm_c, 'score_map'),
          'loc_map': _Net(loc_model, loc_vars, norm_l, 'score_map')}
  n = min(len(source), max_images) if max_images else len(source)
  t0 = time.time()
  images, labels, gts, scales, crops_c, crops_l, offsets, whole = [], [], [], [], [], [], [], []
  dct = data_settings.jpeg_dct_scaling
  for i in range(n):
    data, label = source.record(i)
    h0, w0 = transforms.dimensions(data)
    h, w = transforms.rescaled_size(h0, w0, q)
    image = transforms.resize(transforms.load(data, q, dct), h, w)
    images.append(image)
    labels.append(int(label))
    gts.append(source.boxes(i))
    scales.append((w / w0, h / h0))
    whole.append([0.0, 0.0, float(w0), float(h0)])
    for crops, s in ((crops_c, size_c), (crops_l, size_l)):
      crops.append(transforms.center_crop(image, s))
    offsets.append(boxes_lib.center_crop_offsets((h, w), size_l))

  def to_original(b: np.ndarray, i: int) -> np.ndarray:
    sx, sy = scales[i]
    return b / np.array([sx, sy, sx, sy])

  result = {'classifier': str(classifier), 'localizer': str(localizer), 'head': head, 'scale': q,
            'split': split, 'num_images': n, 'merge_threshold': merge_threshold, 'iou_threshold':
            boxes_lib.IOU_THRESHOLD, 'protocols': {}}
  examples = [{'image': images[i], 'label': labels[i], 'gt': gts[i], 'scale': scales[i], 'boxes': {}}
              for i in range(min(n, 16))]
  whole_boxes = np.repeat(np.asarray(whole)[:, None], k, axis=1)  # the trivial guess: the whole image
  for protocol in protocols:
    guesses = np.zeros((n, k), np.int64)
    pred = np.zeros((n, k, 4))
    true_class = np.zeros((n, 1, 4))
    if protocol == 'crop':
      posteriors = _softmax(_crops_in_batches(nets['cls_crop'], crops_c, batch_size))
      outputs = _crops_in_batches(nets['loc_crop'], crops_l, batch_size)
      for i in range(n):
        guesses[i] = np.argsort(-posteriors[i], kind='stable')[:k]
        per = boxes_lib.from_target(localization_model.per_class(outputs[i], head, np), size_l)
        top, left = offsets[i]
        per = to_original(per + np.array([left, top, left, top]), i)
        pick = (lambda c: per[0]) if head == 'scr' else (lambda c: per[c])  # noqa: E731
        pred[i] = [pick(c) for c in guesses[i]]
        true_class[i, 0] = pick(labels[i])
    else:
      bar = runlog.progress_bar(n, 'localize (dense)', unit='img', enabled=progress)
      for i in range(n):
        bar.update(1)
        x = images[i][None]
        score_map = nets['cls_map'](x)[0]  # (h, w, classes)
        box_map = nets['loc_map'](x)[0]  # (h', w', 4 or 4 x classes)
        posterior = _softmax(score_map.reshape(-1, num_classes).mean(0))
        guesses[i] = np.argsort(-posterior, kind='stable')[:k]
        cells = localization_model.cell_boxes(box_map, size_l, head)  # (h', w', K, 4)
        same_grid = score_map.shape[:2] == box_map.shape[:2]
        cell_posteriors = _softmax(score_map) if same_grid else None

        def merged(c: int) -> np.ndarray:
          b = cells[:, :, 0 if head == 'scr' else c].reshape(-1, 4)
          s = (cell_posteriors[..., c].reshape(-1) if same_grid else np.full(len(b), posterior[c]))
          best, _, _ = boxes_lib.greedy_merge(b, s, merge_threshold)
          return to_original(best[0], i)

        pred[i] = [merged(int(c)) for c in guesses[i]]
        true_class[i, 0] = merged(labels[i])
      bar.close()
    truth = np.array(labels)[:, None]
    row = {
        'top1_error': boxes_lib.localization_error(guesses, pred, labels, gts, k=1),
        f'top{k}_error': boxes_lib.localization_error(guesses, pred, labels, gts, k=k),
        'gt_class_error': boxes_lib.localization_error(truth, true_class, labels, gts, k=1),
        'mean_iou_gt_class': _mean_best_iou(true_class[:, 0], gts),
        'whole_image_top1_error': boxes_lib.localization_error(guesses, whole_boxes, labels, gts, k=1),
        f'whole_image_top{k}_error': boxes_lib.localization_error(guesses, whole_boxes, labels, gts, k=k),
        'whole_image_gt_class_error': boxes_lib.localization_error(
            np.array(labels)[:, None], whole_boxes[:, :1], labels, gts, k=1),
        'whole_image_mean_iou': _mean_best_iou(whole_boxes[:, 0], gts),
        'classification_top1_error': float(np.mean(guesses[:, 0] != np.array(labels))),
        f'classification_top{k}_error': float(np.mean(~np.any(guesses == np.array(labels)[:, None], 1))),
    }
    result['protocols'][protocol] = row
    for i, ex in enumerate(examples):
      ex['boxes'][protocol] = (int(guesses[i, 0]), pred[i, 0])
  result['wall_s'] = time.time() - t0
  result['class_names'] = list(source.class_names) if source.class_names else None
  result['examples'] = examples
  return result


def save_figure(result: dict, path: str, columns: int = 4) -> str:
  """A grid of test images (at Q): the true box in green, the top-1 guess of each protocol (crop: orange,
  dense: red), captioned with the true and guessed classes."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  examples = result['examples']
  names = result.get('class_names') or [str(c) for c in range(1000)]
  rows = max(1, -(-len(examples) // columns))
  fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
  colours = {'crop': 'orange', 'dense': 'red'}
  for ax in axes.ravel():
    ax.axis('off')
  for ax, ex in zip(axes.ravel(), examples):
    ax.imshow(ex['image'])
    sx, sy = ex['scale']
    at_q = lambda b: np.asarray(b) * np.array([sx, sy, sx, sy])  # noqa: E731
    for b in ex['gt']:
      x0, y0, x1, y1 = at_q(b)
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color='lime', lw=2))
    caption = [f'true: {names[ex["label"]]}']
    for protocol, (c, b) in ex['boxes'].items():
      x0, y0, x1, y1 = at_q(b)
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=colours[protocol], lw=1.5,
                                 ls='--' if protocol == 'crop' else '-'))
      caption.append(f'{protocol}: {names[c]}')
    ax.set_title('\n'.join(caption), fontsize=7)
  fig.suptitle('green: true box; orange dashed: central crop; red: dense + merging', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return path


def write_results(result: dict, workdir: str) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, 'eval.json')
  with open(path, 'w') as f:
    json.dump({k: v for k, v in result.items() if k != 'examples'}, f, indent=2, sort_keys=True)
  save_figure(result, os.path.join(workdir, 'localization.png'))
  return path


def format_table(result: dict) -> str:
  """A table like the paper's Table 8 (top-1/top-5 localisation error, %)."""
  lines = [f'localisation error (%), {result["head"].upper()}, Q={result["scale"]}, {result["num_images"]} '
           f'images (IoU > {result["iou_threshold"]})',
           f'{"protocol":<10} {"top-1":>7} {"top-5":>7} {"true class":>11} {"whole image top-5":>18}']
  for protocol, r in result['protocols'].items():
    top5 = next(v for key, v in r.items() if key.startswith('top') and key != 'top1_error')
    w5 = next(v for key, v in r.items()
              if key.startswith('whole_image_top') and key != 'whole_image_top1_error')
    lines.append(f'{protocol:<10} {100 * r["top1_error"]:7.1f} {100 * top5:7.1f} '
                 f'{100 * r["gt_class_error"]:11.1f} {100 * w5:18.1f}')
  return '\n'.join(lines)


def _define_flags():
  from absl import flags
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
  f['num_cpu_devices'] = flags.DEFINE_integer('num_cpu_devices', 0, 'Virtual CPU devices for CPU runs.')
  flags.mark_flags_as_required(['workdir', 'classifier', 'localizer'])
  return f


def main(argv, flag_holders) -> None:
  from absl import app
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
