"""Sources on real data: an image folder of real photos (with corrupt files), IDX files, TFDS through its mock
data and through a real array_record dataset built here from real photos, and the statistics command."""

import gzip
import hashlib
import importlib.util
import json
import pathlib
import pickle
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from conftest import subprocess_env

from vggjax import preprocessing
from vggjax.data import pipeline, prepare, sources, transforms

REPO = pathlib.Path(__file__).resolve().parents[1]


def cfg(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      source='folder', name='', data_dir='', train_split='train', eval_split='validation', image_size=48,
      scale_min=56, scale_max=72, eval_scale=0, flip=True, color_shift=0.1, mean_rgb=(0., 0., 0.),
      std_rgb=(1., 1., 1.), num_workers=0, prefetch=2))
  c.update(overrides)
  return c


def _photo_crops(photos, count, size=(96, 128)):
  """Distinct real images: windows of the photographs at several positions."""
  out = []
  for k in range(count):
    p = photos[k % len(photos)]
    h, w = size
    top = (k * 37) % (p.shape[0] - h)
    left = (k * 53) % (p.shape[1] - w)
    out.append(np.ascontiguousarray(p[top:top + h, left:left + w]))
  return out


@pytest.fixture(scope='module')
def photo_folder(tmp_path_factory, request):
  """ROOT/train/{animals,scenes}/ and ROOT/val/... of real photos as JPEG and PNG (RGB, gray, RGBA), plus
  corrupt files: a truncated JPEG, random bytes named .jpg, an empty PNG; and files to ignore."""
  photos = request.getfixturevalue('real_photos')
  root = tmp_path_factory.mktemp('folder')
  crops = _photo_crops(photos, 20)
  written = {}
  for split, ks in (('train', range(0, 14)), ('val', range(14, 20))):
    for k in ks:
      cls = 'animals' if k % 2 else 'scenes'
      d = root / split / cls
      d.mkdir(parents=True, exist_ok=True)
      image = crops[k]
      if k % 5 == 3:
        path = d / f'{k:02d}.png'
        Image.fromarray(image.mean(-1).astype(np.uint8)).save(path)  # grayscale
        image = np.repeat(image.mean(-1).astype(np.uint8)[..., None], 3, -1)
      elif k % 5 == 4:
        path = d / f'{k:02d}.png'
        alpha = np.full(image.shape[:2] + (1,), 200, np.uint8)
        Image.fromarray(np.concatenate([image, alpha], -1)).save(path)
      else:
        path = d / f'{k:02d}.jpg'
        Image.fromarray(image).save(path, quality=95)
        image = transforms.decode(path.read_bytes())
      written[str(path)] = image
  good = (root / 'train' / 'scenes' / '00.jpg').read_bytes()
  (root / 'train' / 'scenes' / '00b_truncated.jpg').write_bytes(good[:len(good) // 3])
  (root / 'train' / 'animals' / '01b_garbage.jpg').write_bytes(np.random.default_rng(0).bytes(3000))
  (root / 'train' / 'animals' / '01c_empty.png').write_bytes(b'')
  (root / 'val' / 'scenes' / '14b_truncated.jpg').write_bytes(good[:200])
  (root / 'train' / 'scenes' / 'notes.txt').write_text('not an image')
  (root / 'train' / 'scenes' / '.hidden.jpg').write_bytes(good)
  return root, written


def test_folder_source_reads_real_images(photo_folder):
  root, written = photo_folder
  src = pipeline.open_source(cfg(data_dir=str(root)), 'train')
  assert src.class_names == ['animals', 'scenes'] and src.num_classes == 2
  assert len(src) == 14 + 3  # the three corrupt files have image names; .txt and hidden files are ignored
  paths = [src.describe(i) for i in range(len(src))]
  assert paths == sorted(paths, key=lambda p: (pathlib.Path(p).parent.name, p))
  for i, path in enumerate(paths):
    if path in written:
      item = src[i]
      np.testing.assert_array_equal(item['image'], written[path])
      assert item['label'] == (0 if '/animals/' in path else 1)
  val = pipeline.open_source(cfg(data_dir=str(root)), 'validation')
  assert len(val) == 7 and val.class_names == src.class_names
  assert len(pipeline.open_source(cfg(data_dir=str(root)), 'train[:5]')) == 5
  clone = pickle.loads(pickle.dumps(src))
  assert clone.describe(3) == src.describe(3) and clone.record(3)[0] == src.record(3)[0]


def test_folder_pipeline_skips_and_reports_corrupt_files(photo_folder):
  root, _ = photo_folder
  c = cfg(data_dir=str(root))
  it = pipeline.train_iterator(c, global_batch_size=17, seed=0)  # the whole split: every file each step
  batches = [next(it) for _ in range(2)]
  for b in batches:
    assert b['image'].shape == (17, 48, 48, 3) and b['image'].dtype == np.uint8
    assert set(b['label'].tolist()) == {0, 1}
  bad = {pathlib.Path(p).name for p in it.bad_records}
  assert bad == {'00b_truncated.jpg', '01b_garbage.jpg', '01c_empty.png'}
  counts = {pathlib.Path(p).name: n for p, n in it.bad_records.items()}
  # Each is drawn once per epoch; 01b's replacement tries 01c (also bad) before the next good file.
  assert counts == {'00b_truncated.jpg': 2, '01b_garbage.jpg': 2, '01c_empty.png': 4}
  assert set(it.bad_records) <= set(pipeline.bad_records())
  again = pipeline.train_iterator(c, global_batch_size=17, seed=0)
  for b in batches:  # replacements are deterministic
    np.testing.assert_array_equal(next(again)['image'], b['image'])
  evals = list(pipeline.eval_iterator(c, global_batch_size=4))
  mask = np.concatenate([b['mask'] for b in evals])
  assert mask.sum() == 6 and len(mask) == 8  # 7 records, 1 corrupt, 1 padding slot


def test_skipped_counts_travel_with_the_batches_from_worker_processes(photo_folder):
  """With Grain worker processes reading the records, the skips still reach this process with each batch:
  the same counts as without workers."""
  root, _ = photo_folder
  it = pipeline.train_iterator(cfg(data_dir=str(root), num_workers=2), global_batch_size=17, seed=0)
  try:
    assert it.skipped == 0
    next(it)
    first = it.skipped
    next(it)
    counts = {pathlib.Path(p).name: n for p, n in it.bad_records.items()}
  finally:
    it.close()
  assert counts == {'00b_truncated.jpg': 2, '01b_garbage.jpg': 2, '01c_empty.png': 4}
  assert it.skipped == 8 and first == 4  # each epoch (one step here) skips 00b, 01b and 01c twice
  evals = pipeline.eval_iterator(cfg(data_dir=str(root), num_workers=2), global_batch_size=4)
  assert sum(b['mask'].sum() for b in evals) == 6 and evals.skipped == 1  # 14b_truncated.jpg


@pytest.mark.slow
def test_a_training_run_reports_the_skipped_images_in_its_metrics_and_summary(photo_folder, tmp_path):
  """README: unreadable images are skipped, counted and reported: metrics.jsonl rows carry skipped_images
  (training) and val_skipped_images (validation), the final line the run's total; with worker processes."""
  root, _ = photo_folder
  workdir = tmp_path / 'run'
  p = subprocess.run(
      [sys.executable, '-m', 'vggjax', 'train', f'--workdir={workdir}', '--config=demo',
       '--config.data.source=folder', f'--config.data.data_dir={root}', '--config.data.image_size=32',
       '--config.data.scale_min=32', '--config.data.scale_max=40', '--config.data.num_workers=2',
       '--config.model.width=0.0625', '--config.model.fc_features=16', '--config.train.global_batch_size=17',
       '--config.train.max_steps=2', '--config.train.log_every_steps=1', '--config.train.eval_every_steps=2',
       '--config.train.plot=False', '--config.optimizer.schedule=constant'],
      env=subprocess_env(num_devices=1), capture_output=True, text=True, timeout=600, cwd=REPO)
  assert p.returncode == 0, p.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in rows if 'loss' in r]
  assert [r['step'] for r in train_rows] == [1, 2]
  assert [r.get('skipped_images') for r in train_rows] == [4, 4]  # 00b, 01b, 01c; 01c again for 01b
  assert [r.get('val_skipped_images') for r in rows if 'val_top1' in r] == [1]  # 14b_truncated.jpg
  assert '8 unreadable training images skipped' in p.stdout, p.stdout[-2000:]


def test_too_many_unreadable_files_in_a_row_stop_the_run_naming_the_first(photo_folder):
  """README: corrupt files never stop a run, up to data.max_consecutive_bad in a row (01b and 01c are 2)."""
  root, _ = photo_folder
  it = pipeline.train_iterator(cfg(data_dir=str(root), max_consecutive_bad=2), global_batch_size=17, seed=0)
  next(it)  # 2 in a row are skipped
  it = pipeline.train_iterator(cfg(data_dir=str(root), max_consecutive_bad=1), global_batch_size=17, seed=0)
  with pytest.raises(RuntimeError, match=r'2 consecutive unreadable records .* first: .*01b_garbage\.jpg'):
    next(it)


def test_missing_folder_and_split_fail_naming_what_was_looked_for(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'nowhere')):
    pipeline.dataset_info(cfg(data_dir=str(tmp_path / 'nowhere')))
  (tmp_path / 'train' / 'a').mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'train' / 'a' / 'x.png')
  with pytest.raises(FileNotFoundError, match='val'):
    pipeline.dataset_info(cfg(data_dir=str(tmp_path)))
  with pytest.raises(FileNotFoundError, match='data_dir'):
    pipeline.dataset_info(cfg(data_dir=''))


