"""The paper's evaluation protocols (vggjax.evaluate): dense = FC net on windows, exactness of the padded
buckets, the multi-crop grid and flips, top-k errors, fusion and multi-scale arithmetic, every image counted
once on 8 devices, single crop = validation during training, the CLI on 1 and 2 processes."""

import json
import subprocess
import sys
import threading

import cli_util
import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, subprocess_env

from vggjax import checkpoints, models, parallel, train
from vggjax import evaluate as ev
from vggjax.data import transforms
from vggjax.preprocessing import Normalization, normalize

NUM_CLASSES = 10
NORM = Normalization(mean=(120.0, 115.0, 100.0), std=(60.0, 60.0, 60.0))


def tiny(name='vgg11', image_size=32, seed=0, num_classes=NUM_CLASSES):
  """A narrow net with random weights drawn on the host (He-scaled kernels, small non-zero biases)."""
  model = models.get_model(name, num_classes=num_classes, width=1 / 16, fc_features=32, image_size=image_size)
  rng = np.random.default_rng(seed)

  def draw(path, s):
    kind = path[-1].key
    if kind == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if kind == 'bias':
      return rng.normal(0, 0.1, s.shape).astype(np.float32)
    return (np.ones if kind in ('scale', 'var') else np.zeros)(s.shape, np.float32)

  return model, jax.tree_util.tree_map_with_path(draw, models.variable_shapes(model))


