"""The pictures and TensorBoard events a person reads: what curves.png and localization.png are built from
(titles, axis labels and series from the run's head, the learning rate and its reductions, hit/miss marks),
and the grouped TensorBoard tags with the config beside them, read back from the event file. No training:
rows and results as the trainer and `vggjax localize` write them."""

import json
import struct

import numpy as np
import pytest

from vggjax import plots, runlog

matplotlib = pytest.importorskip('matplotlib')


def _config(head='classify'):
  return {'model': {'name': 'vgg11', 'head': head}, 'data': {'source': 'digits', 'name': '', 'image_size': 32,
                                                             'pca_eigval': [0.2, 0.1]},
          'optimizer': {'schedule': 'plateau', 'lr': 0.01}, 'train': {'global_batch_size': 32},
          'labels': ['zero', 'one']}


def _rows(box=False):
  """Rows as train.py writes them: a log row every 2 steps (8 steps an epoch), an evaluation every 8 steps,
  the lr divided by 10 after the evaluation of step 16."""
  rows = []
  for step in range(2, 33, 2):
    rows.append({'step': step, 'epoch': step / 8, 'lr': 0.01 if step <= 16 else 0.001, 'loss': 2.0 / step,
                 'train_top1': step / 40, 'grad_norm': 1.0, 'img_per_s': 100.0})
    if step % 8 == 0:
      row = {'step': step, 'epoch': step / 8, 'val_top1': step / 40, 'val_top5': step / 35,
             'val_loss': 2.5 / step, 'val_count': 300, 'lr_reduced': step == 16}
      if box:
        row['val_iou'] = step / 50
      rows.append(row)
  return rows


def _lines(ax) -> dict:
  return {line.get_label(): line for line in ax.get_lines()}


def test_curves_of_a_classifier_name_the_run_and_draw_the_lr_by_epoch():
  fig = plots.curves_figure(_rows(), _config(), 'runs/demo')
  try:
    loss, score, lr = fig.axes[:3]
    assert loss.get_ylabel() == 'cross-entropy' and score.get_ylabel() == 'accuracy'
    assert lr.get_title() == 'learning rate'
    assert {'train loss', 'val loss'} <= set(_lines(loss))
    assert {'val top-1', 'val top-5', 'train top-1'} <= set(_lines(score))
    lr_line = _lines(lr)['learning rate']
    assert list(lr_line.get_ydata()) == [0.01] * 8 + [0.001] * 8
    for ax in (loss, score, lr):  # the epoch axis, and the reduction after step 16 (epoch 2) on each panel
      assert ax.get_xlabel() == 'epoch'
      assert [list(v.get_xdata()) for k, v in _lines(ax).items() if k == 'lr reduced'] == [[2.0, 2.0]]
    assert list(_lines(score)['val top-1'].get_xdata()) == [1.0, 2.0, 3.0, 4.0]
    title = fig._suptitle.get_text()
    assert 'vgg11 on digits at 32 px plateau lr 0.01' in title and 'runs/demo' in title
    assert 'final val top-1 80.0% (step 32)' in title
  finally:
    matplotlib.pyplot.close(fig)


def test_curves_of_a_box_net_are_labelled_from_its_head():
  fig = plots.curves_figure(_rows(box=True), _config('pcr'), 'runs/tb_pcr')
  try:
    loss, score = fig.axes[:2]
    assert loss.get_ylabel() == 'Euclidean box loss'
    assert score.get_ylabel() == 'IoU > 0.5 rate, mean IoU'
    labels = set(_lines(score))
    assert {'val IoU > 0.5', 'val mean IoU', 'train IoU > 0.5'} <= labels
    assert not any('top-5' in k or 'top-1' in k for k in labels)  # top-5 is top-1 for a box net
    assert 'VGG11 PCR' in fig._suptitle.get_text().upper() and 'final val IoU > 0.5' in fig._suptitle.get_text()
  finally:
    matplotlib.pyplot.close(fig)
  # Without a config, a row with a mean IoU marks a box net.
  assert plots.head_of(None, _rows(box=True)) == 'pcr' and plots.head_of(None, _rows()) == 'classify'


