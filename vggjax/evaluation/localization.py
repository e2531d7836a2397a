"""The localisation evaluation of the paper (section 4.5, Appendix A), the library of `vggjax localize`
(vggjax/localize.py describes the protocols): class guesses from a classification net, boxes from a
localisation net, the ILSVRC localisation error, the figure and the table."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vggjax import boxes as boxes_lib
from vggjax import checkpoints, localization_model, plots, rundir, runlog
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


@dataclasses.dataclass
class _Nets:
  """The two runs' nets, jitted on crops and as score maps, with what the protocols need of them."""
  head: str
  num_classes: int
  size_c: int
  size_l: int
  cls_crop: _Net
  loc_crop: _Net
  cls_map: _Net
  loc_map: _Net


def _load_nets(classifier: str, localizer: str) -> tuple[_Nets, dict]:
  """The classifier's and the localisation net's jitted forms, and the localisation run's config."""
  loc_vars, loc_meta = checkpoints.load_weights(localizer)
  head = localization_model.box_head(loc_meta, localizer)
  loc_model = checkpoints.model_from_meta(loc_meta, dropout_rate=0.0)
  cls_vars, cls_meta = checkpoints.load_weights(classifier)
  cls_model = checkpoints.model_from_meta(cls_meta, dropout_rate=0.0)
  num_classes = int(cls_meta['model']['num_classes'])
  if int(loc_meta['model']['num_classes']) != num_classes:
    raise ValueError(f'the classifier {classifier} has {num_classes} classes but the localisation net '
                     f'{localizer} was trained on {loc_meta["model"]["num_classes"]}')
  loc_config = rundir.require_config(checkpoints.absolute(localizer), 'the localisation run\'s data')
  norm_c = checkpoints.normalization_from_meta(cls_meta)
  norm_l = checkpoints.normalization_from_meta(loc_meta)
  nets = _Nets(head=head, num_classes=num_classes, size_c=cls_model.image_size, size_l=loc_model.image_size,
               cls_crop=_Net(cls_model, cls_vars, norm_c, '__call__'),
               loc_crop=_Net(loc_model, loc_vars, norm_l, '__call__'),
               cls_map=_Net(cls_model, cls_vars, norm_c, 'score_map'),
               loc_map=_Net(loc_model, loc_vars, norm_l, 'score_map'))
  return nets, loc_config


@dataclasses.dataclass
class _Images:
  """The split's first n images rescaled to Q, their labels, true boxes and central crops."""
  images: list = dataclasses.field(default_factory=list)
  labels: list = dataclasses.field(default_factory=list)
  gts: list = dataclasses.field(default_factory=list)
  scales: list = dataclasses.field(default_factory=list)  # (w / w0, h / h0): Q over the original
  crops_c: list = dataclasses.field(default_factory=list)
  crops_l: list = dataclasses.field(default_factory=list)
  offsets: list = dataclasses.field(default_factory=list)  # the localisation crop's (top, left)
  whole: list = dataclasses.field(default_factory=list)  # the whole image as a box (original pixels)

  def to_original(self, b: np.ndarray, i: int) -> np.ndarray:
    sx, sy = self.scales[i]
    return b / np.array([sx, sy, sx, sy])


def _read_images(source, n: int, q: int, dct: bool, nets: _Nets) -> _Images:
  out = _Images()
  for i in range(n):
    data, label = source.record(i)
    h0, w0 = transforms.dimensions(data)
    h, w = transforms.rescaled_size(h0, w0, q)
    image = transforms.resize(transforms.load(data, q, dct), h, w)
    out.images.append(image)
    out.labels.append(int(label))
    out.gts.append(source.boxes(i))
    out.scales.append((w / w0, h / h0))
    out.whole.append([0.0, 0.0, float(w0), float(h0)])
    out.crops_c.append(transforms.center_crop(image, nets.size_c))
    out.crops_l.append(transforms.center_crop(image, nets.size_l))
    out.offsets.append(boxes_lib.center_crop_offsets((h, w), nets.size_l))
  return out


