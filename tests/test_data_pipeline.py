"""The pipeline's contract: determinism (seeds, worker counts, process counts), resume, shards, eval padding.

All on real data: scikit-learn's digits (1497 training, 300 validation images).
"""

import json

import ml_collections
import numpy as np
import pytest

from vggjax.data import pipeline, sources, transforms


def digits_cfg(**overrides) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(dict(
      source='digits', name='', data_dir='', train_split='train', eval_split='validation', image_size=16,
      scale_min=16, scale_max=20, eval_scale=0, flip=True, color_shift=0.0, mean_rgb=(0., 0., 0.),
      std_rgb=(1., 1., 1.), num_workers=0, prefetch=2))
  c.update(overrides)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y) == {'image', 'label'}
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])


def test_digits_split_is_fixed_and_stratified():
  info = pipeline.dataset_info(digits_cfg())
  assert (info.num_train, info.num_eval, info.num_classes) == (1497, 300, 10)
  assert info.class_names == tuple(str(i) for i in range(10))
  val = sources.digits_source('validation')
  assert np.bincount(val.labels).tolist() == [30] * 10
  train = sources.digits_source('train')
  from sklearn.datasets import load_digits
  full = np.round(load_digits().images * 255 / 16).astype(np.uint8).reshape(1797, -1)
  together = np.concatenate([train.images, val.images]).reshape(1797, -1)
  np.testing.assert_array_equal(np.unique(together, axis=0), np.unique(full, axis=0))  # a partition
  assert sorted(np.concatenate([train.labels, val.labels]).tolist()) == sorted(load_digits().target.tolist())
  assert sources.digits_source('test').labels.tolist() == val.labels.tolist()
  item = train[0]
  assert item['image'].shape == (8, 8, 3) and item['image'].dtype == np.uint8
  assert (item['image'][..., 0] == item['image'][..., 2]).all()
  assert train.images.max() == 255
  assert len(sources.digits_source('train[:100]')) == 100 and len(sources.digits_source('train[90%:]')) == 150


def test_batches_shapes_types_and_labels_match_the_records():
  cfg = digits_cfg(flip=False, scale_min=16, scale_max=16)
  it = pipeline.train_iterator(cfg, global_batch_size=32, seed=3)
  batch = next(it)
  assert batch['image'].shape == (32, 16, 16, 3) and batch['image'].dtype == np.uint8
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  src = sources.digits_source('train')
  _, indices = it._fn.indices(0)
  for j, i in enumerate(indices):
    assert batch['label'][j] == src.labels[i]
    np.testing.assert_array_equal(batch['image'][j], transforms.rescale(src[i]['image'], 16))


def test_same_seed_same_batches_other_seed_other_batches():
  cfg = digits_cfg()
  a = take(pipeline.train_iterator(cfg, global_batch_size=64, seed=1), 5)
  b = take(pipeline.train_iterator(cfg, global_batch_size=64, seed=1), 5)
  c = take(pipeline.train_iterator(cfg, global_batch_size=64, seed=2), 5)
  assert_same_batches(a, b)
  assert not np.array_equal(a[0]['label'], c[0]['label'])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume_exactly():
  """0 workers vs 2 worker processes: identical batches; a resumed iterator with workers continues exactly
  (across an epoch boundary: 1497 // 256 = 5 steps per epoch); evaluation batches too."""
  cfg = digits_cfg()
  reference = take(pipeline.train_iterator(cfg, global_batch_size=256, seed=5), 9)
  it = pipeline.train_iterator(digits_cfg(num_workers=2), global_batch_size=256, seed=5)
  try:
    first = take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  assert_same_batches(first, reference[:4])
  resumed = pipeline.train_iterator(digits_cfg(num_workers=2, prefetch=1), global_batch_size=256, seed=5)
  try:
    resumed.set_state(state)
    assert_same_batches(take(resumed, 5), reference[4:])
    assert resumed.get_state()['step'] == 9 and resumed.epoch == 1
  finally:
    resumed.close()
  evals = [list(pipeline.eval_iterator(digits_cfg(num_workers=w), global_batch_size=128)) for w in (0, 2)]
  assert len(evals[0]) == len(evals[1]) == 3
  for a, b in zip(*evals):
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(a[key], b[key])


def test_resume_in_the_main_process_mid_epoch_and_state_checks():
  cfg = digits_cfg()
  it = pipeline.train_iterator(cfg, global_batch_size=100, seed=0)
  reference = take(it, 20)  # 14 steps per epoch: crosses into epoch 1
  for k in (0, 3, 13, 14, 17):
    again = pipeline.train_iterator(cfg, global_batch_size=100, seed=0)
    again.set_state({'step': k, 'seed': 0, 'global_batch_size': 100, 'num_records': 1497})
    assert_same_batches(take(again, 3), reference[k:k + 3])
  state = it.get_state()
  assert state['step'] == 20 and len(json.dumps(state)) < 200
  again = pipeline.train_iterator(cfg, global_batch_size=100, seed=0)
  again.set_state(json.dumps(state).encode())
  assert again.step == 20
  with pytest.raises(ValueError, match='seed'):
    pipeline.train_iterator(cfg, global_batch_size=100, seed=1).set_state(state)
  with pytest.raises(ValueError, match='global_batch_size'):
    pipeline.train_iterator(cfg, global_batch_size=50, seed=0).set_state(state)


