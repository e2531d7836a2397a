"""Transfer to other datasets, as in the paper's Appendix B: fixed VGG descriptors and linear SVMs.

The command over three libraries: ``vggjax.descriptors`` (the nets' fc7 descriptors at scales Q (256, 384,
512), averaged or stacked over scales, several nets stacked, L2-normalised; cached), ``vggjax.linear_probe``
(one-vs-rest linear SVMs, C by cross-validation, random splits) and ``vggjax.evaluation.metrics`` (mean class
recall for Caltech-101/256; VOC's mean average precision, 'voc12' or 'voc07', for multi-label TFDS sources
such as voc/2007 with --config.data.label_key=labels, and for single-label ones too).

    python -m vggjax.transfer --weights=weights/vgg16_tv --weights=weights/vgg19_tv --config=my_data.py \\
        --workdir=runs/transfer --train_per_class=30 --test_per_class=50 --num_splits=3
    python -m vggjax.transfer --weights=runs/finetuned --config=my_data.py --workdir=runs/ft --classifier=net

The data is the config's ``data`` block, any labelled source (folder, tfds, mnist/fashion_mnist, digits).
With ``--train_per_class=N`` the train and eval splits are pooled (the train split alone when data.eval_split
is empty: Caltech's single folder of classes) and split at random per class; with 0 (the default) the SVMs
train on data.train_split and are tested on data.eval_split once (VOC).

Descriptors are cached (WORKDIR/descriptors by default: per net, scale, flip setting and split, written as
they are computed), so an interrupted run resumes where it stopped and a second run with other SVM or
combination options computes nothing. ``--classifier=net`` scores the weights' own classifier (fc8) on the
same test images with the same metrics and splits: the fine-tuned alternative (``configs/finetune.py``),
dense softmax posteriors averaged over the scales (and flips).

Outputs in WORKDIR: transfer.json (options, per split C, mean class recall, accuracy and mAP, their mean and
std over splits), a table on stdout, and confusion.png (the confusion matrix of the first split, rows
normalised, single-label sources).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Mapping, Sequence

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from vggjax import cli, rundir
from vggjax.data.examples import Examples, open_examples
from vggjax.descriptors import COMBINE, PAPER_SCALES, DescriptorCache, Descriptors, check_combine, load_net
from vggjax.evaluation.metrics import AP_MODES
from vggjax.linear_probe import DEFAULT_C, class_splits, plot_confusion, run_protocol
from vggjax.settings import DataSettings

log = logging.getLogger('vggjax')
CLASSIFIERS = ('svm', 'net')


def format_table(result: Mapping) -> str:
  """A table like the paper's Table 11: one row per method, the dataset's metrics as columns."""
  pct = lambda r, m: (f'{100 * r[m]:.1f} ± {100 * r[m + "_std"]:.1f}' if m in r else '-')  # noqa: E731
  name = result.get('dataset', '')
  lines = [f'| method | {name} mean class recall (%) | {name} accuracy (%) | {name} mAP (%) |',
           '|---|---|---|---|',
           f'| {result["method"]} | {pct(result, "mean_class_recall")} | {pct(result, "accuracy")} | '
           f'{pct(result, "mAP")} |']
  return '\n'.join(lines)


def _clean(x):
  if isinstance(x, float) and not np.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return _clean(x.item())
  return x


def _check(weights: Sequence[str], classifier: str, combine: str, ap_mode: str) -> None:
  if classifier not in CLASSIFIERS:
    raise ValueError(f'unknown classifier {classifier!r}; valid: {", ".join(CLASSIFIERS)}')
  check_combine(combine)
  if ap_mode not in AP_MODES:
    raise ValueError(f'unknown AP mode {ap_mode!r}; valid: {", ".join(AP_MODES)}')
  if not weights:
    raise ValueError('no weights given: pass one or more weights directories or training runs')
  if classifier == 'net' and len(weights) != 1:
    raise ValueError(f'classifier=net scores one net\'s own fc8; got {len(weights)} weights')


def _splits(data: DataSettings, y: np.ndarray, valid: np.ndarray, offset: int, names: Sequence[str], *,
            train_per_class: int, test_per_class: int, num_splits: int, seed: int) -> tuple[list, dict]:
  """(train, test) index pairs into the pooled images (the train split's first, `offset` of them), and how
  they were drawn."""
  if not train_per_class:
    return ([(np.flatnonzero(valid[:offset]), offset + np.flatnonzero(valid[offset:]))],
            {'kind': 'fixed split', 'train': data.train_split, 'test': data.eval_split})
  if y.ndim == 2:
    raise ValueError('--train_per_class (the Caltech protocol) needs a single-label source')
  pool = np.flatnonzero(valid)
  splits = [(pool[a], pool[b]) for a, b in class_splits(y[pool], train_per_class, test_per_class, num_splits,
                                                        seed, names)]
  return splits, {'kind': 'random splits', 'train_per_class': train_per_class,
                  'test_per_class': test_per_class, 'num_splits': num_splits, 'seed': seed,
                  'pool': [data.train_split] + ([data.eval_split] if data.eval_split else [])}


def transfer(weights: Sequence[str], data_cfg, *, workdir: str, scales: Sequence[int] = PAPER_SCALES,
             combine: str = 'average', flip: bool = True, classifier: str = 'svm', train_per_class: int = 0,
             test_per_class: int = 0, num_splits: int = 3, seed: int = 0, cs: Sequence[float] = DEFAULT_C,
             folds: int = 3, ap_mode: str = 'voc12', cache_dir: str | None = None, batch_size: int = 32,
             progress: bool = True) -> dict:
  """The whole protocol: descriptors of the train and eval splits (cached), SVMs per split, metrics.
  Writes WORKDIR/transfer.json and WORKDIR/confusion.png and returns the result."""
  _check(weights, classifier, combine, ap_mode)
  t0 = time.time()
  os.makedirs(workdir, exist_ok=True)
  cache = DescriptorCache(cache_dir or os.path.join(workdir, 'descriptors'))
  describe = Descriptors(cache, batch_size=batch_size, progress=progress)
  nets = [load_net(w) for w in weights]
  data = DataSettings.from_config(data_cfg)  # read once; every default from configs/default.py
  if not data.eval_split and not train_per_class:
    raise ValueError('data.eval_split is empty: the SVMs need test images (set it), or random splits of one '
                     'pool (set --train_per_class)')
  parts: list[Examples] = [open_examples(data, s) for s in (data.train_split, data.eval_split) if s]
  if len({ex.multilabel for ex in parts}) > 1:
    raise ValueError(f'{data.train_split} and {data.eval_split} differ in label kind (single vs multi-label)')
  names, offset = parts[0].class_names, len(parts[0])
  num_classes = parts[0].labels.shape[1] if parts[0].multilabel else len(names)
  if classifier == 'net' and nets[0].meta['model']['num_classes'] != num_classes:
    raise ValueError(f'{weights[0]} classifies {nets[0].meta["model"]["num_classes"]} classes; the data has '
                     f'{num_classes}: fine-tune it on this data first (configs/finetune.py)')
  computed = [describe(nets, ex, scales, combine, flip=flip) if classifier == 'svm' else
              (np.zeros((len(ex), 0), np.float32), np.ones(len(ex), bool)) for ex in parts]
  x, valid = np.concatenate([c[0] for c in computed]), np.concatenate([c[1] for c in computed])
  y = np.concatenate([ex.labels for ex in parts])
  splits, protocol = _splits(data, y, valid, offset, names, train_per_class=train_per_class,
                             test_per_class=test_per_class, num_splits=num_splits, seed=seed)

  def classify(indices):  # the net's own posteriors of pooled images
    out, indices = np.zeros((len(indices), num_classes), np.float32), np.asarray(indices)
    for k, ex in enumerate(parts):
      part = (indices >= offset) if k else (indices < offset)
      if np.any(part):
        out[part] = describe.posteriors(nets[0], ex, indices[part] - k * offset, scales, flip=flip)
    return out

  result = run_protocol(x, y, splits, num_classes=num_classes, cs=cs, folds=folds, seed=seed,
                        ap_mode=ap_mode, scores_fn=classify if classifier == 'net' else None,
                        progress=progress)
  arch = ' & '.join(n.meta['model']['name'] for n in nets)
  method = ('fine-tuned net' if classifier == 'net' else
            f'{arch} fc7, {combine} over Q={",".join(map(str, scales))}{"" if flip else ", no flip"}, '
            'linear SVM')
  result.update({
      'method': method, 'dataset': data.name or data.source,
      'data_dir_name': os.path.basename(os.path.normpath(data.data_dir)),
      'nets': [{'path': n.path, 'model': n.meta['model'], 'fingerprint': n.fingerprint} for n in nets],
      'classifier': classifier, 'scales': [int(q) for q in scales], 'combine': combine, 'flip': flip,
      'descriptor_dim': int(x.shape[1]), 'num_classes': num_classes, 'class_names': names,
      'multilabel': parts[0].multilabel, 'protocol': protocol, 'ap_mode': ap_mode,
      'C_grid': [float(c) for c in cs], 'cv_folds': folds,
      'unreadable': int((~valid).sum()), 'images_computed': cache.computed_images,
      'wall_s': round(time.time() - t0, 1)})
  rundir.write_json(os.path.join(workdir, 'transfer.json'), _clean(result), indent=1)
  if result.get('confusion') is not None:
    plot_confusion(result['confusion'], names, os.path.join(workdir, 'confusion.png'),
                   f'{method}: split 0, mean class recall {result["splits"][0]["mean_class_recall"]:.3f}')
  return result


# ----------------------------------------------------------------------------------------------------------
# Command line.


def _define_flags():
  f = {}
  f['config'] = config_flags.DEFINE_config_file(
      'config', None, 'The config whose data block is the target dataset (configs/*.py[:arg]); its '
      'data.train_split trains the SVMs, data.eval_split tests them. Override with --config.FIELD=VALUE.',
      lock_config=False)
  f['weights'] = flags.DEFINE_multi_string(
      'weights', [], 'A weights directory or training run; repeat to stack several nets\' descriptors.')
  f['workdir'] = flags.DEFINE_string('workdir', None, 'Where transfer.json, confusion.png and (by default) '
                                     'the descriptor cache go.')
  f['scales'] = flags.DEFINE_list('scales', [str(q) for q in PAPER_SCALES], 'Smaller-side sizes Q.')
  f['combine'] = flags.DEFINE_enum('combine', 'average', list(COMBINE), 'Average or stack the scales.')
  f['flip'] = flags.DEFINE_bool('flip', True, 'Average each descriptor with the flipped image\'s.')
  f['classifier'] = flags.DEFINE_enum('classifier', 'svm', list(CLASSIFIERS),
                                      'svm: linear SVMs on the descriptors; net: the net\'s own fc8 '
                                      '(a fine-tuned net), same splits and metrics.')
  f['train_per_class'] = flags.DEFINE_integer(
      'train_per_class', 0, 'N > 0: pool both splits and draw random splits of N training images per class '
      '(Caltech: 30, 60); 0: train on data.train_split, test on data.eval_split.')
  f['test_per_class'] = flags.DEFINE_integer('test_per_class', 0, 'Test images per class in each random '
                                             'split (Caltech-101: 50; 0: all the rest).')
  f['num_splits'] = flags.DEFINE_integer('num_splits', 3, 'Random splits (the paper: 3).')
  f['seed'] = flags.DEFINE_integer('seed', 0, 'Seed of the random splits and cross-validation folds.')
  f['C'] = flags.DEFINE_list('C', [str(c) for c in DEFAULT_C], 'SVM C values; chosen by cross-validation.')
  f['cv_folds'] = flags.DEFINE_integer('cv_folds', 3, 'Cross-validation folds on the training images.')
  f['ap'] = flags.DEFINE_enum('ap', 'voc12', list(AP_MODES), 'AP: voc12 (area under the interpolated '
                              'curve), voc07 (11 points), none (scikit-learn\'s).')
  f['cache_dir'] = flags.DEFINE_string('cache_dir', '', 'Descriptor cache (default WORKDIR/descriptors).')
  f['batch_size'] = flags.DEFINE_integer('batch_size', 32, 'Images of equal size per forward pass.')
  f.update(cli.define_cpu_flag())
  flags.mark_flags_as_required(['workdir', 'config'])
  return f


def main(argv, flag_holders) -> None:
  f = cli.start_command(argv, flag_holders)
  log.setLevel(logging.INFO)
  try:
    scales = [int(q) for q in f['scales']]
    cs = [float(c) for c in f['C']]
  except ValueError as e:
    raise app.UsageError(f'--scales takes integers and --C numbers: {e}')
  if not cs or min(cs) <= 0:
    raise app.UsageError(f'--C must be positive numbers, got {f["C"]}')
  if not f['weights']:
    raise app.UsageError('--weights=DIR is required (a weights directory or a training run; repeat to stack)')
  try:
    result = transfer(f['weights'], f['config'].data, workdir=f['workdir'], scales=scales,
                      combine=f['combine'], flip=f['flip'], classifier=f['classifier'],
                      train_per_class=f['train_per_class'], test_per_class=f['test_per_class'],
                      num_splits=f['num_splits'], seed=f['seed'], cs=cs, folds=f['cv_folds'], ap_mode=f['ap'],
                      cache_dir=f['cache_dir'] or None, batch_size=f['batch_size'])
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e))
  print(format_table(result))
  print(f'{len(result["splits"])} split(s), {result["descriptor_dim"]}-D descriptors, '
        f'{result["images_computed"]} images computed (the rest from the cache), {result["unreadable"]} '
        f'unreadable; {result["wall_s"]:.1f} s; results in {os.path.join(f["workdir"], "transfer.json")}',
        flush=True)


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