def _crop_protocol(nets: _Nets, ims: _Images, k: int, batch_size: int):
  """Central crops: the classifier's top-k, and the localisation net's box of each guessed class (and of the
  true class), in original pixels."""
  n = len(ims.images)
  guesses, pred, true_class = np.zeros((n, k), np.int64), np.zeros((n, k, 4)), np.zeros((n, 1, 4))
  posteriors = _softmax(_crops_in_batches(nets.cls_crop, ims.crops_c, batch_size))
  outputs = _crops_in_batches(nets.loc_crop, ims.crops_l, batch_size)
  for i in range(n):
    guesses[i] = np.argsort(-posteriors[i], kind='stable')[:k]
    per = boxes_lib.from_target(localization_model.per_class(outputs[i], nets.head, np), nets.size_l)
    top, left = ims.offsets[i]
    per = ims.to_original(per + np.array([left, top, left, top]), i)
    pick = (lambda c: per[0]) if nets.head == 'scr' else (lambda c: per[c])  # noqa: E731
    pred[i] = [pick(c) for c in guesses[i]]
    true_class[i, 0] = pick(ims.labels[i])
  return guesses, pred, true_class


def _dense_protocol(nets: _Nets, ims: _Images, k: int, merge_threshold: float, progress: bool):
  """The whole image, fully convolutional: the classifier's averaged map gives the top-k; each guessed
  class's cell boxes merged greedily, scored by the classifier's posterior at the same cell."""
  n = len(ims.images)
  guesses, pred, true_class = np.zeros((n, k), np.int64), np.zeros((n, k, 4)), np.zeros((n, 1, 4))
  bar = runlog.progress_bar(n, 'localize (dense)', unit='img', enabled=progress)
  for i in range(n):
    bar.update(1)
    x = ims.images[i][None]
    score_map = nets.cls_map(x)[0]  # (h, w, classes)
    box_map = nets.loc_map(x)[0]  # (h', w', 4 or 4 x classes)
    posterior = _softmax(score_map.reshape(-1, nets.num_classes).mean(0))
    guesses[i] = np.argsort(-posterior, kind='stable')[:k]
    cells = localization_model.cell_boxes(box_map, nets.size_l, nets.head)  # (h', w', K, 4)
    same_grid = score_map.shape[:2] == box_map.shape[:2]
    cell_posteriors = _softmax(score_map) if same_grid else None

    def merged(c: int, i=i, cells=cells, posterior=posterior, same_grid=same_grid,
               cell_posteriors=cell_posteriors) -> np.ndarray:
      b = cells[:, :, 0 if nets.head == 'scr' else c].reshape(-1, 4)
      s = (cell_posteriors[..., c].reshape(-1) if same_grid else np.full(len(b), posterior[c]))
      best, _, _ = boxes_lib.greedy_merge(b, s, merge_threshold)
      return ims.to_original(best[0], i)

    pred[i] = [merged(int(c)) for c in guesses[i]]
    true_class[i, 0] = merged(ims.labels[i])
  bar.close()
  return guesses, pred, true_class


def _errors(guesses, pred, true_class, ims: _Images, k: int) -> dict:
  """A protocol's row of eval.json: localisation errors, the whole-image baseline and classification."""
  labels, gts = ims.labels, ims.gts
  whole_boxes = np.repeat(np.asarray(ims.whole)[:, None], k, axis=1)  # the trivial guess: the whole image
  truth = np.array(labels)[:, None]
  return {
      'top1_error': boxes_lib.localization_error(guesses, pred, labels, gts, k=1),
      f'top{k}_error': boxes_lib.localization_error(guesses, pred, labels, gts, k=k),
      'gt_class_error': boxes_lib.localization_error(truth, true_class, labels, gts, k=1),
      'mean_iou_gt_class': _mean_best_iou(true_class[:, 0], gts),
      'whole_image_top1_error': boxes_lib.localization_error(guesses, whole_boxes, labels, gts, k=1),
      f'whole_image_top{k}_error': boxes_lib.localization_error(guesses, whole_boxes, labels, gts, k=k),
      'whole_image_gt_class_error': boxes_lib.localization_error(truth, whole_boxes[:, :1], labels, gts, k=1),
      'whole_image_mean_iou': _mean_best_iou(whole_boxes[:, 0], gts),
      'classification_top1_error': float(np.mean(guesses[:, 0] != np.array(labels))),
      f'classification_top{k}_error': float(np.mean(~np.any(guesses == truth, 1))),
  }


