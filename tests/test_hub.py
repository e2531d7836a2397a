"""Published weights by name (vggjax.hub): downloaded under each source's URL scheme from a local HTTP server,
verified against the published checksum, converted, reused from the cache; a corrupted download refused and
removed. The served files are tiny VGGs built with torch here: nothing leaves this machine."""

import hashlib
import http.server
import io
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import reference_module, subprocess_env
from vggjax import checkpoints, hub, models
from vggjax.preprocessing import normalize

torch = reference_module('torch')
WIDTHS = [4, 'M', 8, 'M', 16, 16, 'M', 32, 32, 'M', 32, 32, 'M']  # VGG-A at 1/16 width


def tiny_torch_vgg(seed=0):
  """VGG-A at 1/16 width for 32x32 images in torchvision's layout (features.N, classifier.0/3/6)."""
  from torch import nn
  torch.manual_seed(seed)
  layers, cin = [], 3
  for v in WIDTHS:
    if v == 'M':
      layers.append(nn.MaxPool2d(2, 2))
    else:
      layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
      cin = v
  net = nn.Module()
  net.features = nn.Sequential(*layers)
  net.classifier = nn.Sequential(nn.Linear(32, 8), nn.ReLU(True), nn.Dropout(), nn.Linear(8, 8), nn.ReLU(True),
                                 nn.Dropout(), nn.Linear(8, 3))
  return net.eval()


class Server:
  """A local HTTP server of {path: (body, headers)} (or {path: ('redirect', location, headers)}), counting
  the requests of each path."""

  def __init__(self):
    self.routes, self.requests = {}, []
    routes, requests = self.routes, self.requests

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802
        requests.append(self.path)
        route = routes.get(self.path)
        if route is None:
          self.send_error(404)
          return
        if route[0] == 'redirect':
          self.send_response(302)
          self.send_header('Location', route[1])
          for k, v in route[2].items():
            self.send_header(k, v)
          self.send_header('Content-Length', '0')
          self.end_headers()
          return
        body, headers = route
        self.send_response(200)
        self.send_header('Content-Length', str(headers.pop('Content-Length', len(body))))
        for k, v in headers.items():
          self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
    self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
    self.thread.start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()
    self.thread.join(5)


@pytest.fixture(scope='module')
def server():
  s = Server()
  yield s
  s.close()


@pytest.fixture(scope='module')
def tiny():
  """The tiny net and its state dict as a .pth file's bytes, with the file name torchvision would give it."""
  net = tiny_torch_vgg()
  buffer = io.BytesIO()
  torch.save(net.state_dict(), buffer)
  data = buffer.getvalue()
  return net, data, f'vgg11-{hashlib.sha256(data).hexdigest()[:8]}.pth'


@pytest.fixture
def env(server, tmp_path, monkeypatch):
  monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / 'cache'))
  monkeypatch.setenv(hub.URL_ENV, server.url)
  monkeypatch.setenv('NO_PROXY', '127.0.0.1')
  monkeypatch.setenv('no_proxy', '127.0.0.1')
  server.requests.clear()
  return tmp_path / 'cache'


def logits(model, variables, meta, x_uint8):
  return np.asarray(model.apply(variables, normalize(x_uint8, checkpoints.normalization_from_meta(meta))))


def torch_logits(net, x_uint8):
  x = (x_uint8.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  with torch.no_grad():
    f = net.features(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32)))
    return net.classifier(f.flatten(1)).numpy()


def test_download_verify_convert_and_reuse(server, tiny, env, monkeypatch, capsys):
  net, data, file = tiny
  entry = hub.torchvision_entry(file, image_size=32)
  monkeypatch.setitem(hub.PUBLISHED['torchvision'], 'vgg11', entry)
  server.routes[f'/{file}'] = (data, {})
  model, variables = hub.get_model('vgg11', weights='torchvision')
  assert server.requests == [f'/{file}']
  assert (env / 'downloads' / 'torchvision' / file).read_bytes() == data
  assert f'downloading {file}' in capsys.readouterr().err  # the progress bar
  meta = checkpoints.load_meta(env / 'weights' / 'torchvision' / 'vgg11')
  assert meta['source_url'] == f'{server.url}/{file}' and meta['model']['width'] == 1 / 16
  x = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  got, want = logits(model, variables, meta, x), torch_logits(net, x)
  assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
  # The next call reads the cache: no request; another --out converts the cached file.
  again, _ = hub.load('vgg11')
  out = hub.weights_dir('torchvision', 'vgg11', out=env.parent / 'mine')
  assert server.requests == [f'/{file}']
  assert checkpoints.load_meta(out)['source_sha256'] == hashlib.sha256(data).hexdigest()
  np.testing.assert_array_equal(again['params']['fc8']['kernel'], variables['params']['fc8']['kernel'])