class PhotoSource:
  """Real photographs of varying aspect ratio (landscape, portrait, square) as a random-access source."""

  def __init__(self, photos, seed=0):
    rng = np.random.default_rng(seed)
    small = [cv2.resize(p, (p.shape[1] * 60 // p.shape[0], 60), interpolation=cv2.INTER_AREA)
             for p in photos[:5]]
    assert all(s.shape[1] >= 60 for s in small)  # landscape (3:2) or square photos
    self.images = []
    for s in small:
      self.images += [s, np.ascontiguousarray(s.transpose(1, 0, 2)[:85])]  # and a portrait (about 2:3)
    self.images += [np.ascontiguousarray(small[0][:, :70]),                 # 7:6
                    np.ascontiguousarray(small[1][:45]),                    # about 2:1
                    np.ascontiguousarray(small[3].transpose(1, 0, 2)[:75])]  # 4:5 portrait
    self.labels = [int(x) for x in rng.integers(0, NUM_CLASSES, len(self.images))]
    self.name = 'photos'
    self.num_classes = NUM_CLASSES
    self.class_names = None

  def __len__(self):
    return len(self.images)

  def record(self, i):
    return self.images[i], self.labels[i]

  def describe(self, i):
    return f'photo {i}'

  def __getitem__(self, i):
    return {'image': self.images[i], 'label': self.labels[i]}


@pytest.fixture(scope='module')
def source(real_photos):
  src = PhotoSource(real_photos)
  assert len(src) == 13
  return src


# ---------------------------------------------------------------------------------------------------------


def _fc_net(params, window):
  """The paper's FC classifier on one pool5 window (k, k, C): fc6 as a dense layer on the flattened window."""
  w6 = np.asarray(params['fc6']['kernel'])
  x = np.maximum(window.reshape(-1) @ w6.reshape(-1, w6.shape[-1]) + params['fc6']['bias'], 0)
  x = np.maximum(x @ np.asarray(params['fc7']['kernel'])[0, 0] + params['fc7']['bias'], 0)
  return x @ np.asarray(params['fc8']['kernel'])[0, 0] + params['fc8']['bias']


def test_dense_equals_fc_net_on_windows_at_stride_32():
  """Dense evaluation of a 160x224 image with a net trained at 64 (fc6 spans 2x2 pool5 cells): the score map
  cell (i, j) is the FC net on the pool5 features of the 64x64 window at (32 i, 32 j), and the dense class
  scores are their average. (Exact at the FC layers: the conv features of a window inside a larger image
  see its neighbours where a separate crop sees zero padding, which is why dense != multi-crop.)"""
  model, variables = tiny(image_size=64)
  x = np.random.default_rng(0).normal(0, 1, (2, 160, 224, 3)).astype(np.float32)
  crop = x[:, 32:96, 64:128]

  @jax.jit
  def outputs(v, x, crop):
    return (model.apply(v, x, method='pool5'), model.apply(v, x, method='score_map'), model.apply(v, x),
            ev.dense_logits(model, v, x, jnp.asarray([[160, 224]] * 2)), model.apply(v, crop, method='pool5'),
            model.apply(v, crop))

  pool5, score_map, dense, masked, crop_pool5, crop_logits = map(np.asarray, outputs(variables, x, crop))
  assert pool5.shape[1:3] == (5, 7) and score_map.shape[1:3] == (4, 6)
  params = jax.tree_util.tree_map(np.asarray, variables['params'])
  windows = np.stack([[[_fc_net(params, pool5[b, i:i + 2, j:j + 2]) for j in range(6)] for i in range(4)]
                      for b in range(2)])  # (2, 4, 6, classes): windows at stride 32 in the image
  tol = dict(rtol=1e-5, atol=1e-5 * np.abs(windows).max())  # float32 rounding
  np.testing.assert_allclose(score_map, windows, **tol)
  np.testing.assert_allclose(dense, windows.mean(axis=(1, 2)), **tol)
  np.testing.assert_allclose(masked, dense, **tol)
  # At the training size the map has one cell: the FC net itself.
  np.testing.assert_allclose(crop_logits, [_fc_net(params, p) for p in crop_pool5], **tol)


@pytest.mark.slow
def test_padded_dense_equals_the_unpadded_image_and_its_flip():
  """The bucketed dense evaluation (masks at every conv input) equals the network on the exact image, for
  sizes that are not multiples of 32, in both orientations, whatever the padding holds (fc6 spans 2x2)."""
  size = 64
  model, variables = tiny(image_size=size)
  rng = np.random.default_rng(1)
  sizes = [(size + 13, size + 45), (size + 77, size + 3), (size, size)]
  hb, wb = 2 * size + 32, 2 * size + 32
  images = rng.integers(0, 256, (len(sizes), hb, wb, 3)).astype(np.uint8)  # the padding is noise
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, normalize(x, NORM))).mean(0))
  expect = []
  for i, (h, w) in enumerate(sizes):
    img = images[i, :h, :w]
    expect.append(apply(variables, np.stack([img, img[:, ::-1]])))
  fn = jax.jit(lambda v, x, hw: ev.dense_posteriors(model, v, x, hw, NORM))
  got = np.asarray(fn(variables, images, np.asarray(sizes, np.int32)))
  np.testing.assert_allclose(got, np.stack(expect), rtol=1e-5, atol=1e-6)
  # Without the flips: the image alone.
  fn = jax.jit(lambda v, x, hw: ev.dense_posteriors(model, v, x, hw, NORM, flip=False))
  got = np.asarray(fn(variables, images, np.asarray(sizes, np.int32)))
  h, w = sizes[0]
  np.testing.assert_allclose(got[0], apply(variables, images[:1, :h, :w]), rtol=1e-5, atol=1e-6)