def localize(classifier: str, localizer: str, *, protocols: Sequence[str] = PROTOCOLS, scale: int = 0,
             split: str = '', max_images: int = 0, merge_threshold: float = 0.5, batch_size: int = 64,
             data_dir: str = '', progress: bool = True) -> dict:
  """Evaluates (classifier run, localisation run) on a split with boxes; returns eval.json's content plus
  'examples' (up to 16 images spread over the classes: the picture at Q, the true boxes and each protocol's
  top-1 class, box, its IoU and whether it is right, for the figure)."""
  unknown = [p for p in protocols if p not in PROTOCOLS]
  if unknown or not protocols:
    raise ValueError(f'protocols {list(protocols)}: unknown {unknown}; valid: {", ".join(PROTOCOLS)}')
  nets, loc_config = _load_nets(classifier, localizer)
  data_cfg = ml_collections.ConfigDict(loc_config['data'])
  if data_dir:
    data_cfg.data_dir = data_dir
  split = split or data_cfg.eval_split
  source = boxes_source.open_source(data_cfg, split)
  data_settings = DataSettings.from_config(data_cfg)  # a field the run's config lacks: configs/default.py's
  q = int(scale or data_settings.eval_scale or data_settings.scale_min)
  if q < max(nets.size_c, nets.size_l):
    raise ValueError(f'the test scale {q} is below a training size ({nets.size_c}, {nets.size_l})')
  k = min(TOP_K, nets.num_classes)
  n = min(len(source), max_images) if max_images else len(source)
  t0 = time.time()
  ims = _read_images(source, n, q, data_settings.jpeg_dct_scaling, nets)
  result = {'classifier': str(classifier), 'localizer': str(localizer), 'head': nets.head, 'scale': q,
            'split': split, 'num_images': n, 'merge_threshold': merge_threshold, 'iou_threshold':
            boxes_lib.IOU_THRESHOLD, 'protocols': {}}
  shown = plots.spread_over_classes(ims.labels, 16)  # the figure's tiles: each class in turn
  examples = [{'image': ims.images[i], 'label': ims.labels[i], 'gt': ims.gts[i], 'scale': ims.scales[i],
               'boxes': {}} for i in shown]
  for protocol in protocols:
    if protocol == 'crop':
      guesses, pred, true_class = _crop_protocol(nets, ims, k, batch_size)
    else:
      guesses, pred, true_class = _dense_protocol(nets, ims, k, merge_threshold, progress)
    result['protocols'][protocol] = _errors(guesses, pred, true_class, ims, k)
    for i, ex in zip(shown, examples):
      gt = boxes_lib.as_boxes(ims.gts[i])
      ex['boxes'][protocol] = {
          'class': int(guesses[i, 0]), 'box': pred[i, 0],
          'iou': float(np.max(boxes_lib.iou(pred[i, 0], gt))) if len(gt) else 0.0,
          'hit': boxes_lib.correct(guesses[i, 0], pred[i, 0], ims.labels[i], gt)}
  result['wall_s'] = time.time() - t0
  result['class_names'] = list(source.class_names) if source.class_names else None
  result['examples'] = examples
  return result


def save_figure(result: dict, path: str, columns: int = 4) -> str | None:
  """localization.png: a grid of test images with the true and guessed boxes (plots.localization_figure)."""
  return plots.save_localization_figure(result, path, columns)


def write_results(result: dict, workdir: str) -> str:
  path = rundir.write_json(rundir.join(workdir, 'eval.json'),
                           {k: v for k, v in result.items() if k != 'examples'}, sort_keys=True)
  save_figure(result, os.path.join(workdir, 'localization.png'))
  return str(path)


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
