"""Box geometry, IoU, greedy merging and the localisation error against hand-computed values; boxes through
the data pipeline's exact crops."""

import json

import ml_collections
import numpy as np
import pytest

from vggjax import boxes
from vggjax.data import boxes_source, transforms


def test_iou_hand_computed():
  a = np.array([0, 0, 10, 10])
  b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30], [2, 2, 4, 4]])
  # overlap 5x10=50, union 150; identical; disjoint; contained 4/100.
  np.testing.assert_allclose(boxes.iou(a, b), [50 / 150, 1.0, 0.0, 0.04])
  assert boxes.iou(np.zeros((3, 4)), b).shape == (3, 4)


def test_rescale_crop_flip_hand_computed():
  # A 100x200 (H x W) image rescaled to 50x100: every coordinate halves.
  np.testing.assert_allclose(boxes.rescale_boxes([[20, 10, 60, 50]], (100, 200), (50, 100)),
                             [[10, 5, 30, 25]])
  # Anisotropic rounding: 101x203 -> 50x100 scales x by 100/203 and y by 50/101.
  np.testing.assert_allclose(boxes.rescale_boxes([[203, 101, 203, 101]], (101, 203), (50, 100)),
                             [[100, 50, 100, 50]])
  # Crop of 32 at (top 8, left 16): translate, then clip to [0, 32].
  b, visible = boxes.crop_boxes([[20, 10, 40, 30], [0, 0, 10, 10], [30, 0, 60, 50]], top=8, left=16, size=32)
  np.testing.assert_allclose(b, [[4, 2, 24, 22], [0, 0, 0, 2], [14, 0, 32, 32]])
  assert visible.tolist() == [True, False, True]
  # Flip in a 32-wide crop: x -> 32 - x, the corners swap.
  np.testing.assert_allclose(boxes.flip_boxes([[4, 2, 24, 22]], 32), [[8, 2, 28, 22]])
  # All three, as the training transform composes them.
  b, visible = boxes.train_boxes([[40, 20, 80, 60]], (100, 200), (50, 100), top=8, left=16, size=32,
                                 flipped=True)
  np.testing.assert_allclose(b, [[8, 2, 28, 22]])


def test_target_round_trip_and_choice():
  b = np.array([[8.0, 2.0, 28.0, 22.0]])
  t = boxes.to_target(b, 32)
  np.testing.assert_allclose(t, [[18 / 32, 12 / 32, 20 / 32, 20 / 32]])
  np.testing.assert_allclose(boxes.from_target(t, 32), b)
  # The target is the visible box with the largest area; no visible box -> invalid.
  box, valid = boxes.target_box(np.array([[0, 0, 5, 5], [0, 0, 10, 10], [0, 0, 20, 20]]),
                                np.array([True, True, False]))
  assert valid and box.tolist() == [0, 0, 10, 10]
  assert boxes.target_box(np.zeros((1, 4)), np.array([False]))[1] is False
  with pytest.raises(ValueError, match='x1 >= x0'):
    boxes.as_boxes([[5, 0, 1, 1]])


def test_greedy_merging_constructed_cases():
  # Two clusters: three near-identical boxes (scores 0.2 each) and one far box with a higher single score.
  b = [[0, 0, 10, 10], [1, 0, 11, 10], [0, 1, 10, 11], [50, 50, 60, 60]]
  s = [0.2, 0.2, 0.2, 0.5]
  merged, scores, counts = boxes.greedy_merge(b, s, threshold=0.5)
  assert counts.tolist() == [3, 1]  # the cluster's summed score 0.6 beats the lone box's 0.5
  np.testing.assert_allclose(scores, [0.6, 0.5])
  np.testing.assert_allclose(merged[0], [1 / 3, 1 / 3, 31 / 3, 31 / 3])  # the members' mean coordinates
  np.testing.assert_allclose(merged[1], [50, 50, 60, 60])
  # A threshold above every overlap merges nothing; the order is by score.
  merged, scores, counts = boxes.greedy_merge(b, s, threshold=0.99)
  assert counts.tolist() == [1, 1, 1, 1] and scores[0] == 0.5
  # Three overlapping boxes: the closest pair (B, C: IoU 9/11) merges first (A-B 8/12, A-C 7/13), then A
  # joins the merged box (IoU with mean(B, C) = [2.5, 12.5]: 7.5/12.5 = 0.6 > 0.5).
  b = [[0, 0, 10, 10], [2, 0, 12, 10], [3, 0, 13, 10]]
  merged, scores, counts = boxes.greedy_merge(b, [1, 1, 1], threshold=0.5)
  assert counts.tolist() == [3]
  np.testing.assert_allclose(merged[0], [5 / 3, 0, 35 / 3, 10])
  assert boxes.greedy_merge(np.zeros((0, 4)), [])[0].shape == (0, 4)


def test_localization_error_hand_computed():
  gt = [np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [20, 20, 40, 40]]), np.array([[0, 0, 10, 10]])]
  labels = [3, 1, 2]
  classes = np.array([[3, 0], [0, 1], [2, 0]])
  pred = np.array([
      [[0, 0, 10, 10], [0, 0, 10, 10]],  # image 0: first guess right (class 3, IoU 1)
      [[0, 0, 10, 10], [21, 21, 40, 40]],  # image 1: second guess right (second gt box, IoU 0.9025)
      [[0, 0, 10, 5], [0, 0, 10, 10]],  # image 2: class right, IoU 0.5 exactly: not > 0.5; second class wrong
  ], dtype=float)
  assert boxes.localization_error(classes, pred, labels, gt, k=1) == pytest.approx(2 / 3)
  assert boxes.localization_error(classes, pred, labels, gt, k=2) == pytest.approx(1 / 3)
  assert boxes.correct(3, [0, 0, 10, 10], 3, gt[0]) and not boxes.correct(2, [0, 0, 10, 10], 3, gt[0])


