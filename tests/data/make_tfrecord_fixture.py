"""Writes tests/data/written_by_tensorflow.tfrecord with TensorFlow's own TFRecordWriter: the fixture against
which tests/test_data_sources.py checks its TFRecord writer and vggjax's reader (which need no TensorFlow).

Run once, in an environment with TensorFlow (`pip install tensorflow-cpu`), and commit the output:

    python tests/data/make_tfrecord_fixture.py

The records are those of `records()` below; the test rebuilds them from the same function.
"""

import pathlib
import sys


def records() -> list[bytes]:
  """Empty, short, every byte value, a run of zeros, and a few kB of a pattern."""
  return [b'', b'vggjax', bytes(range(256)), b'\x00' * 1000 + b'end', bytes((7 * i) % 251 for i in range(5000))]


def main() -> None:
  import tensorflow as tf
  out = pathlib.Path(__file__).with_name('written_by_tensorflow.tfrecord')
  with tf.io.TFRecordWriter(str(out)) as writer:
    for r in records():
      writer.write(r)
  back = [x.numpy() for x in tf.data.TFRecordDataset(str(out))]
  assert back == records()
  print(f'{out}: {len(back)} records, {out.stat().st_size} bytes, TensorFlow {tf.__version__}', file=sys.stderr)


if __name__ == '__main__':
  main()