def test_multicrop_grid_coordinates_and_flips():
  assert ev.grid_offsets(48, 70, 32) == [(t, l) for t in (0, 4, 8, 12, 16) for l in (0, 9, 19, 28, 38)]
  assert ev.grid_offsets(48, 70, 32)[12] == ev.grid_offsets(48, 70, 32, n=1)[0] == (8, 19)  # the centre
  assert ev.grid_offsets(32, 32, 32) == [(0, 0)] * 25
  with pytest.raises(ValueError, match='does not fit'):
    ev.grid_offsets(31, 70, 32)
  model, variables = tiny()
  rng = np.random.default_rng(2)
  sizes = [(48, 70), (75, 33), (32, 32)]
  images = rng.integers(0, 256, (3, 80, 80, 3)).astype(np.uint8)
  hw = np.asarray(sizes, np.int32)
  crops = np.asarray(ev.extract_crops(images, hw, 32, 5))
  centre = np.asarray(ev.extract_crops(images, hw, 32, 1))
  assert crops.shape == (3, 25, 32, 32, 3) and centre.shape == (3, 1, 32, 32, 3)
  host = []
  for b, (h, w) in enumerate(sizes):
    cut = [images[b, t:t + 32, l:l + 32] for t, l in ev.grid_offsets(h, w, 32)]
    np.testing.assert_array_equal(crops[b], np.stack(cut))
    np.testing.assert_array_equal(centre[b, 0], transforms.center_crop(images[b, :h, :w], 32))
    host.append(cut + [c[:, ::-1] for c in cut])  # 50 crops: the grid and the mirror of each crop
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, normalize(x, NORM))))
  expect = apply(variables, np.concatenate(host)).reshape(3, 50, -1).mean(1)
  got = jax.jit(lambda v, c: ev.crop_posteriors(model, v, c, flips=True, norm=NORM))(variables, crops)
  np.testing.assert_allclose(got, np.stack(expect), rtol=1e-5, atol=1e-6)
  # The mirror of a crop is the crop of the flipped image on the mirrored grid.
  h, w = sizes[0]
  flipped = images[0, :h, :w][:, ::-1]
  for (t, l), c in zip(ev.grid_offsets(h, w, 32), host[0][25:]):
    np.testing.assert_array_equal(c, flipped[t:t + 32, w - 32 - l:w - l])


def test_topk_error_hand_computed():
  p = np.asarray([[0.1, 0.5, 0.2, 0.2],   # label 1: top-1 hit
                  [0.4, 0.3, 0.2, 0.1],   # label 2: rank 2 -> top-3 hit, top-2 miss
                  [0.25, 0.25, 0.25, 0.25],  # label 3 in a 4-way tie: rank 3 (ties by class index)
                  [0.3, 0.3, 0.2, 0.2]])  # label 1 tied with class 0: rank 1
  y = np.asarray([1, 2, 3, 1])
  assert ev.topk_hits(p, y, 1).tolist() == [True, False, False, False]
  assert ev.topk_hits(p, y, 2).tolist() == [True, False, False, True]
  assert ev.topk_hits(p, y, 3).tolist() == [True, True, False, True]
  assert ev.topk_error(p, y, 1) == 0.75 and ev.topk_error(p, y, 2) == 0.5 and ev.topk_error(p, y, 4) == 0.0
  # The same ranking as jax.lax.top_k (validation during training).
  top = np.asarray(jax.lax.top_k(jnp.asarray(p), 2)[1])
  assert [int(y[i] in top[i]) for i in range(4)] == ev.topk_hits(p, y, 2).astype(int).tolist()
  fused = ev.fuse([p, p[:, ::-1]])
  np.testing.assert_allclose(fused, (p + p[:, ::-1]) / 2)


def test_scales_and_buckets():
  assert ev.default_scales(256, 256, 224, multiscale=True) == (224, 256, 288)
  assert ev.default_scales(256, 512, 224, multiscale=True) == (256, 384, 512)
  assert ev.default_scales(384, 384, 224) == (384,) and ev.default_scales(256, 512, 224) == (384,)
  assert ev.default_scales(224, 224, 224, multiscale=True) == (224, 256)  # S - 32 < 224 is left out
  assert ev.train_scale_label(256, 512) == '[256;512]' and ev.train_scale_label(384, 384) == '384'
  # 500x375 (4:3) at Q=256 is 256x341: the 4/3 bucket, 352 wide; 3:2 fits 384; portraits mirror.
  assert ev.bucket_shape(*transforms.rescaled_size(375, 500, 256), 256) == (256, 352)
  assert ev.bucket_shape(*transforms.rescaled_size(500, 333, 256), 256) == (384, 256)
  assert ev.bucket_shape(256, 256, 256) == (256, 256)
  assert ev.bucket_shape(256, 1100, 256) == (256, 1280)  # beyond 3:1: multiples of Q
  shapes = {ev.bucket_shape(*transforms.rescaled_size(h, w, 256), 256)
            for h in range(200, 1000, 7) for w in range(200, 1000, 7) if max(h, w) <= 3 * min(h, w)}
  assert len(shapes) == 9  # 5 aspect buckets, 2 orientations, one square