def test_corrupted_download_is_refused_and_removed_by_the_cli(server, tiny, env):
  """The real vgg16 entry served a file that is not torchvision's: one line naming the file and both
  checksums, exit 1, nothing left in the cache."""
  _, data, _ = tiny
  server.routes['/vgg16-397923af.pth'] = (data, {})
  result = subprocess.run([sys.executable, '-m', 'vggjax', 'convert', '--from=torchvision', '--weights=vgg16'],
                          env=subprocess_env(1), capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stderr
  lines = [line for line in result.stderr.splitlines() if not line.startswith('downloading ')]  # the bar
  got = hashlib.sha256(data).hexdigest()
  assert len(lines) == 1 and lines[0].startswith('error: vgg16-397923af.pth from '), result.stderr
  assert f'sha256 {got}, not the published 397923af' in lines[0] and 'removed' in lines[0]
  assert list((env / 'downloads' / 'torchvision').iterdir()) == []
  assert not (env / 'weights').exists()


def test_keras_md5_and_a_short_transfer(server, env, monkeypatch):
  body = b'not really an h5 file' * 100
  entry = hub.Published('keras', 'vgg16', 'vgg16', 'vgg16/tiny.h5', f'md5:{hashlib.md5(body).hexdigest()}')
  server.routes['/vgg16/tiny.h5'] = (body, {})
  assert hub.download(entry).read_bytes() == body
  real = hub.lookup('keras', 'VGG19')
  assert real.path == 'vgg19/vgg19_weights_tf_dim_ordering_tf_kernels.h5'
  server.routes[f'/{real.path}'] = (body, {})
  with pytest.raises(hub.ChecksumError, match=f'md5 {hashlib.md5(body).hexdigest()}, not the published '
                     'cbe5617147190e668d6c5d5026f83318'):
    hub.download(real)
  server.routes['/vgg16/short.h5'] = (body, {'Content-Length': len(body) + 100})  # the connection drops
  short = hub.Published('keras', 'vgg16', 'vgg16', 'vgg16/short.h5', 'md5:00')
  with pytest.raises(hub.DownloadError, match='cannot download'):
    hub.download(short)
  assert sorted(p.name for p in (env / 'downloads' / 'keras').iterdir()) == ['tiny.h5']


def test_timm_checked_against_the_hubs_sha256(server, tiny, env):
  """timm's names, the Hub's URL scheme: /resolve/ redirects to the file with its sha256 in X-Linked-Etag."""
  net, _, _ = tiny
  from safetensors.torch import save
  data = save({k: v.contiguous() for k, v in net.state_dict().items()})
  sha = hashlib.sha256(data).hexdigest()
  entry = hub.lookup('timm', 'vgg11')
  assert entry.name == 'vgg11.tv_in1k' and entry.path == 'vgg11.tv_in1k/resolve/main/model.safetensors'
  server.routes[f'/{entry.path}'] = ('redirect', f'/blobs/{sha}', {'X-Linked-Etag': f'"{sha}"'})
  server.routes[f'/blobs/{sha}'] = (data, {})
  assert hub.download(entry).read_bytes() == data
  other = hub.lookup('timm', 'vgg13_bn.tv_in1k')
  server.routes[f'/{other.path}'] = ('redirect', f'/blobs/{sha}', {'X-Linked-Etag': f'"{"0" * 64}"'})
  with pytest.raises(hub.ChecksumError, match=f'vgg13_bn.tv_in1k.safetensors from .* sha256 {sha}'):
    hub.download(other)


def test_unknown_names_list_the_allowed_ones():
  with pytest.raises(ValueError, match=r"^no published torchvision weights called 'vgg16_c'; valid: vgg11, "
                     r"vgg11_bn, vgg13, vgg13_bn, vgg16, vgg16_bn, vgg19, vgg19_bn$"):
    hub.lookup('torchvision', 'vgg16_c')
  with pytest.raises(ValueError, match="^unknown source 'caffe'; valid: torchvision, keras, timm$"):
    hub.names('caffe')
  with pytest.raises(ValueError, match=r"hub.get_model\('vgg16', weights='torchvision'\)"):
    models.get_model('vgg16', weights='torchvision')