def test_plot_curves_reads_the_runs_config(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps(_config('scr')))
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in _rows(box=True)))
  path = runlog.plot_curves(tmp_path)
  assert path.name == 'curves.png' and path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert runlog.plot_curves(tmp_path, rows=[]) is None


def test_tiles_spread_over_the_classes():
  labels = [0] * 12 + [1] * 4 + [2] * 3
  assert plots.spread_over_classes(labels, 8) == [0, 12, 16, 1, 13, 17, 2, 14]
  assert sorted(plots.spread_over_classes(labels, 100)) == list(range(19))


def test_localization_figure_marks_each_hit_and_miss():
  image = np.zeros((48, 48, 3), np.uint8)
  examples = [{'image': image, 'label': c, 'gt': np.array([[2.0, 2.0, 20.0, 20.0]]), 'scale': (1.0, 1.0),
               'boxes': {'crop': {'class': c, 'box': np.array([2.0, 2.0, 20.0, 20.0]), 'iou': 1.0, 'hit': True},
                         'dense': {'class': 1 - c, 'box': np.array([30.0, 30.0, 40.0, 40.0]), 'iou': 0.0,
                                   'hit': False}}} for c in (0, 1)]
  result = {'examples': examples, 'class_names': ['zero', 'one'], 'head': 'pcr', 'scale': 48,
            'iou_threshold': 0.5, 'protocols': {'crop': {}, 'dense': {}}}
  fig = plots.localization_figure(result)
  try:
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts[-1] == 'true: zero'  # the top line of the first tile
    assert '\u2713 crop: zero, IoU 1.00' in texts and '\u2717 dense: one, IoU 0.00' in texts
    assert min(t.get_fontsize() for t in fig.axes[0].texts) >= 10
    assert 'crop 2/2 right, dense 0/2 right' in fig._suptitle.get_text()
  finally:
    matplotlib.pyplot.close(fig)


def _events(directory) -> list:
  """The Event protos of a TensorBoard event file (TFRecord framing: length, crc, data, crc), read with
  tensorboardX's own protos (neither TensorFlow nor TensorBoard is needed)."""
  from tensorboardX.proto import event_pb2
  (path,) = directory.glob('events.out.tfevents.*')
  data, out, i = path.read_bytes(), [], 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    event = event_pb2.Event()
    event.ParseFromString(data[i + 12:i + 12 + n])
    out.append(event)
    i += 12 + n + 4
  return out


def test_tensorboard_tags_are_grouped_with_the_config_beside_them(tmp_path):
  pytest.importorskip('tensorboardX')
  (tmp_path / 'config.json').write_text(json.dumps(_config()))
  writer = runlog.MetricWriter(tmp_path)
  for row in _rows()[:6]:
    writer.write(row)
  writer.close()
  # metrics.jsonl keeps its keys
  assert set(json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[0])) == {
      'step', 'epoch', 'lr', 'loss', 'train_top1', 'grad_norm', 'img_per_s'}
  scalars, others = {}, set()
  for event in _events(tmp_path / 'tensorboard'):
    for v in event.summary.value:
      if v.metadata.plugin_data.plugin_name in ('', 'scalars') and v.HasField('simple_value'):
        scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
      else:
        others.add((v.tag, v.metadata.plugin_data.plugin_name))
  assert set(scalars) == {'train/loss', 'train/top1', 'train/grad_norm', 'train/lr', 'perf/img_per_s',
                          'val/top1', 'val/top5', 'val/loss'}
  assert scalars['val/loss'] == [(8, pytest.approx(2.5 / 8))]
  assert [s for s, _ in scalars['train/loss']] == [2, 4, 6, 8, 10]
  assert {('config/text_summary', 'text'), ('_hparams_/experiment', 'hparams'),
          ('_hparams_/session_start_info', 'hparams'), ('custom_scalars__config__', 'custom_scalars')} <= others
  text = next(v for e in _events(tmp_path / 'tensorboard') for v in e.summary.value if v.tag.startswith('config'))
  assert '"schedule": "plateau"' in text.tensor.string_val[0].decode()
  assert runlog.tensorboard_tag('ema_val_top1') == 'val_ema/top1' and runlog.tensorboard_tag('val_iou') == 'val/iou'