@pytest.mark.parametrize('process_count', [2, 4])
def test_global_batch_is_identical_for_any_process_count(process_count):
  cfg = digits_cfg()
  whole = take(pipeline.train_iterator(cfg, global_batch_size=64, seed=9), 4)
  parts = [take(pipeline.train_iterator(cfg, global_batch_size=64, seed=9, process_index=p,
                                        process_count=process_count), 4) for p in range(process_count)]
  for t in range(4):
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([parts[p][t][key] for p in range(process_count)]),
                                    whole[t][key])
  # A state saved by process 0 of P resumes a single-process run at the same global batch.
  it = pipeline.train_iterator(cfg, global_batch_size=64, seed=9, process_index=0,
                               process_count=process_count)
  take(it, 2)
  single = pipeline.train_iterator(cfg, global_batch_size=64, seed=9)
  single.set_state(it.get_state())
  assert_same_batches([next(single)], whole[2:3])


def test_shards_are_disjoint_and_cover_each_epoch():
  n, gb, procs = 1497, 96, 3
  fns = [pipeline.TrainBatchFn(sources.digits_source('train'), seed=4, image_size=16, scale_min=16,
                                scale_max=16, random_flip=False, dct_scaling=True, global_batch_size=gb,
                                process_index=p, process_count=procs, max_consecutive_bad=1)
         for p in range(procs)]
  steps = n // gb
  epochs = []
  for epoch in range(2):
    seen = [np.concatenate([fn.indices(epoch * steps + t)[1] for t in range(steps)]) for fn in fns]
    for p in range(procs):
      assert all(fns[p].indices(epoch * steps + t)[0] == epoch for t in range(steps))
      for q in range(p):
        assert not set(seen[p]) & set(seen[q])
    everything = np.concatenate(seen)
    assert len(everything) == steps * gb == len(set(everything.tolist()))  # n % gb = 57 dropped
    assert set(everything.tolist()) <= set(range(n))
    epochs.append(everything)
  assert set(epochs[0].tolist()) != set(epochs[1].tolist())  # a new shuffle (and other dropped records)


def test_eval_iterator_pads_and_covers_every_record_once():
  cfg = digits_cfg(eval_scale=18)
  src = sources.digits_source('validation')
  expected = np.stack([transforms.eval_transform(src.record(i)[0], image_size=16, scale=18)
                       for i in range(len(src))])
  for procs, gb in [(1, 64), (2, 64), (3, 48)]:
    per_process = [list(pipeline.eval_iterator(cfg, global_batch_size=gb, process_index=p,
                                               process_count=procs)) for p in range(procs)]
    assert len({len(b) for b in per_process}) == 1 and len(per_process[0]) == -(-300 // gb)
    images, labels = [], []
    for t in range(len(per_process[0])):
      for p in range(procs):
        batch = per_process[p][t]
        assert batch['image'].shape == (gb // procs, 16, 16, 3) and batch['mask'].dtype == bool
        assert not batch['image'][~batch['mask']].any()
        images.append(batch['image'][batch['mask']])
        labels.append(batch['label'][batch['mask']])
    np.testing.assert_array_equal(np.concatenate(images), expected)
    np.testing.assert_array_equal(np.concatenate(labels), src.labels)
  assert pipeline.eval_scale(digits_cfg()) == 18  # (16 + 20) // 2
  assert len(list(pipeline.eval_iterator(cfg, global_batch_size=64, scale=24))[0]['image']) == 64


def test_bad_configurations_fail_clearly():
  with pytest.raises(ValueError, match='multiple of the process count'):
    pipeline.train_iterator(digits_cfg(), global_batch_size=10, seed=0, process_count=4)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    pipeline.train_iterator(digits_cfg(), global_batch_size=4096, seed=0)
  with pytest.raises(ValueError, match='scale_min'):
    pipeline.train_iterator(digits_cfg(scale_min=8), global_batch_size=64, seed=0)
  with pytest.raises(ValueError, match='unknown data.source'):
    pipeline.dataset_info(digits_cfg(source='nope'))


def test_typed_settings_have_the_default_configs_fields_and_defaults():
  """The settings types list the fields (nobody else does), and every default is configs/default.py's: a
  partial config or an older run's config.json gets exactly those values."""
  from vggjax import settings
  from vggjax.configs import default
  base = default.get_config()
  for cls in (settings.DataSettings, settings.TrainSettings, settings.ModelSettings):
    assert set(cls.field_names()) == set(base[cls.BLOCK]), cls
    assert cls.from_config({}).to_dict() == cls.from_config(base[cls.BLOCK]).to_dict()
  d = settings.DataSettings.from_config(digits_cfg(num_workers=3))
  assert (d.num_workers, d.max_consecutive_bad) == (3, base.data.max_consecutive_bad) and d.jpeg_dct_scaling
  assert settings.DataSettings.from_config(ml_collections.ConfigDict({'source': 'digits'})).num_workers == (
      base.data.num_workers)
  as_json = json.loads(json.dumps(base.data.to_dict()))  # lists where the config had tuples
  assert settings.DataSettings.from_config(as_json) == settings.DataSettings.from_config(base.data)
  assert settings.DataSettings.from_config(d) is d
  assert d.validation_scale == pipeline.eval_scale(digits_cfg()) == 18  # (16 + 20) / 2
