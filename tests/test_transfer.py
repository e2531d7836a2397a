"""vggjax.transfer (the paper's Appendix B protocol): the metrics against hand-computed values and
scikit-learn's, the random per-class splits, the descriptors (average vs stack, L2 norm, flips, several
nets) against vggjax.features, the descriptor cache (reused, invalidated, resumed), the CLI on an image
folder, and a real transfer between Fashion-MNIST's two halves."""

import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import IN_CI, REPO, subprocess_env
from vggjax import checkpoints, features, linear_probe, models, transfer
from vggjax import descriptors as desc
from vggjax.data import examples
from vggjax.evaluation import metrics

FC = 32  # fc6/fc7 width of the narrow test networks
SCALES = (32, 48)


def random_variables(model, seed=0):
  """Random He-scaled weights and small random biases, drawn with numpy (model.init compiles the whole
  network's initialisers: seconds on CPU)."""
  rng = np.random.RandomState(seed)

  def draw(shape):
    if len(shape) == 4:
      return (rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))).astype(np.float32)
    return (rng.randn(*shape) * 0.1).astype(np.float32)

  return jax.tree_util.tree_map(lambda s: draw(s.shape), models.variable_shapes(model))


def save_net(directory, seed=0, variables=None):
  model = models.get_model('vgg11', width=1 / 16, fc_features=FC, num_classes=10, image_size=32)
  variables = variables if variables is not None else random_variables(model, seed)
  meta = {'model': {'name': 'vgg11', 'num_classes': 10, 'image_size': 32, 'width': 1 / 16, 'fc_features': FC},
          'normalization': {'mean': [78.0] * 3, 'std': [60.0] * 3, 'scale': 1.0, 'color_order': 'RGB'},
          'source': 'test', 'labels': None}
  return checkpoints.save_weights(directory, variables, meta)


@pytest.fixture(scope='module')
def nets(tmp_path_factory):
  """Two narrow VGG-As (32x32 training size) with different random weights."""
  root = tmp_path_factory.mktemp('nets')
  return [str(save_net(root / 'a', 0)), str(save_net(root / 'b', 1))]


def digits_cfg(train='train[:60]', test='validation[:40]'):
  return ml_collections.ConfigDict({'source': 'digits', 'data_dir': '', 'train_split': train,
                                    'eval_split': test, 'name': ''})


# ------------------------------------------------------------------------------------------------ metrics


def test_mean_class_recall_and_confusion_by_hand_and_sklearn():
  from sklearn.metrics import balanced_accuracy_score, confusion_matrix, recall_score
  y_true = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
  y_pred = [0, 0, 1, 2, 1, 0, 2, 2, 2, 2, 2, 1]
  # Class recalls by hand: 2/4, 1/2, 5/6; their mean, not the accuracy 8/12.
  assert metrics.mean_class_recall(y_true, y_pred) == pytest.approx((2 / 4 + 1 / 2 + 5 / 6) / 3)
  assert metrics.mean_class_recall(y_true, y_pred) == pytest.approx(balanced_accuracy_score(y_true, y_pred))
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
  assert metrics.mean_class_recall(a, b) == pytest.approx(recall_score(a, b, average='macro'))
  np.testing.assert_array_equal(metrics.confusion_matrix(a, b, 7), confusion_matrix(a, b, labels=range(7)))
  m = metrics.confusion_matrix(y_true, y_pred, 4)
  assert m.shape == (4, 4) and m[0].tolist() == [2, 1, 1, 0] and m[3].sum() == 0


