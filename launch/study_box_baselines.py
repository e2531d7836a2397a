#!/usr/bin/env python3
"""What a box regressor on the study task's central crop could reach, and what it reaches by knowing nothing
(docs/paper_miniature.md, Table 8): no net, only the task's pictures and boxes.

    python launch/study_box_baselines.py --data_dir=runs/paper_study/task [--scale=36] [--split=test]

* oracle: the true box clipped to the central crop at test scale Q (the best a regressor of the crop can
  predict: it sees nothing outside), mapped back to the picture;
* mean box: one box for every picture, the mean regression target of the training split's central crops;
* whole picture: the picture itself as the box (what `vggjax localize` reports as whole_image).

Each: the mean IoU with the true box and the localisation error (IoU <= 0.5, the class given). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vggjax import boxes as boxes_lib  # noqa: E402
from vggjax.data import transforms  # noqa: E402


def _crop_box(boxes: dict, data_dir: str, key: str, scale: int, size: int):
  """The central crop at Q = scale of picture `key` and its box: (picture hw, rescaled hw, top, left, the
  largest visible true box clipped to the crop (x0, y0, x1, y1), whether one is visible)."""
  w0, h0 = Image.open(os.path.join(data_dir, key)).size
  h, w = transforms.rescaled_size(h0, w0, scale)
  top, left = boxes_lib.center_crop_offsets((h, w), size)
  b, visible = boxes_lib.train_boxes(boxes[key], (h0, w0), (h, w), top, left, size, False)
  box, valid = boxes_lib.target_box(b, visible)
  return (h0, w0), (h, w), top, left, box, valid


def _to_picture(box, hw0, hw, top, left) -> np.ndarray:
  """A box (x0, y0, x1, y1) in the central crop -> the same box in the picture."""
  return boxes_lib.rescale_boxes(np.asarray(box, np.float64)[None] + np.array([left, top, left, top]), hw, hw0)


def baselines(data_dir: str, scale: int = 36, size: int = 32, split: str = 'test') -> dict:
  with open(os.path.join(data_dir, 'boxes.json')) as f:
    boxes = json.load(f)
  if scale < size:
    raise ValueError(f'--scale={scale} is below the crop size {size}: the central crop needs Q >= {size}')

  def keys(s):
    out = sorted(k for k in boxes if k.startswith(s + '/'))
    if not out:
      raise ValueError(f'no pictures of split {s!r} in {data_dir}/boxes.json (its splits: '
                       f'{sorted({k.split("/")[0] for k in boxes})})')
    return out

  targets = []
  for k in keys('train'):
    *_, box, valid = _crop_box(boxes, data_dir, k, scale, size)
    if valid:
      targets.append(boxes_lib.to_target(box, size))
  mean_box = boxes_lib.from_target(np.mean(targets, axis=0), size)
  ious = {'oracle': [], 'mean_box': [], 'whole_picture': []}
  for k in keys(split):
    hw0, hw, top, left, box, _ = _crop_box(boxes, data_dir, k, scale, size)
    gt = boxes_lib.as_boxes(boxes[k])
    ious['oracle'].append(boxes_lib.iou(_to_picture(box, hw0, hw, top, left), gt).max())
    ious['mean_box'].append(boxes_lib.iou(_to_picture(mean_box, hw0, hw, top, left), gt).max())
    ious['whole_picture'].append(boxes_lib.iou(np.array([[0, 0, hw0[1], hw0[0]]], np.float64), gt).max())
  out = {'split': split, 'scale': scale, 'crop': size, 'pictures': len(ious['oracle'])}
  for name, v in ious.items():
    v = np.asarray(v)
    out[name] = {'mean_iou': round(float(v.mean()), 4), 'error': round(float(np.mean(v <= 0.5)), 4)}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--data_dir', required=True, help='the task (launch/study_data.py --out)')
  p.add_argument('--scale', type=int, default=36, help='test scale Q, the shorter side (default 36)')
  p.add_argument('--split', default='test', help='the split to score (default test)')
  args = p.parse_args(argv)
  if not os.path.exists(os.path.join(args.data_dir, 'boxes.json')):
    print(f'study_box_baselines.py: error: {args.data_dir}/boxes.json not found: --data_dir is the task '
          '(launch/study_data.py --out)', file=sys.stderr)
    return 2
  try:
    print(json.dumps(baselines(args.data_dir, args.scale, split=args.split), indent=1))
  except ValueError as e:
    print(f'study_box_baselines.py: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