def test_plan_batches_over_two_processes_counts_every_image_once():
  """Two processes (threads exchanging their counts as process_allgather would) with different buckets:
  the same sequence of batch shapes on both, every image in exactly one slot, the rest padding."""
  shapes = [{i: (32, 64) for i in range(5)} | {5: (64, 32)}, {i: (32, 64) for i in range(2)} |
            {i: (96, 32) for i in range(2, 5)}]
  barrier, posted, plans, counts = threading.Barrier(2), [None, None], [None, None], [None, None]

  def run(p):
    def gather(x):  # what multihost_utils.process_allgather does across processes
      posted[p] = np.asarray(x)
      barrier.wait()
      out = np.stack(posted)
      barrier.wait()
      return out
    plans[p], counts[p] = ev.plan_batches(shapes[p], 256, 2, gather=gather)

  threads = [threading.Thread(target=run, args=(p,)) for p in range(2)]
  [t.start() for t in threads]
  [t.join() for t in threads]
  expected = [(32, 64)] * 3 + [(64, 32)] + [(96, 32)] * 2  # per bucket, the most batches of any process
  assert [b.shape for b in plans[0]] == [b.shape for b in plans[1]] == expected
  assert counts[0] == counts[1] == {(32, 64): 7, (64, 32): 1, (96, 32): 3}
  for p in range(2):
    slots = np.concatenate([b.positions for b in plans[p]])
    assert sorted(slots[slots >= 0].tolist()) == sorted(shapes[p])
    for b in plans[p]:
      assert all(shapes[p][int(i)] == b.shape for i in b.positions if i >= 0)


# ---------------------------------------------------------------------------------------------------------
# One evaluation of two models at two scales on 13 photos, batch 8 on 8 devices: checked against references.


@pytest.fixture(scope='module')
def two_models():
  a, va = tiny('vgg11', seed=0)
  b, vb = tiny('vgg11_lrn', seed=1)
  return [ev.EvalModel(a, va, scales=(32, 48), norm=NORM, train_scale=(32, 48)),
          ev.EvalModel(b, vb, scales=(48,), norm=NORM, train_scale=(48, 48))]


@pytest.fixture(scope='module')
def result(two_models, source):
  """A at Q = 32 and 48, A-LRN at 48; aspect buckets 1 and 2 (three shapes per scale)."""
  out = ev.evaluate(two_models, source, batch_size=8, aspect_buckets=(1, 2), progress=False,
                    return_posteriors=True)
  assert jax.device_count() == 8 and out['devices'] == 8 and out['batch_size'] == 8
  return out


def _reference(model, variables, source, q):
  """Per image, computed directly: the image rescaled on the host, then single / dense / multi-crop."""
  size = model.image_size
  images = [transforms.rescale(im, q) for im in source.images]
  h_max, w_max = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
  padded = np.zeros((len(images), h_max, w_max, 3), np.uint8)
  for k, im in enumerate(images):
    padded[k, :im.shape[0], :im.shape[1]] = im
  hw = np.asarray([im.shape[:2] for im in images], np.int32)
  dense_fn = jax.jit(lambda v, x, s: ev.dense_posteriors(model, v, x, s, NORM))
  dense = np.asarray(dense_fn(variables, padded, hw))
  apply = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, normalize(x, NORM))))
  single = np.asarray(apply(variables, np.stack([transforms.center_crop(im, size) for im in images])))
  crops = []
  for im in images:
    cut = [im[t:t + size, l:l + size] for t, l in ev.grid_offsets(*im.shape[:2], size)]
    crops += cut + [c[:, ::-1] for c in cut]
  multi = np.asarray(apply(variables, np.stack(crops))).reshape(len(images), 50, -1).mean(1)
  return {'single': single, 'dense': dense, 'multicrop': multi, 'dense+multicrop': (dense + multi) / 2}