# ----------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  data = header + array.astype(np.uint8).tobytes()
  if path.suffix == '.gz':
    data = gzip.compress(data)
  path.write_bytes(data)


@pytest.fixture(scope='module')
def idx_dir(tmp_path_factory):
  """MNIST-format IDX files made from scikit-learn's real digits, upsampled to 28x28."""
  d = tmp_path_factory.mktemp('idx')
  train, test = sources.digits_source('train'), sources.digits_source('validation')
  def up(s):
    return np.stack([transforms.rescale(im[..., None].repeat(3, -1), 28)[..., 0] for im in s.images])

  _write_idx(d / 'train-images-idx3-ubyte.gz', up(train))
  _write_idx(d / 'train-labels-idx1-ubyte.gz', train.labels)
  _write_idx(d / 't10k-images-idx3-ubyte', up(test))
  _write_idx(d / 't10k-labels-idx1-ubyte', test.labels)
  return d, up(train), train.labels


def test_idx_sources(idx_dir):
  d, images, labels = idx_dir
  src = pipeline.open_source(cfg(source='mnist', data_dir=str(d)), 'train')
  assert len(src) == 1497 and src.images.shape == (1497, 28, 28)
  np.testing.assert_array_equal(src.images, images)
  np.testing.assert_array_equal(src.labels, labels)
  assert src[5]['image'].shape == (28, 28, 3)
  info = pipeline.dataset_info(cfg(source='fashion_mnist', data_dir=str(d)))
  assert (info.num_train, info.num_eval) == (1497, 300) and info.class_names[9] == 'Ankle boot'
  it = pipeline.train_iterator(cfg(source='mnist', data_dir=str(d), image_size=28, scale_min=28,
                                   scale_max=32), global_batch_size=64, seed=0)
  assert next(it)['image'].shape == (64, 28, 28, 3)