def test_average_precision_by_hand_and_sklearn():
  from sklearn.metrics import average_precision_score
  ap = metrics.average_precision
  # Ranked: negative, positive (P 1/2, R 1/2), positive (P 2/3, R 1). Uninterpolated: 1/2*1/2 + 1/2*2/3;
  # VOC: precision made monotone, 2/3 at both recalls.
  scores, targets = [0.9, 0.5, 0.1], [False, True, True]
  assert ap(scores, targets, 'none') == pytest.approx(0.25 + 1 / 3)
  assert ap(scores, targets, 'voc12') == pytest.approx(2 / 3)
  assert ap(scores, targets, 'voc07') == pytest.approx(2 / 3)
  # Positive (P 1, R 1/2), negative, positive (P 2/3, R 1): 11-point AP = (6 * 1 + 5 * 2/3) / 11.
  scores, targets = [3.0, 2.0, 1.0], [True, False, True]
  assert ap(scores, targets, 'none') == pytest.approx(0.5 + 1 / 3)
  assert ap(scores, targets, 'voc12') == pytest.approx(0.5 + 1 / 3)
  assert ap(scores, targets, 'voc07') == pytest.approx((6 + 5 * 2 / 3) / 11)
  rng = np.random.default_rng(0)
  for _ in range(5):
    s = np.round(rng.normal(size=200), 1)  # many ties: one threshold each, as scikit-learn
    t = rng.random(200) < 0.3
    assert ap(s, t, 'none') == pytest.approx(average_precision_score(t, s))
    assert ap(s, t, 'voc12') >= ap(s, t, 'none') - 1e-12
  scores, targets = rng.normal(size=(100, 4)), rng.random((100, 4)) < 0.4
  m, aps = metrics.mean_average_precision(scores, targets, 'none')
  assert m == pytest.approx(average_precision_score(targets, scores, average='macro'))
  assert aps.shape == (4,)
  targets[:, 2] = False  # a class without positives is left out of the mean
  m, aps = metrics.mean_average_precision(scores, targets, 'none')
  assert np.isnan(aps[2]) and m == pytest.approx(np.mean(aps[[0, 1, 3]]))
  with pytest.raises(ValueError, match='AP mode'):
    ap(scores[:, 0], targets[:, 0], 'voc09')


def test_class_splits():
  labels = np.repeat(np.arange(4), [10, 12, 8, 31])
  splits = linear_probe.class_splits(labels, train_per_class=5, test_per_class=4, num_splits=3, seed=0)
  assert len(splits) == 3
  for train, test in splits:
    assert np.bincount(labels[train]).tolist() == [5, 5, 5, 5]
    assert np.bincount(labels[test]).tolist() == [4, 4, 3, 4]  # class 2 has 8: 3 left after training
    assert not set(train) & set(test)
  assert not np.array_equal(splits[0][0], splits[1][0])  # different random splits
  again = linear_probe.class_splits(labels, 5, 4, 3, seed=0)
  assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(splits, again))
  train, test = linear_probe.class_splits(labels, 5, 0, 1)[0]
  assert len(test) == len(labels) - 20  # 0: all the rest
  with pytest.raises(ValueError, match="'c'"):
    linear_probe.class_splits(labels, 8, class_names=['a', 'b', 'c', 'd'])


def test_svms_choose_c_by_cross_validation_single_and_multilabel():
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(3, 20)) * 2
  y = np.repeat(np.arange(3), 30)
  x = centres[y] + rng.normal(size=(90, 20))
  clf, c, cv = linear_probe.fit_svm(x, y, cs=(0.001, 1.0), folds=3)
  assert c in (0.001, 1.0) and set(cv) == {'0.001', '1.0'} and cv[str(c)] == max(cv.values())
  assert linear_probe.svm_scores(clf, x, 3).shape == (90, 3)
  # A class absent from the training data still has a (lowest) score column.
  clf, _, _ = linear_probe.fit_svm(x[y < 2], y[y < 2], cs=(1.0,))
  s = linear_probe.svm_scores(clf, x, 3)
  assert s.shape == (90, 3) and np.all(s[:, 2] < s[:, :2].min(axis=1))
  # Multi-label targets (VOC-like): one SVM per class, C by cross-validated mAP, scored by mAP.
  t = np.stack([y == 0, y != 1, y == 2], axis=1)
  splits = [(np.arange(0, 90, 2), np.arange(1, 90, 2))]
  result = linear_probe.run_protocol(x, t, splits, num_classes=3, cs=(0.01, 1.0))
  assert result['mAP'] > 0.9 and 'mean_class_recall' not in result and result['confusion'] is None
  single = linear_probe.run_protocol(x, y, splits, num_classes=3, cs=(0.01, 1.0))
  assert single['mean_class_recall'] > 0.9 and np.sum(single['confusion']) == 45