@pytest.mark.slow
def test_every_image_once_with_a_split_not_a_multiple_of_the_batch(result, two_models, source):
  """13 images of 3 shapes per scale, global batch 8 over 8 devices: padded, masked slots; each image's
  posteriors equal the direct computation, and each image is counted exactly once."""
  assert result['num_images'] == result['split_size'] == 13 and result['unreadable'] == 0
  m = two_models[0]
  for q in (32, 48):
    ref = _reference(m.model, m.variables, source, q)
    for p in ev.PROTOCOLS:
      got = result.posteriors[('A', p, str(q))]
      np.testing.assert_allclose(got, ref[p], rtol=1e-4, atol=1e-6)
      entry = result['results']['A'][p][str(q)]
      assert entry['num_images'] == 13
      assert entry['top1_err'] == pytest.approx(ev.topk_error(ref[p], source.labels, 1))
      assert entry['top5_err'] == pytest.approx(ev.topk_error(ref[p], source.labels, 5))
  # Buckets: three shapes per scale (landscape, portrait, square), compiled once each for dense; the crop
  # network has one shape per crop protocol for every scale.
  assert result['buckets']['32'] == {'32x32': 2, '32x64': 6, '64x32': 5}
  assert result['buckets']['48'] == {'48x48': 2, '48x96': 6, '96x48': 5}
  for q in ('32', '48'):
    assert result['compiled_shapes'][q] == {'dense': 3, 'crop_extract': 6, 'crop_net': 2}


def test_fusion_and_multiscale_arithmetic(result, source):
  post = result.posteriors
  y = np.asarray(source.labels)
  assert set(result['results']) == {'A', 'A-LRN', 'fusion'}
  assert set(result['results']['A-LRN']['dense']) == {'48'}
  for p in ev.PROTOCOLS:
    # Multi-scale: A's posteriors averaged over its Q; fusion: the models' posteriors averaged, at the common
    # Q and over each model's own scales.
    multi = post[('A', p, '32,48')]
    np.testing.assert_allclose(multi, (post[('A', p, '32')] + post[('A', p, '48')]) / 2, rtol=1e-6)
    for key, members in (('48', [post[('A', p, '48')], post[('A-LRN', p, '48')]]),
                         ('32,48', [multi, post[('A-LRN', p, '48')]])):
      fused = post[('fusion', p, key)]
      np.testing.assert_allclose(fused, (members[0] + members[1]) / 2, rtol=1e-6)
      entry = result['results']['fusion'][p][key]
      assert entry['top1_err'] == pytest.approx(ev.topk_error(fused, y, 1))
      assert entry['top5_err'] == pytest.approx(ev.topk_error(fused, y, 5))
      assert entry['num_images'] == 13 and entry['img_per_s'] > 0
  both = (post[('A', 'dense', '32,48')] + post[('A', 'multicrop', '32,48')]) / 2
  np.testing.assert_allclose(post[('A', 'dense+multicrop', '32,48')], both, rtol=1e-6)
  table = ev.format_table(result)
  header = table.splitlines()[0]
  for column in ('ConvNet config', 'train S', 'test Q', 'top-1 err (%)', 'top-5 err (%)'):
    assert column in header
  assert 'A + A-LRN' in table and '[32;48]' in table and '32,48' in table
  assert len(table.splitlines()) == 2 + 4 * (3 + 1 + 2)  # 4 protocols x (A: 3 sets, A-LRN: 1, fusion: 2)