def test_train_example_is_the_pipeline_crop_and_follows_the_box(real_photos):
  """The box pipeline's crop is transforms.train_transform's (same draws), and the box it reports is where
  a marked rectangle lands in that crop."""
  photo = real_photos[0].copy()
  h0, w0 = photo.shape[:2]
  box = np.array([[w0 * 0.3, h0 * 0.4, w0 * 0.55, h0 * 0.7]])
  for seed in range(6):
    kw = dict(image_size=64, scale_min=72, scale_max=96, random_flip=True, dct_scaling=False)
    crop, target, valid = boxes_source.train_example(photo, box, np.random.default_rng(seed), **kw)
    expected = transforms.train_transform(photo, np.random.default_rng(seed), **kw)
    np.testing.assert_array_equal(crop, expected)
    # Mark the box in a blank image and push the mask through the same transform.
    mask = np.zeros_like(photo)
    x0, y0, x1, y1 = box[0].astype(int)
    mask[y0:y1, x0:x1] = 255
    m = transforms.train_transform(mask, np.random.default_rng(seed), **kw)[:, :, 0] > 127
    if not m.any():
      assert not valid
      continue
    ys, xs = np.nonzero(m)
    got = boxes.from_target(target, 64)
    np.testing.assert_allclose(got, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=1.5)


def test_box_folder_source_json_and_csv(tmp_path, real_photos):
  from PIL import Image
  for split, cls, n in (('train', 'a', 0), ('train', 'b', 1), ('val', 'a', 2)):
    (tmp_path / split / cls).mkdir(parents=True, exist_ok=True)
    Image.fromarray(real_photos[0][:80, :120]).save(tmp_path / split / cls / f'{n}.jpg')
  table = {'train/a/0.jpg': [[1, 2, 30, 40]], 'train/b/1.jpg': [[5, 5, 50, 60], [0, 0, 9, 9]],
           'val/a/2.jpg': [[10, 10, 20, 20]]}
  (tmp_path / 'boxes.json').write_text(json.dumps(table))
  src = boxes_source.BoxFolderSource(tmp_path, 'train', 'boxes.json')
  assert len(src) == 2 and src.class_names == ['a', 'b']
  np.testing.assert_allclose(src.boxes(1), [[5, 5, 50, 60], [0, 0, 9, 9]])
  rows = ['path,x0,y0,x1,y1'] + [f'{p},{",".join(map(str, b))}' for p, bs in table.items() for b in bs]
  (tmp_path / 'boxes.csv').write_text('\n'.join(rows) + '\n')
  src = boxes_source.BoxFolderSource(tmp_path, 'train', str(tmp_path / 'boxes.csv'))
  np.testing.assert_allclose(src.boxes(1), [[5, 5, 50, 60], [0, 0, 9, 9]])
  (tmp_path / 'missing.json').write_text(json.dumps({'train/a/0.jpg': [[1, 2, 3, 4]]}))
  with pytest.raises(ValueError, match='no box for train/b/1.jpg'):
    boxes_source.BoxFolderSource(tmp_path, 'train', 'missing.json')


def test_tfds_source_with_boxes(tmp_path, real_photos):
  """A real TFDS array_record dataset with VOC's layout (objects/bbox, a BBoxFeature: (ymin, xmin, ymax,
  xmax) fractions), written by TFDS from real photos; boxes come back in pixels, and in the batches."""
  import tensorflow_datasets as tfds
  from PIL import Image

  from vggjax.data import pipeline
  jpegs, shapes = [], []
  for k in range(6):
    photo = real_photos[k % len(real_photos)][:90 + 10 * k, :120]
    path = tmp_path / f'photo{k}.jpg'
    Image.fromarray(np.ascontiguousarray(photo)).save(path, quality=90)
    jpegs.append(path)
    shapes.append(photo.shape[:2])

  def frac_box(k):  # (ymin, xmin, ymax, xmax) fractions
    return tfds.features.BBox(0.1, 0.2 + 0.05 * k, 0.6, 0.7)

  class VggjaxTestBoxes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(names=['a', 'b']),
          'objects': tfds.features.Sequence({'bbox': tfds.features.BBoxFeature()})}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(range(4)), 'validation': self._generate_examples(range(4, 6))}

    def _generate_examples(self, ks):
      for k in ks:
        yield k, {'image': str(jpegs[k]), 'label': k % 2, 'objects': {'bbox': [frac_box(k)]}}

  data_dir = tmp_path / 'data'
  VggjaxTestBoxes(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  cfg = ml_collections.ConfigDict(dict(
      source='tfds', name='vggjax_test_boxes', data_dir=str(data_dir), train_split='train',
      eval_split='validation', image_size=32, scale_min=40, scale_max=40, eval_scale=40, flip=False,
      bbox_key='objects/bbox', num_workers=0))
  src = boxes_source.open_source(cfg, 'train')
  for i in range(len(src)):
    raw, label = src.record(i)
    k = next(k for k in range(4) if jpegs[k].read_bytes() == raw)
    h, w = shapes[k]
    np.testing.assert_allclose(src.boxes(i), [[(0.2 + 0.05 * k) * w, 0.1 * h, 0.7 * w, 0.6 * h]], atol=1e-3)
  batch = next(iter(pipeline.eval_iterator(cfg, global_batch_size=2)))
  assert batch['box'].shape == (2, 4) and batch['box_valid'].all()