# ------------------------------------------------------------------------------------------------ descriptors


def test_descriptors_match_features_average_stack_flip_and_nets(nets, tmp_path):
  ex = examples.open_examples(digits_cfg(), 'validation[:4]')
  images = [ex.image(i) for i in range(len(ex))]
  net_a, net_b = desc.load_net(nets[0]), desc.load_net(nets[1])
  describe = desc.Descriptors(desc.DescriptorCache(tmp_path / 'cache'))
  avg, valid = describe([net_a], ex, SCALES, 'average')
  assert avg.shape == (4, FC) and valid.all()
  np.testing.assert_allclose(np.linalg.norm(avg, axis=1), 1, atol=1e-6)
  np.testing.assert_allclose(avg, features.extract(net_a.variables, net_a.meta, images, SCALES), atol=1e-5)
  # Stacked: the per-scale descriptors side by side, normalised together; their sum is the average's.
  stack, _ = describe([net_a], ex, SCALES, 'stack')
  assert stack.shape == (4, FC * len(SCALES))
  np.testing.assert_allclose(np.linalg.norm(stack, axis=1), 1, atol=1e-6)
  summed = stack[:, :FC] + stack[:, FC:]
  np.testing.assert_allclose(summed / np.linalg.norm(summed, axis=1, keepdims=True), avg, atol=1e-5)
  # Flips: with them an image and its mirror image have one descriptor; without them, the image alone.
  mirrored = examples.Examples(ex.source.subset(np.arange(4), 'm'), ex.labels, ex.class_names, 'm')
  mirrored.source.images = np.ascontiguousarray(mirrored.source.images[:, :, ::-1])
  flipped_avg, _ = describe([net_a], mirrored, SCALES)
  np.testing.assert_allclose(flipped_avg, avg, atol=1e-5)
  no_flip, _ = describe([net_a], ex, SCALES, flip=False)
  np.testing.assert_allclose(no_flip, features.extract(net_a.variables, net_a.meta, images, SCALES,
                                                       flip=False), atol=1e-5)
  assert np.abs(no_flip - avg).max() > 1e-3
  no_flip_mirrored, _ = describe([net_a], mirrored, SCALES, flip=False)
  assert np.abs(no_flip_mirrored - no_flip).max() > 1e-3
  # Two nets: each net's descriptor, side by side, normalised together.
  both, _ = describe([net_a, net_b], ex, SCALES)
  b_avg, _ = describe([net_b], ex, SCALES)
  assert both.shape == (4, 2 * FC)
  np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1, atol=1e-6)
  np.testing.assert_allclose(both * np.sqrt(2), np.concatenate([avg, b_avg], axis=1), atol=1e-5)
  with pytest.raises(ValueError, match='combine'):
    describe([net_a], ex, SCALES, 'max')
  with pytest.raises(ValueError, match='training size 32'):
    describe([net_a], ex, (16,))