def test_single_crop_equals_validation_during_training(result, two_models, source):
  """The single protocol at Q is what vggjax.train.evaluate reports on the input pipeline's eval batches."""
  from vggjax.data import pipeline
  m = two_models[0]
  mesh = parallel.make_mesh()
  cfg = ml_collections.ConfigDict({'image_size': 32, 'eval_split': 'validation', 'num_workers': 0,
                                   'scale_min': 32, 'scale_max': 48})
  batches = pipeline.EvalIterator(cfg, global_batch_size=8, scale=32, source=source)
  variables = jax.device_put(m.variables, parallel.replicated(mesh))
  metrics = train.evaluate(train.make_eval_step(m.model, mesh, NORM), variables, batches, mesh)
  entry = result['results']['A']['single']['32']
  assert metrics['val_count'] == entry['num_images'] == 13
  assert metrics['val_top1'] == pytest.approx(1 - entry['top1_err'])
  assert metrics['val_top5'] == pytest.approx(1 - entry['top5_err'])


def test_unreadable_records_are_left_out_and_counted(two_models, real_photos):
  """Not an image (found when reading the sizes) and a truncated JPEG (its header reads, its pixels do not:
  found when decoding) are left out and counted; an encoded JPEG is decoded on the host."""
  src = PhotoSource(real_photos)
  jpeg = cv2.imencode('.jpg', src.images[2][:, :, ::-1])[1].tobytes()
  src.images = [src.images[0], b'not an image', jpeg, jpeg[:len(jpeg) // 3]]
  src.labels = src.labels[:4]
  m = ev.EvalModel(two_models[0].model, two_models[0].variables, scales=(32,), norm=NORM)
  out = ev.evaluate([m], src, protocols=['single'], batch_size=8, progress=False)
  assert out['unreadable'] == 2 and out['num_images'] == 2 and out['split_size'] == 4
  assert sorted(out['unreadable_records']) == ['photo 1', 'photo 3']
  assert out['results']['A']['single']['32']['num_images'] == 2
  with pytest.raises(ValueError, match='unknown protocol'):
    ev.evaluate([m], src, protocols=['tencrop'])
  with pytest.raises(ValueError, match='below the training size'):
    ev.EvalModel(two_models[0].model, two_models[0].variables, scales=(24,))


# ---------------------------------------------------------------------------------------------------------
# The command.


def _save(directory, name, seed, scale_min, scale_max):
  _, variables = tiny(name, seed=seed)
  meta = {'model': {'name': name, 'num_classes': NUM_CLASSES, 'image_size': 32, 'width': 1 / 16,
                    'fc_features': 32},
          'normalization': Normalization(mean=(78.0,) * 3).to_dict(),
          'data': {'scale_min': scale_min, 'scale_max': scale_max}}
  checkpoints.save_weights(directory, variables, meta)
  return str(directory)


def test_load_model_scales_from_the_run_or_the_config(tmp_path):
  run = _save(tmp_path / 'run', 'vgg11', 0, 32, 64)
  m = ev.load_model(run, multiscale=True)
  assert m.scales == (32, 48, 64) and m.train_scale == (32, 64) and m.label == 'A'
  assert ev.load_model(run).scales == (48,) and ev.load_model(run, scales=[40, 36]).scales == (36, 40)
  # Imported weights record no training scale: the config's (e.g. torchvision's 256 with a 224 net).
  variables, meta = checkpoints.load_weights(run)
  del meta['data']
  checkpoints.save_weights(tmp_path / 'imported', variables, meta)
  assert ev.load_model(tmp_path / 'imported', fallback_train_scale=(40, 40)).scales == (40,)
  assert ev.load_model(tmp_path / 'imported', fallback_train_scale=(40, 40), multiscale=True).scales == (40, 72)
  with pytest.raises(ValueError, match='records no training scale'):
    ev.load_model(tmp_path / 'imported')
  np.testing.assert_allclose(ev.load_model(run).norm.mean, (78.0,) * 3)


def _evaluate_cli(workdir, *args, env, timeout=600):
  p = subprocess.run([sys.executable, '-m', 'vggjax.evaluate', f'--workdir={workdir}', *args], env=env,
                     capture_output=True, text=True, timeout=timeout, check=False)
  assert p.returncode == 0, f'exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}'
  return p.stdout, p.stderr


@pytest.mark.slow
def test_cli_fusion_multiscale_and_two_processes(tmp_path):
  """`python -m vggjax.evaluate` on the demo config's digits: two checkpoints (jittered S and fixed S), their
  default multi-scale sets, every protocol, eval.json and the table; then 2 processes x 4 devices give the
  same numbers as 1 x 8."""
  a = _save(tmp_path / 'A', 'vgg11', 0, 32, 40)      # jittered: Q in {32, 36, 40}
  b = _save(tmp_path / 'B', 'vgg13', 1, 32, 32)      # fixed S = 32: Q in {32, 64} (S - 32 < 32 left out)
  common = [f'--config={REPO / "configs" / "demo.py"}', '--config.data.eval_split=validation[:20]',
            '--batch_size=8']
  out, err = _evaluate_cli(tmp_path / 'run', *common, f'--checkpoint={a}', f'--checkpoint={b}',
                           '--multiscale', env=subprocess_env(8))
  result = json.loads((tmp_path / 'run' / 'eval.json').read_text())
  assert [m['test_scales'] for m in result['models']] == [[32, 36, 40], [32, 64]]
  assert [m['train_scale'] for m in result['models']] == ['[32;40]', '32']
  assert result['num_images'] == 20 and result['split'] == 'validation[:20]'
  assert result['flip'] is False  # the demo config trains digits without flips: none at test time either
  r = result['results']
  assert set(r) == {'A', 'B', 'fusion'}
  assert set(r['A']['dense']) == {'32', '36', '40', '32,36,40'}
  assert set(r['B']['multicrop']) == {'32', '64', '32,64'}
  assert set(r['fusion']['dense+multicrop']) == {'32', '32,36,40,64'}  # per common Q, and each model's set
  for entry in (r['A']['dense']['32,36,40'], r['fusion']['single']['32'], r['B']['dense+multicrop']['64']):
    assert entry['num_images'] == 20 and 0 <= entry['top5_err'] <= entry['top1_err'] <= 1
  assert result['compiled_shapes']['36'] == {'dense': 1, 'crop_extract': 2, 'crop_net': 2}  # digits: square
  assert 'ConvNet config' in out and 'A + B' in out and '32,36,40' in out and 'eval.json' in out
  assert 'ETA' in err and 'ETA' not in out  # the progress line goes to stderr

  # Two processes, each reading 10 of the 20 images: the counts summed over processes are the same.
  port = cli_util.free_port()
  procs = []
  for i in range(2):
    cmd = [sys.executable, '-m', 'vggjax.evaluate', f'--workdir={tmp_path / "two"}', *common,
           f'--checkpoint={a}', '--protocols=dense,single', '--scales=36',
           f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}']
    with open(tmp_path / f'two.{i}.log', 'wb') as log:
      procs.append(subprocess.Popen(cmd, env=subprocess_env(cli_util.DEVICES_PER_PROCESS, cache=False), stdout=log,
                                    stderr=subprocess.STDOUT))
    procs[-1].log = str(tmp_path / f'two.{i}.log')
  codes = cli_util.wait_all(procs, timeout=600)
  logs = [cli_util.output(p) for p in procs]
  assert codes == [0, 0], '\n'.join(x[-3000:] for x in logs)
  two = json.loads((tmp_path / 'two' / 'eval.json').read_text())
  assert two['processes'] == 2 and two['devices'] == 2 * cli_util.DEVICES_PER_PROCESS
  assert two['num_images'] == 20
  assert two['buckets'] == {'36': {'36x36': 20}} == {'36': result['buckets']['36']}
  for p in ('dense', 'single'):
    got, want = two['results']['A'][p]['36'], r['A'][p]['36']
    assert (got['top1_err'], got['top5_err'], got['num_images']) == (want['top1_err'], want['top5_err'], 20)


def _posteriors_by_image(result) -> dict:
  """{'protocol|scales': {image index: posterior}} of an evaluate(..., return_posteriors=True) result."""
  out = {}
  for (_, protocol, scales), post in result.posteriors.items():
    rows = out.setdefault(f'{protocol}|{scales}', {})
    for index, p in zip(result.indices, post):
      assert int(index) not in rows, f'image {index} evaluated twice by one process'
      rows[int(index)] = p
  return out


def _digits_source(n=20):
  from configs import demo
  from vggjax.data import pipeline
  data = demo.get_config().data
  return pipeline.open_source(data, f'validation[:{n}]')


def _evaluate_process(port: str, process_id: str, checkpoint: str, out: str) -> None:
  """One of two evaluation processes (`python tests/test_evaluate.py PORT ID CHECKPOINT OUT.npz`): its images'
  indices and posteriors, for the test below."""
  from vggjax import cli
  cli.set_cpu_devices(cli_util.DEVICES_PER_PROCESS)
  parallel.initialize(f'localhost:{port}', 2, int(process_id))
  result = ev.evaluate([ev.load_model(checkpoint, scales=[36])], _digits_source(),
                       protocols=('dense', 'single'), batch_size=8, flip=False, progress=False,
                       return_posteriors=True)
  rows = _posteriors_by_image(result)
  np.savez(out, indices=np.asarray(result.indices),
           **{key: np.stack([rows[key][i] for i in result.indices]) for key in rows})
  jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_evaluate_every_image_once_with_the_posteriors_of_one(tmp_path):
  """2 processes (cli_util.DEVICES_PER_PROCESS devices each): each image of the split by exactly one
  process, its posterior that of one process on 8 devices (error rates alone would not see an image
  evaluated twice and another missed)."""
  a = _save(tmp_path / 'A', 'vgg11', 0, 32, 40)
  for attempt in range(3):  # again when joining failed (cli_util.JOINING_FAILED)
    port = cli_util.free_port()
    logs = [tmp_path / f'log{i}.{attempt}.txt' for i in range(2)]
    procs = []
    for i in range(2):
      with open(logs[i], 'wb') as log:
        cmd = [sys.executable, __file__, str(port), str(i), a, str(tmp_path / f'p{i}.npz')]
        procs.append(subprocess.Popen(cmd, env=subprocess_env(cli_util.DEVICES_PER_PROCESS, cache=False), stdout=log,
                                      stderr=subprocess.STDOUT))
      procs[-1].log = str(logs[i])
    codes = cli_util.wait_all(procs, timeout=600)
    text = [x.read_text(errors='replace') for x in logs]
    if codes == [0, 0] or not any(cli_util.joining_failed(x) for x in text):
      break
  assert codes == [0, 0], '\n'.join(x[-3000:] for x in text)
  parts = [dict(np.load(tmp_path / f'p{i}.npz')) for i in range(2)]
  indices = np.concatenate([p['indices'] for p in parts])
  assert sorted(indices.tolist()) == list(range(20))  # every image once: none twice, none missing
  assert len(parts[0]['indices']) == len(parts[1]['indices']) == 10
  one = _posteriors_by_image(ev.evaluate([ev.load_model(a, scales=[36])], _digits_source(),
                                         protocols=('dense', 'single'), batch_size=8, flip=False,
                                         progress=False, return_posteriors=True))
  assert set(one) == set(parts[0]) - {'indices'} and len(one) == 2
  for key, rows in one.items():
    assert sorted(rows) == list(range(20))
    got = np.concatenate([p[key] for p in parts])
    want = np.stack([rows[int(i)] for i in indices])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # other batches: other float rounding
    assert np.abs(want - want.mean(axis=0)).max() > 0.1  # the images' posteriors differ: identity matters


if __name__ == '__main__':
  _evaluate_process(*sys.argv[1:])