def test_idx_errors(idx_dir, tmp_path):
  d, _, _ = idx_dir
  with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte'):
    pipeline.open_source(cfg(source='mnist', data_dir=str(tmp_path)), 'train')
  with pytest.raises(FileNotFoundError, match='data_dir'):
    pipeline.open_source(cfg(source='mnist', data_dir=''), 'train')
  truncated = tmp_path / 'train-images-idx3-ubyte'
  truncated.write_bytes((d / 't10k-images-idx3-ubyte').read_bytes()[:1000])
  with pytest.raises(ValueError, match='truncated'):
    sources.read_idx(truncated)


@pytest.mark.skipif(not pathlib.Path(sources.DEFAULT_DATA_DIRS['fashion_mnist']).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_the_debian_package():
  info = pipeline.dataset_info(cfg(source='fashion_mnist'))
  assert (info.num_train, info.num_eval, info.num_classes) == (60000, 10000, 10)


# ----------------------------------------------------------------------------------------------------------
# TFDS


def test_tfds_through_mock_data():
  import tensorflow_datasets as tfds
  c = cfg(source='tfds', name='cifar10', image_size=24, scale_min=28, scale_max=32, eval_scale=28)
  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    info = pipeline.dataset_info(c)
    assert info.num_train == 40 and info.num_classes == 10 and len(info.class_names) == 10
    it = pipeline.train_iterator(c, global_batch_size=16, seed=0)
    b = next(it)
    assert b['image'].shape == (16, 24, 24, 3) and b['image'].dtype == np.uint8
    assert b['label'].min() >= 0 and b['label'].max() < 10
    evals = list(pipeline.eval_iterator(c, global_batch_size=16))
    assert len(evals) == 3 and sum(int(e['mask'].sum()) for e in evals) == 40
    # Each evaluation example is its TFDS record, rescaled to 28 and centre-cropped, with its label, in order.
    src = pipeline.open_source(c, c.eval_split)
    keep = [e['mask'].astype(bool) for e in evals]
    images = np.concatenate([e['image'][k] for e, k in zip(evals, keep)])
    labels = np.concatenate([e['label'][k] for e, k in zip(evals, keep)])
    assert len(src) == len(images) == 40 and len(set(labels.tolist())) > 1
    for i in range(40):
      record = src[i]
      want = transforms.eval_transform(transforms.decode(record['image']) if isinstance(record['image'], bytes)
                                       else record['image'], image_size=24, scale=28)
      np.testing.assert_array_equal(images[i], want)
      assert labels[i] == record['label']


@pytest.fixture(scope='module')
def tfds_photos(tmp_path_factory, request):
  """A real TFDS array_record dataset ('vggjax_test_photos') written by TFDS from real JPEG photos, without
  TensorFlow. The builder class is not registered, so reading goes through the files only, as a user's."""
  import tensorflow_datasets as tfds
  photos = request.getfixturevalue('real_photos')
  root = tmp_path_factory.mktemp('tfds')
  jpegs = []
  for k, crop in enumerate(_photo_crops(photos, 12, size=(120, 160))):
    path = root / f'photo{k}.jpg'
    Image.fromarray(crop).save(path, quality=90)
    jpegs.append(path)

  class VggjaxTestPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(names=['even', 'odd'])}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(jpegs[:8]), 'validation': self._generate_examples(jpegs[8:])}

    def _generate_examples(self, paths):
      for path in paths:
        k = int(path.stem[5:])
        yield k, {'image': str(path), 'label': k % 2}

  data_dir = root / 'data'
  VggjaxTestPhotos(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return data_dir, jpegs


def test_tfds_array_record_built_from_real_photos(tfds_photos):
  data_dir, jpegs = tfds_photos
  tf_before = 'tensorflow' in sys.modules  # TFDS' writer uses TensorFlow where it is installed; reading never
  assert list(data_dir.glob('vggjax_test_photos/1.0.0/*.array_record-*'))
  c = cfg(source='tfds', name='vggjax_test_photos', data_dir=str(data_dir), image_size=64, scale_min=64,
          scale_max=96, eval_scale=80)
  info = pipeline.dataset_info(c)
  assert (info.num_train, info.num_eval, info.class_names) == (8, 4, ('even', 'odd'))
  src = pipeline.open_source(c, 'train')
  digests = {hashlib.sha256(p.read_bytes()).hexdigest(): int(p.stem[5:]) for p in jpegs[:8]}
  for i in range(len(src)):
    raw, label = src.record(i)
    assert isinstance(raw, bytes)  # the encoded JPEG, decoded by the pipeline
    k = digests[hashlib.sha256(raw).hexdigest()]
    assert label == k % 2
    np.testing.assert_array_equal(src[i]['image'], transforms.decode(jpegs[k].read_bytes()))
  clone = pickle.loads(pickle.dumps(src))  # what worker processes get
  assert clone.record(3) == src.record(3)
  it = pipeline.train_iterator(c, global_batch_size=8, seed=0)
  b = next(it)
  assert b['image'].shape == (8, 64, 64, 3) and sorted(b['label'].tolist()) == [0] * 4 + [1] * 4
  evals = list(pipeline.eval_iterator(c, global_batch_size=4))
  assert len(evals) == 1 and evals[0]['mask'].all()
  with pytest.raises(ValueError, match="no split 'test'.*train, validation"):
    pipeline.open_source(c, 'test')
  assert tf_before or 'tensorflow' not in sys.modules


def test_missing_tfds_dataset_fails_with_how_to_prepare(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    pipeline.dataset_info(cfg(source='tfds', name='imagenet2012', data_dir=str(tmp_path)))
  msg = str(e.value)
  assert 'imagenet2012' in msg and str(tmp_path) in msg
  assert 'tfds build imagenet2012' in msg and 'vggjax.data.prepare convert' in msg
  with pytest.raises(FileNotFoundError, match='no_such_dataset_anywhere'):
    pipeline.open_source(cfg(source='tfds', name='no_such_dataset_anywhere', data_dir=str(tmp_path)), 'train')


def _crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for b in data:
    crc ^= b
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = _crc32c(data)
  return struct.pack('<I', (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _write_tfrecord(path, records) -> None:
  with open(path, 'wb') as f:
    for r in records:
      length = struct.pack('<Q', len(r))
      f.write(length + _masked_crc(length) + r + _masked_crc(r))


def test_tfrecord_writer_and_reader_match_a_file_written_by_tensorflow(tmp_path):
  """tests/data/written_by_tensorflow.tfrecord was written by tf.io.TFRecordWriter (make_tfrecord_fixture.py):
  this file's writer produces it byte for byte, and vggjax's reader (no TensorFlow) reads its records back."""
  data = REPO / 'tests' / 'data'
  spec = importlib.util.spec_from_file_location('make_tfrecord_fixture', data / 'make_tfrecord_fixture.py')
  fixture = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fixture)
  written_by_tf = (data / 'written_by_tensorflow.tfrecord').read_bytes()
  assert list(prepare.read_tfrecord(data / 'written_by_tensorflow.tfrecord')) == fixture.records()
  _write_tfrecord(tmp_path / 'mine.tfrecord', fixture.records())
  assert (tmp_path / 'mine.tfrecord').read_bytes() == written_by_tf  # TensorFlow's framing and masked CRCs


def test_convert_tfrecord_to_array_record_without_tensorflow(tfds_photos, tmp_path):
  """A copy of the real dataset as TFDS lays out tfrecord (same examples, TFRecord framing, dataset_info
  saying tfrecord) is refused with the command to run; the command converts it; the records are the same."""
  from array_record.python.array_record_data_source import ArrayRecordDataSource
  data_dir, _ = tfds_photos
  src_dir = data_dir / 'vggjax_test_photos' / '1.0.0'
  dst = tmp_path / 'vggjax_test_photos' / '1.0.0'
  dst.mkdir(parents=True)
  originals = {}
  for shard in sorted(src_dir.glob('*.array_record-*')):
    ds = ArrayRecordDataSource([str(shard)])
    records = [ds[i] for i in range(len(ds))]
    originals[shard.name] = records
    _write_tfrecord(dst / shard.name.replace('.array_record-', '.tfrecord-'), records)
  for f in src_dir.iterdir():
    if f.suffix in ('.json', '.txt'):
      (dst / f.name).write_bytes(f.read_bytes())
  info = json.loads((src_dir / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'
  (dst / 'dataset_info.json').write_text(json.dumps(info))
  try:  # where TensorFlow is installed, it reads the copy: the framing is TFRecord's
    import tensorflow as tf
    first = next(iter(tf.data.TFRecordDataset(str(next(dst.glob('*.tfrecord-*'))))))
    assert first.numpy() in [r for rs in originals.values() for r in rs]
  except ImportError:
    pass
  c = cfg(source='tfds', name='vggjax_test_photos', data_dir=str(tmp_path), image_size=64, scale_min=64,
          scale_max=64)
  with pytest.raises(FileNotFoundError, match='tfrecord') as e:
    pipeline.open_source(c, 'train')
  assert 'vggjax.data.prepare convert' in str(e.value)
  proc = subprocess.run([sys.executable, '-m', 'vggjax.data.prepare', 'convert', '--name=vggjax_test_photos',
                         f'--data_dir={tmp_path}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name, records in originals.items():
    ds = ArrayRecordDataSource([str(dst / name)])
    assert [ds[i] for i in range(len(ds))] == records
  src = pipeline.open_source(c, 'train')
  assert len(src) == 8 and src[0]['image'].shape == (120, 160, 3)
  assert json.loads((dst / 'dataset_info.json').read_text())['alternativeFileFormats'] == ['array_record']


def test_convert_a_tfrecord_dataset_written_by_tfds(tmp_path, real_photos):
  pytest.importorskip('tensorflow',
                      reason='TFDS writes tfrecord only with TensorFlow (the optional tf extra)')
  import tensorflow_datasets as tfds

  class VggjaxTfrecordPhotos(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3)),
          'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for k, crop in enumerate(_photo_crops(real_photos, 6)):
        yield k, {'image': crop, 'label': k % 2}

  VggjaxTfrecordPhotos(data_dir=str(tmp_path), file_format='tfrecord').download_and_prepare()
  c = cfg(source='tfds', name='vggjax_tfrecord_photos', data_dir=str(tmp_path), image_size=64, scale_min=96,
          scale_max=96)
  with pytest.raises(FileNotFoundError, match='tfrecord'):
    pipeline.open_source(c, 'train')
  prepare.convert_to_array_record('vggjax_tfrecord_photos', str(tmp_path))
  src = pipeline.open_source(c, 'train')
  assert len(src) == 6 and src[0]['image'].shape == (96, 128, 3)


# ----------------------------------------------------------------------------------------------------------
# The statistics command


def test_stats_match_the_eigendecomposition_and_the_command_runs(photo_folder, tmp_path):
  root, _ = photo_folder
  c = cfg(data_dir=str(root), image_size=48, scale_min=56)
  stats = prepare.compute_stats(c, num_threads=2)
  assert stats['num_images'] == 14 and len(stats['skipped']) == 3
  src = pipeline.open_source(c, 'train')
  crops = []
  for i in range(len(src)):
    try:
      crops.append(transforms.eval_transform(src.record(i)[0], image_size=48, scale=56))
    except transforms.DecodeError:
      pass
  crops = np.stack(crops)
  np.testing.assert_allclose(stats['mean_rgb'], crops.reshape(-1, 3).mean(0), rtol=1e-9)
  np.testing.assert_allclose(stats['std_rgb'], crops.reshape(-1, 3).std(0, ddof=1), rtol=1e-9)
  eigval, eigvec = preprocessing.rgb_covariance_eig(crops)
  np.testing.assert_allclose(stats['eigval'], eigval, rtol=1e-6)
  np.testing.assert_allclose(np.abs(np.asarray(stats['eigvec'])), np.abs(eigvec), atol=1e-6)

  out = tmp_path / 'stats.json'
  proc = subprocess.run([sys.executable, '-m', 'vggjax.data.prepare', 'stats',
                         f'--config={REPO}/configs/demo.py', '--num_images=300', f'--output={out}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  written = json.loads(out.read_text())
  assert written['num_images'] == 300 and '--config.data.mean_rgb=' in proc.stdout
  assert 60 < written['mean_rgb'][0] < 100 and written['mean_rgb'][0] == written['mean_rgb'][2]
