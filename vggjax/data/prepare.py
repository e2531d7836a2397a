"""Dataset preparation commands.

Training-set statistics (the mean RGB the paper subtracts, the std, and the RGB eigen-decomposition of
AlexNet's colour shift), for any source a config describes:

    python -m vggjax.data.prepare stats --config=configs/vgg16.py --config.data.source=folder \\
        --config.data.data_dir=/data/mine [--num_images=20000] [--output=stats.json]

Each image counts equally: it is rescaled so its smaller side is data.scale_min and centre-cropped to
data.image_size (the evaluation transform at Q = Smin), and the statistics are over every pixel of those
crops, on the 0-255 scale. ``--num_images`` > 0 uses a fixed random sample (seed 0) of the training split;
0 uses all of it. The eigenvalues follow ``vggjax.preprocessing.IMAGENET_EIGVAL``'s convention (eigenvalues
of the covariance of 0-1 pixels, times 255, descending; eigenvectors as columns). The command prints the
``--config.data.mean_rgb=...`` overrides to use, and the ``--config.data.pca_eigval=... pca_eigvec=...``
ones that make the colour shift use the dataset's own RGB covariance (ImageNet's is the default).

Converting a TFDS dataset prepared as tfrecord (which random access cannot read) to array_record, in place
(the converted shards sit beside the tfrecord ones and TFDS picks them for random access):

    python -m vggjax.data.prepare convert --name=imagenet2012 --data_dir=~/tensorflow_datasets [--out_dir=DIR]

The conversion copies the serialized examples record by record (TFRecord framing read in Python, CRCs not
verified; array_record written with group_size 1, as TFDS writes it): it needs neither TensorFlow nor Beam.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import struct

import numpy as np
from absl import flags
from ml_collections import config_flags

from vggjax import cli, config_lib, rundir
from vggjax.data import pipeline, transforms
from vggjax.settings import data_settings


class RgbMoments:
  """Streaming mean and covariance of RGB pixels (float64 sums), mergeable across threads."""

  def __init__(self):
    self.count = 0
    self.sum = np.zeros(3)
    self.outer = np.zeros((3, 3))

  def add(self, image: np.ndarray) -> None:
    x = np.asarray(image, np.float64).reshape(-1, 3)
    self.count += len(x)
    self.sum += x.sum(0)
    self.outer += x.T @ x

  def merge(self, other: 'RgbMoments') -> None:
    self.count += other.count
    self.sum += other.sum
    self.outer += other.outer

  def result(self) -> dict:
    if self.count < 2:
      raise ValueError('need at least 2 pixels')
    mean = self.sum / self.count
    cov = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)  # 0-255 scale, as np.cov
    w, v = np.linalg.eigh(cov / 255.0 ** 2)
    order = np.argsort(w)[::-1]
    v = v[:, order]
    v = v * np.where(v.sum(0) < 0, -1.0, 1.0)  # a sign convention: each eigenvector sums to >= 0
    return {'mean_rgb': mean.tolist(), 'std_rgb': np.sqrt(np.diag(cov)).tolist(),
            'eigval': (np.maximum(w[order], 0) * 255.0).tolist(), 'eigvec': v.tolist(),
            'num_pixels': int(self.count)}


def pca_flags(stats: dict) -> str:
  """The --config.data.pca_eigval/pca_eigvec overrides for the eigen-decomposition in ``stats``."""
  val = '(' + ', '.join(f'{x:.4g}' for x in stats['eigval']) + ')'
  vec = '(' + ', '.join('(' + ', '.join(f'{x:.4f}' for x in row) + ')' for row in stats['eigvec']) + ')'
  return f'--config.data.pca_eigval="{val}" --config.data.pca_eigvec="{vec}"'


def compute_stats(data, num_images: int = 0, num_threads: int = 4, split: str | None = None) -> dict:
  """The training-set statistics described in the module docstring, as a JSON-able dict (data: the
  settings.DataSettings, or a config's data block)."""
  data = data_settings(data)
  source = pipeline.open_source(data, split or data.train_split)
  n = len(source)
  indices = np.arange(n)
  if 0 < num_images < n:
    indices = np.sort(np.random.default_rng(0).choice(n, num_images, replace=False))
  size, scale = data.image_size, data.scale_min
  chunks = np.array_split(indices, max(1, num_threads))
  bad: list[str] = []

  def work(chunk) -> RgbMoments:
    m = RgbMoments()
    for i in chunk:
      try:
        m.add(transforms.eval_transform(source.record(int(i))[0], image_size=size, scale=scale))
      except Exception as e:  # noqa: BLE001 - skip unreadable images, as the pipeline does
        bad.append(f'{source.describe(int(i))}: {type(e).__name__}: {e}')
    return m

  total = RgbMoments()
  with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
    for m in pool.map(work, chunks):
      total.merge(m)
  out = total.result()
  out.update(num_images=len(indices) - len(bad), skipped=bad, source=source.name, image_size=size,
             scale=scale)
  return out


def read_tfrecord(path: str | os.PathLike):
  """Yields the records of an uncompressed TFRecord file (CRCs are not verified); no TensorFlow needed."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)  # uint64 length, uint32 masked CRC-32C of the length
      if not header:
        return
      if len(header) < 12:
        raise ValueError(f'{path}: truncated record header')
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        raise ValueError(f'{path}: truncated record')
      yield data


def _dataset_version_dirs(root: pathlib.Path, name: str) -> list[pathlib.Path]:
  """DATA_DIR/name[/config]/version directories (those holding a dataset_info.json)."""
  base = root / name.split(':')[0]
  if (base / 'dataset_info.json').exists():  # name already includes the config/version
    return [base]
  infos = list(base.glob('*/dataset_info.json')) + list(base.glob('*/*/dataset_info.json'))
  return sorted(p.parent for p in infos)


def convert_to_array_record(name: str, data_dir: str, out_dir: str | None = None) -> list[pathlib.Path]:
  """Converts TFDS dataset `name` prepared as tfrecord (every config and version under data_dir/name) to
  array_record, in place (dataset_info.json lists array_record as an alternative file format, which TFDS
  picks for random access) or into out_dir (same layout, array_record only). Needs neither TensorFlow
  nor Beam. Returns the converted version directories."""
  from array_record.python.array_record_module import ArrayRecordWriter
  root = pathlib.Path(data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')).expanduser()
  version_dirs = _dataset_version_dirs(root, name)
  if not version_dirs:
    raise FileNotFoundError(f'no prepared TFDS dataset under {root / name} (looked for '
                            f'{root / name}/[CONFIG/]VERSION/dataset_info.json); prepare it with '
                            f'`tfds build {name} --data_dir={root} --file_format=array_record` '
                            f'(needs the tf extra)')
  converted = []
  for vdir in version_dirs:
    info_path = vdir / 'dataset_info.json'
    info = json.loads(info_path.read_text())
    formats = [info.get('fileFormat', 'tfrecord')] + list(info.get('alternativeFileFormats', []))
    if 'array_record' in formats and not out_dir:
      print(f'{vdir}: already has array_record')
      continue
    target = pathlib.Path(out_dir).expanduser() / vdir.relative_to(root) if out_dir else vdir
    target.mkdir(parents=True, exist_ok=True)
    shards = sorted(vdir.glob('*.tfrecord-*-of-*'))
    if not shards:
      raise FileNotFoundError(f'{vdir} has no *.tfrecord-NNNNN-of-NNNNN shards to convert')
    for shard in shards:
      out = target / shard.name.replace('.tfrecord-', '.array_record-')
      tmp = out.with_name(out.name + '.incomplete')
      writer = ArrayRecordWriter(str(tmp), 'group_size:1')  # one record per chunk: random access
      count = 0
      for record in read_tfrecord(shard):
        writer.write(record)
        count += 1
      writer.close()
      os.replace(tmp, out)
      print(f'{shard.name} -> {out.name}: {count} records')
    if out_dir:
      for j in vdir.glob('*.json'):
        if j.name != 'dataset_info.json':
          (target / j.name).write_bytes(j.read_bytes())
      for j in vdir.glob('*.labels.txt'):
        (target / j.name).write_bytes(j.read_bytes())
      info['fileFormat'] = 'array_record'
      info.pop('alternativeFileFormats', None)
    else:
      info['alternativeFileFormats'] = list(info.get('alternativeFileFormats', [])) + ['array_record']
    rundir.write_text(target / 'dataset_info.json', json.dumps(info, indent=2))  # whole: TFDS reads it
    converted.append(target)
  return converted


def _define_flags() -> dict:
  return {
      'config': config_flags.DEFINE_config_file(
          'config', str(cli.config_file('default')), 'stats: a config file; override fields with '
          '--config.FIELD=VALUE'),
      'num_images': flags.DEFINE_integer('num_images', 0, 'stats: images sampled (0: the whole training split)'),
      'num_threads': flags.DEFINE_integer('num_threads', 4, 'stats: decoding threads'),
      'output': flags.DEFINE_string('output', '', 'stats: also write the JSON here'),
      'name': flags.DEFINE_string('name', '', 'convert: the TFDS dataset name (e.g. imagenet2012)'),
      'data_dir': flags.DEFINE_string('data_dir', '', 'convert: the TFDS data_dir'),
      'out_dir': flags.DEFINE_string('out_dir', '', 'convert: write the converted dataset here (default: in '
                                     'place)'),
  }


def main(argv, flag_holders) -> None:
  """`vggjax prepare stats|convert [flags]`."""
  if len(argv) != 2 or argv[1] not in ('stats', 'convert'):
    raise cli.CommandError(f'expected one of stats, convert (vggjax prepare {{stats|convert}} [flags]); got '
                           f'{argv[1:]}')
  f = cli.start_command(argv, flag_holders, max_args=1)
  if argv[1] == 'convert':
    if not f['name']:
      raise cli.CommandError('convert needs --name (and usually --data_dir)')
    done = convert_to_array_record(f['name'], f['data_dir'], f['out_dir'])
    print(f'converted {f["name"]} to array_record: {", ".join(map(str, done)) or "nothing to do"}')
    return
  config_lib.validate(f['config'])  # a bad field: one line, exit 2
  stats = compute_stats(f['config'].data, f['num_images'], f['num_threads'])
  text = json.dumps(stats, indent=2)
  if f['output']:
    rundir.write_text(f['output'], text + '\n')
  print(text)
  fmt = lambda xs: '(' + ', '.join(f'{x:.3f}' for x in xs) + ')'  # noqa: E731
  print(f'\n# {stats["num_images"]} images of {stats["source"]}; use:\n'
        f'--config.data.mean_rgb="{fmt(stats["mean_rgb"])}"\n'
        f'# (std_rgb {fmt(stats["std_rgb"])})\n'
        f'# and for the colour shift (AlexNet\'s PCA lighting) with this dataset\'s statistics:\n'
        f'{pca_flags(stats)}')


def run() -> None:
  cli.run_command(_define_flags, main)


if __name__ == '__main__':
  run()