def test_cache_reused_invalidated_and_resumed(nets, tmp_path, monkeypatch):
  ex = examples.open_examples(digits_cfg(), 'validation[:20]')
  net = desc.load_net(nets[0])
  cache = desc.DescriptorCache(tmp_path / 'cache')
  monkeypatch.setattr(desc, 'CHUNK', 8)  # chunks of 8 images, batches of 4: one compiled shape per scale
  descriptors = desc.Descriptors(cache, batch_size=4)
  first, _ = descriptors([net], ex, SCALES)
  assert cache.computed_images == 2 * 20
  again, _ = descriptors([net], ex, SCALES, 'stack')  # other options: no compute
  assert cache.computed_images == 40
  np.testing.assert_allclose(desc.combine_scales(
      [again[:, :FC], again[:, FC:]], 'average'), first, atol=1e-6)  # same raw per-scale descriptors
  descriptors([net], ex, (32, 64))  # one new scale
  assert cache.computed_images == 60
  descriptors([net], ex, SCALES, flip=False)  # another flip setting
  assert cache.computed_images == 100
  other = examples.open_examples(digits_cfg(), 'validation[1:21]')  # other images
  descriptors([net], other, (32,))
  assert cache.computed_images == 120
  # Changed weights (one bias), even in the same directory: everything afresh.
  variables, _ = checkpoints.load_weights(nets[0])
  variables = jax.tree_util.tree_map(np.array, variables)
  variables['params']['fc7']['bias'][0] += 0.5
  changed = desc.load_net(str(save_net(tmp_path / 'changed', variables=variables)))
  assert changed.fingerprint != net.fingerprint
  assert desc.load_net(nets[0]).fingerprint == net.fingerprint
  descriptors([changed], ex, SCALES)
  assert cache.computed_images == 160
  # Resumption: the run dies reading image 13; the next one computes only the chunks not on disk.
  resumed_cache = descriptors.cache = desc.DescriptorCache(tmp_path / 'resumed')
  image = examples.Examples.image

  def dying(self, i):
    if i == 13:
      raise KeyboardInterrupt
    return image(self, i)

  monkeypatch.setattr(examples.Examples, 'image', dying)
  with pytest.raises(KeyboardInterrupt):
    descriptors([net], ex, SCALES)
  assert resumed_cache.computed_images == 2 * 8  # the first chunk, at both scales, is on disk
  monkeypatch.setattr(examples.Examples, 'image', image)
  resumed_cache.computed_images = 0
  resumed, _ = descriptors([net], ex, SCALES)
  assert resumed_cache.computed_images == 2 * 12
  np.testing.assert_allclose(resumed, first, atol=1e-6)
  assert not list((tmp_path / 'resumed').rglob('chunk_*'))  # chunks folded into one file per scale


def test_transfer_on_one_pool_and_the_nets_own_classifier(nets, tmp_path):
  # Caltech's layout: one pool of labelled images (no eval split), random splits of N per class.
  cfg = digits_cfg(train='train[:100]', test='')
  result = transfer.transfer([nets[0]], cfg, workdir=str(tmp_path / 'pool'), scales=(32,), train_per_class=2,
                             test_per_class=1, num_splits=2, cs=(1.0,), progress=False)
  assert result['protocol']['pool'] == ['train[:100]'] and len(result['splits']) == 2
  classes = len(np.unique(examples.open_examples(cfg, 'train[:100]').labels))
  assert all(s['num_train'] == 2 * classes and s['num_test'] == classes for s in result['splits'])
  with pytest.raises(ValueError, match='eval_split is empty'):
    transfer.transfer([nets[0]], cfg, workdir=str(tmp_path / 'pool'), scales=(32,), progress=False)
  # classifier='net': the weights' own fc8 (10 digit classes) scored on the same test images, no SVM.
  own = transfer.transfer([nets[0]], digits_cfg(test='validation[:10]'), workdir=str(tmp_path / 'net'),
                          scales=(32,), classifier='net', progress=False)
  assert own['method'] == 'fine-tuned net' and own['splits'][0]['C'] is None
  assert own['splits'][0]['num_test'] == 10 and own['images_computed'] == 0
  folder = write_folder(tmp_path / 'f', {'train': 2, 'val': 1})
  three = ml_collections.ConfigDict({**digits_cfg().to_dict(), 'source': 'folder', 'data_dir': str(folder)})
  with pytest.raises(ValueError, match='classifies 10 classes; the data has 3'):
    transfer.transfer([nets[0]], three, workdir=str(tmp_path / 'net'), scales=(32,), classifier='net',
                      progress=False)


# ------------------------------------------------------------------------------------------------ end to end


def write_folder(root: pathlib.Path, per_class: dict, seed: int = 0) -> pathlib.Path:
  """ROOT/{train,val}/<digit>/*.png from scikit-learn's digits, upscaled to 40x40."""
  from vggjax.data import sources
  src = sources.digits_source('train')
  rng = np.random.default_rng(seed)
  for c in (1, 4, 7):
    members = rng.permutation(np.flatnonzero(src.labels == c))
    start = 0
    for split, n in per_class.items():
      d = root / split / f'digit{c}'
      d.mkdir(parents=True, exist_ok=True)
      for i in members[start:start + n]:
        Image.fromarray(src.images[i]).resize((40, 40), Image.BILINEAR).save(d / f'{i}.png')
      start += n
  (root / 'val' / 'digit4' / 'broken.png').write_bytes(b'not a png')  # unreadable: left out, counted
  return root


@pytest.mark.slow
def test_cli_runs_the_protocol_on_a_folder(nets, tmp_path):
  root = write_folder(tmp_path / 'data', {'train': 8, 'val': 6})
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vggjax.transfer', f'--weights={nets[0]}', f'--weights={nets[1]}',
         f'--config={REPO / "configs" / "demo.py"}', '--config.data.source=folder',
         f'--config.data.data_dir={root}', f'--workdir={workdir}', '--scales=32,40', '--combine=stack',
         '--train_per_class=5', '--test_per_class=4', '--num_splits=2', '--C=0.1,1']
  result = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| vgg11 & vgg11 fc7, stack over Q=32,40, linear SVM |' in result.stdout
  out = json.loads((workdir / 'transfer.json').read_text())
  assert out['descriptor_dim'] == 2 * 2 * FC and out['unreadable'] == 1 and out['num_classes'] == 3
  assert out['class_names'] == ['digit1', 'digit4', 'digit7']
  assert len(out['splits']) == 2 and all(s['num_train'] == 15 and s['num_test'] == 12 for s in out['splits'])
  assert all(s['C'] in (0.1, 1.0) for s in out['splits'])
  assert out['mean_class_recall'] == pytest.approx(np.mean([s['mean_class_recall'] for s in out['splits']]))
  assert 0 <= out['mAP'] <= 1 and out['images_computed'] == 2 * 2 * (3 * 14 + 1)
  assert (workdir / 'confusion.png').stat().st_size > 1000
  # The same command again: every descriptor from the cache.
  result = subprocess.run(cmd, env=subprocess_env(1), capture_output=True, text=True, timeout=600,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads((workdir / 'transfer.json').read_text())['images_computed'] == 0
  # A clear error for a bad option value.
  bad = subprocess.run(cmd[:-1] + ['--C=0,1'], env=subprocess_env(1), capture_output=True, text=True,
                       timeout=300, check=False)
  assert bad.returncode != 0 and '--C must be positive' in bad.stderr


FASHION = pathlib.Path('/usr/share/datasets/fashion-mnist')


@pytest.mark.slow
def test_real_transfer_fashion_mnist_halves(tmp_path):
  """The real experiment at CI size (benchmarks/transfer_experiment.py --quick --scene=plain): a narrow net
  trained with vggjax.main on Fashion-MNIST's classes 0-4 (image folders), its fc7 descriptors, an untrained
  net's and the raw pixels under the same SVMs and splits of classes 5-9, and the net fine-tuned through
  vggjax.main (configs/finetune.py) scored by vggjax.transfer --classifier=net on the same test images. Which
  of them wins on the unseen classes is a measured result (BENCHMARKS.md), not asserted: on the plain images
  a net trained on 5 classes does not beat raw pixels there, and the photos scene (items on real photographs,
  the full run's default) needs far more source training than CI can pay for before its net leaves chance.
  Asserted: every method is measured, on the same images, well above chance, and in the control (held-out
  images of the classes the net was trained on, same SVMs and splits) the trained net's descriptors beat raw
  pixels and an untrained net's."""
  if not (FASHION / 'train-images-idx3-ubyte.gz').exists():
    message = f'needs Debian\'s dataset-fashion-mnist in {FASHION} (CI installs it: .ci/run)'
    pytest.fail(message) if IN_CI else pytest.skip(message)
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import transfer_experiment as te
  result = te.run(tmp_path / 'exp', te.QUICK, env=subprocess_env(1), log=lambda *a: None, scene='plain')
  assert result['scene'] == 'plain'
  assert result['source_val_top1'] > 0.6  # 5 classes: chance 0.2
  r = result['results']
  fixed = len(result['protocols']) - 1
  assert set(r) == {'pretrained', 'untrained', 'pretrained_stack', 'pixels', 'finetuned'}
  for method, rows in r.items():
    for k, row in enumerate(rows):
      if row is None:
        assert method == 'finetuned' and k < fixed  # fine-tuning: the fixed split only
        continue
      assert row['mean_class_recall'] > 0.4 and 0.4 < row['mAP'] <= 1, (method, k, row)
  runs = tmp_path / 'exp' / 'transfer'
  tests = {json.loads((runs / d / 'transfer.json').read_text())['splits'][0]['num_test']
           for d in ('pretrained_1', 'untrained_1', 'finetuned')}
  assert tests == {5 * te.QUICK['target_test']}  # the same test images for every method
  control = result['control']
  for k in range(len(te.QUICK['splits_per_class'])):
    assert control['pretrained'][k]['mean_class_recall'] > max(control['pixels'][k]['mean_class_recall'],
                                                               control['untrained'][k]['mean_class_recall'])
  print(te.markdown(result))


def test_transfer_experiment_photos_scene_folders(tmp_path):
  """The photos scene's folders (benchmarks/transfer_experiment.py's default): every item on a window of a
  real photograph, 48x48 RGB, the same pictures from the same seed, other pictures from another, and the
  source's and target's backgrounds from disjoint photographs."""
  if not (FASHION / 'train-images-idx3-ubyte.gz').exists():
    message = f'needs Debian\'s dataset-fashion-mnist in {FASHION} (CI installs it: .ci/run)'
    pytest.fail(message) if IN_CI else pytest.skip(message)
  if not IN_CI:
    pytest.importorskip('skimage')
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import make_box_testbed
  import transfer_experiment as te
  sizes = dict(source_train=2, source_val=1, target_train=2, target_test=1)

  def pictures(root):
    return {str(f.relative_to(root)): np.asarray(Image.open(f)) for f in sorted(root.rglob('*.png'))}

  source, target = te.write_folders(tmp_path / 'a', '', sizes, seed=0, scene='photos')
  a = pictures(tmp_path / 'a')
  assert len(a) == 5 * (2 + 1 + 2 + 1)
  assert {len(list((source / 'train').iterdir())), len(list((target / 'val').iterdir()))} == {5}
  for name, image in a.items():
    assert image.shape == (te.PICTURE, te.PICTURE, 3) and image.dtype == np.uint8, name
    assert image.std() > 10 and (image[..., 0] != image[..., 2]).any(), name  # a photograph, in colour
  te.write_folders(tmp_path / 'b', '', sizes, seed=0, scene='photos')
  b = pictures(tmp_path / 'b')
  assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
  te.write_folders(tmp_path / 'c', '', sizes, seed=1, scene='photos')
  c = pictures(tmp_path / 'c')
  assert not any(k in a and (a[k] == c[k]).all() for k in c)
  photos = make_box_testbed.photographs()
  used, original = [], make_box_testbed.compose

  def compose(background, *args):
    used.append(next(k for k, p in enumerate(photos) if p is background))
    return original(background, *args)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(make_box_testbed, 'photographs', lambda: photos)
    mp.setattr(make_box_testbed, 'compose', compose)
    te.write_folders(tmp_path / 'e', '', sizes, seed=0, scene='photos')
  assert pictures(tmp_path / 'e').keys() == a.keys()
  assert len(used) == len(a)  # written in order: the source's 15 pictures, then the target's
  assert all(k % 2 == 0 for k in used[:15]) and all(k % 2 == 1 for k in used[15:])
  with pytest.raises(ValueError, match="scene='beach'"):
    te.write_folders(tmp_path / 'd', '', sizes, scene='beach')


@pytest.fixture(scope='module')
def multilabel_tfds(tmp_path_factory, real_photos):
  """A real multi-label TFDS array_record dataset (VOC's layout: 'labels', a sequence of class labels) of
  real photos, written by TFDS without TensorFlow; classes by which of the photo's halves is brighter."""
  import tensorflow_datasets as tfds
  root = tmp_path_factory.mktemp('tfds_ml')
  rng = np.random.default_rng(0)
  crops = []
  for photo in real_photos:
    for _ in range(4):
      top, left = rng.integers(0, photo.shape[0] - 96), rng.integers(0, photo.shape[1] - 128)
      crops.append(np.ascontiguousarray(photo[top:top + 96, left:left + 128]))
  paths = []
  for k, crop in enumerate(crops):
    paths.append(root / f'photo{k}.jpg')
    Image.fromarray(crop).save(paths[-1], quality=90)

  def labels_of(crop):
    grey = crop.mean(axis=2)
    out = [0] if grey[:, :64].mean() > grey[:, 64:].mean() else [1]
    return out + ([2] if crop[..., 2].mean() > crop[..., 0].mean() else [])

  class VggjaxTestMultilabel(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'labels': tfds.features.Sequence(tfds.features.ClassLabel(names=['left', 'right', 'blue']))}))

    def _split_generators(self, dl_manager):
      n = len(paths) * 2 // 3
      return {'train': self._generate_examples(range(n)),
              'test': self._generate_examples(range(n, len(paths)))}

    def _generate_examples(self, indices):
      for k in indices:
        yield k, {'image': str(paths[k]), 'labels': labels_of(crops[k])}

  data_dir = root / 'data'
  VggjaxTestMultilabel(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  targets = np.zeros((len(crops), 3), bool)
  for k, crop in enumerate(crops):
    targets[k, labels_of(crop)] = True
  return data_dir, targets, len(paths) * 2 // 3


def test_multilabel_tfds_source_scored_by_map(nets, multilabel_tfds, tmp_path):
  data_dir, targets, n_train = multilabel_tfds
  cfg = ml_collections.ConfigDict({'source': 'tfds', 'name': 'vggjax_test_multilabel',
                                   'data_dir': str(data_dir), 'train_split': 'train', 'eval_split': 'test',
                                   'image_key': 'image', 'label_key': 'labels'})
  ex = examples.open_examples(cfg, 'train')
  assert ex.multilabel and ex.class_names == ['left', 'right', 'blue']
  rows = lambda t: sorted(map(tuple, t.astype(int)))  # noqa: E731 - TFDS shuffles the records
  assert rows(ex.labels) == rows(targets[:n_train])
  assert ex.image(0).shape == (96, 128, 3)
  assert len(examples.open_examples(cfg, 'train+test')) == len(targets)  # split arithmetic (VOC trainval)
  result = transfer.transfer([nets[0]], cfg, workdir=str(tmp_path / 'run'), scales=(32,), cs=(1.0,),
                             ap_mode='voc07', progress=False)
  assert result['multilabel'] and 'mean_class_recall' not in result and result['confusion'] is None
  assert result['splits'][0]['num_test'] == len(targets) - n_train and 0 < result['mAP'] <= 1
  saved = json.loads((tmp_path / 'run' / 'transfer.json').read_text())
  assert saved['mAP'] == pytest.approx(result['mAP']) and len(saved['splits'][0]['ap_per_class']) == 3
  with pytest.raises(ValueError, match='single-label'):
    transfer.transfer([nets[0]], cfg, workdir=str(tmp_path / 'run'), scales=(32,), train_per_class=2,
                      progress=False)
