"""Published VGG weights by name: downloaded once into a cache, checked against the checksum their publisher
gives, converted to a vggjax weights directory, and reused.

    vggjax convert --from=torchvision --weights=vgg16            # torchvision's vgg16-397923af.pth
    vggjax convert --from=keras --weights=vgg19                  # keras.applications' VGG19 weights
    vggjax convert --from=timm --weights=vgg16_bn.tv_in1k        # timm's, from the Hugging Face Hub

    model, variables = hub.get_model('vgg16', weights='torchvision')
    variables, meta = hub.load('vgg16', 'torchvision')           # as checkpoints.load_weights gives them

The names (``names(source)``) and what each file is checked against:

* torchvision: vgg11, vgg13, vgg16, vgg19 and their _bn variants, BASE/vgg16-397923af.pth; the file name
  carries the first hex digits of the file's sha256 (torch.hub checks the same prefix);
* keras: vgg16 and vgg19, BASE/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5; the md5 that
  keras.applications gives its get_file;
* timm: vgg11.tv_in1k ... vgg19_bn.tv_in1k (timm's names of torchvision's weights; vgg16 means
  vgg16.tv_in1k), BASE/vgg16.tv_in1k/resolve/main/model.safetensors; the sha256 the Hub publishes for the
  file (its LFS object id, sent as the X-Linked-Etag header; a mirror that sends none gets a warning and the
  file is not verified).

The cache is $VGGJAX_CACHE, else $XDG_CACHE_HOME/vggjax, else ~/.cache/vggjax:

    CACHE/downloads/SOURCE/FILE    the verified file (written as FILE.part-* and renamed once it checks out)
    CACHE/weights/SOURCE/NAME/     its weights directory (variables/, vggjax.json), converted once

A mirror or a local server: $VGGJAX_WEIGHTS_URL (or ``base_url=``) replaces the source's base URL
(BASE_URLS); the file's path under it stays the same. A download that does not match its checksum is
removed and refused (ChecksumError), naming the file and both checksums.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import logging
import math
import os
import pathlib
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from typing import Any

from vggjax import __version__, checkpoints, labels as labels_lib, models, runlog, weights
from vggjax.preprocessing import Normalization

log = logging.getLogger('vggjax')

SOURCES = ('torchvision', 'keras', 'timm')
BASE_URLS = {
    'torchvision': 'https://download.pytorch.org/models',
    'keras': 'https://storage.googleapis.com/tensorflow/keras-applications',
    'timm': 'https://huggingface.co/timm',
}
CACHE_ENV, URL_ENV = 'VGGJAX_CACHE', 'VGGJAX_WEIGHTS_URL'
_MIB = 1 << 20


class DownloadError(OSError):
  """A published file could not be downloaded (HTTP error, no connection, a transfer cut short)."""


class ChecksumError(DownloadError):
  """A downloaded file does not match its published checksum (it is removed)."""


@dataclasses.dataclass(frozen=True)
class Published:
  """One published weight file: where it lies under its source's base URL and what it must hash to."""
  source: str
  name: str  # the name a user gives (--weights)
  model: str  # the vggjax model it holds
  path: str  # under the source's base URL
  checksum: str  # 'sha256:HEX' or 'md5:HEX' (a sha256 may be a prefix), or 'sha256:' (the server's header)
  image_size: int = 224

  @property
  def file(self) -> str:
    """The file's name in the cache."""
    return f'{self.name}.safetensors' if self.source == 'timm' else self.path.rsplit('/', 1)[-1]


def torchvision_entry(file: str, image_size: int = 224) -> Published:
  """torchvision's entry for a file named NAME-SHA256PREFIX.pth (vgg16-397923af.pth)."""
  m = re.fullmatch(r'(vgg\d+(?:_bn)?)-([0-9a-f]{8,64})\.pth', file)
  if not m:
    raise ValueError(f'{file!r} is not named as torchvision names its files (vgg16-397923af.pth)')
  return Published('torchvision', m.group(1), m.group(1), file, f'sha256:{m.group(2)}', image_size)


def _keras(name: str, md5: str) -> Published:
  return Published('keras', name, name, f'{name}/{name}_weights_tf_dim_ordering_tf_kernels.h5', f'md5:{md5}')


def _timm(model: str) -> Published:
  return Published('timm', f'{model}.tv_in1k', model, f'{model}.tv_in1k/resolve/main/model.safetensors',
                   'sha256:')


# torchvision.models.vgg's URLs; keras.applications.vgg16/vgg19's file_hash; timm's tv_in1k names.
_TORCHVISION_FILES = ('vgg11-8a719046.pth', 'vgg11_bn-6002323d.pth', 'vgg13-19584684.pth',
                      'vgg13_bn-abd245e5.pth', 'vgg16-397923af.pth', 'vgg16_bn-6c64b313.pth',
                      'vgg19-dcbb9e9d.pth', 'vgg19_bn-c79401a0.pth')
PUBLISHED: dict[str, dict[str, Published]] = {
    'torchvision': {e.name: e for e in map(torchvision_entry, _TORCHVISION_FILES)},
    'keras': {'vgg16': _keras('vgg16', '64373286793e3c8b2b4e3219cbf3544b'),
              'vgg19': _keras('vgg19', 'cbe5617147190e668d6c5d5026f83318')},
    'timm': {e.name: e for e in map(_timm, ('vgg11', 'vgg11_bn', 'vgg13', 'vgg13_bn', 'vgg16', 'vgg16_bn',
                                            'vgg19', 'vgg19_bn'))},
}


def names(source: str) -> list[str]:
  """The published names of a source."""
  _check_source(source)
  return list(PUBLISHED[source])


def _check_source(source: str) -> None:
  if source not in SOURCES:
    raise ValueError(f'unknown source {source!r}; valid: {", ".join(SOURCES)}')


def lookup(source: str, name: str) -> Published:
  """The entry of a published name (timm's may omit '.tv_in1k'); an unknown one is a one-line ValueError
  listing the names there are."""
  _check_source(source)
  table = PUBLISHED[source]
  key = name.strip().lower()
  entry = table.get(key) or (table.get(f'{key}.tv_in1k') if source == 'timm' else None)
  if entry is None:
    raise ValueError(f'no published {source} weights called {name!r}; valid: {", ".join(table)}')
  return entry


def cache_dir() -> pathlib.Path:
  """$VGGJAX_CACHE, else $XDG_CACHE_HOME/vggjax, else ~/.cache/vggjax."""
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
  return pathlib.Path(os.environ.get('XDG_CACHE_HOME') or '~/.cache').expanduser() / 'vggjax'


def url(entry: Published, base_url: str | None = None) -> str:
  """Where the file is downloaded from: base_url, else $VGGJAX_WEIGHTS_URL, else the source's, + its path."""
  base = base_url or os.environ.get(URL_ENV) or BASE_URLS[entry.source]
  return f'{base.rstrip("/")}/{entry.path}'


class _RecordRedirects(urllib.request.HTTPRedirectHandler):
  """Keeps the headers of each redirect (the Hub sends X-Linked-Etag with the redirect to its CDN)."""

  def __init__(self):
    self.headers: list[Any] = []

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    self.headers.append(headers)
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def _header_sha256(all_headers) -> str:
  for headers in all_headers:
    for key in ('X-Linked-Etag', 'ETag'):
      value = (headers.get(key) or '').strip().strip('"').removeprefix('W/').strip('"')
      if re.fullmatch(r'[0-9a-f]{64}', value):
        return value
  return ''


def _transfer(address: str, out, entry: Published, progress: bool) -> tuple[str, str]:
  """Writes the file at `address` to `out`; returns (its hex digest, the checksum to match)."""
  algorithm, want = entry.checksum.split(':', 1)
  digest = hashlib.new(algorithm)
  redirects = _RecordRedirects()
  request = urllib.request.Request(address, headers={'User-Agent': f'vggjax/{__version__}'})
  try:
    with urllib.request.build_opener(redirects).open(request, timeout=60) as response:
      size = int(response.headers.get('Content-Length') or 0)
      want = want or _header_sha256([*redirects.headers, response.headers])
      bar = runlog.progress_bar(math.ceil(size / _MIB) if size else None, f'downloading {entry.file}',
                                unit='MiB', enabled=progress)
      received = 0
      while chunk := response.read(_MIB):
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        bar.update(math.ceil(received / _MIB) - bar.n)
      bar.close()
  except urllib.error.HTTPError as e:
    raise DownloadError(f'cannot download {address}: HTTP {e.code} {e.reason}') from None
  except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
    reason = getattr(e, 'reason', None) or e
    raise DownloadError(f'cannot download {address}: {type(e).__name__}: {reason}') from None
  if size and received != size:
    raise DownloadError(f'cannot download {address}: {received} of {size} bytes received; try again')
  return digest.hexdigest(), want


def download(entry: Published, *, base_url: str | None = None, cache: str | os.PathLike | None = None,
             progress: bool = True) -> pathlib.Path:
  """The published file in the cache: downloaded and verified on the first call, reused after. A file that
  does not match its checksum is removed and refused (ChecksumError)."""
  dest = pathlib.Path(cache or cache_dir()) / 'downloads' / entry.source / entry.file
  if dest.is_file():
    return dest
  dest.parent.mkdir(parents=True, exist_ok=True)
  address = url(entry, base_url)
  fd, part = tempfile.mkstemp(prefix=f'{dest.name}.part-', dir=dest.parent)
  try:
    with os.fdopen(fd, 'wb') as out:
      got, want = _transfer(address, out, entry, progress)
    algorithm = entry.checksum.split(':', 1)[0]
    if not want:
      log.warning('%s: no published %s came with the file: not verified (%s %s)', address, algorithm,
                  algorithm, got)
    elif not got.startswith(want.lower()):
      raise ChecksumError(f'{entry.file} from {address} has {algorithm} {got}, not the published {want}: '
                          f'the download was removed (a broken transfer or a changed file; try again)')
    os.replace(part, dest)
  finally:
    if os.path.exists(part):
      os.unlink(part)
  return dest


def weights_dir(source: str, name: str, *, out: str | os.PathLike | None = None,
                base_url: str | None = None, cache: str | os.PathLike | None = None,
                progress: bool = True) -> pathlib.Path:
  """The weights directory of a published name: `out` (converted from the cached download), or by default
  CACHE/weights/SOURCE/NAME, converted on the first call and reused after."""
  entry = lookup(source, name)
  cache = pathlib.Path(cache or cache_dir())
  if out is not None:
    src = download(entry, base_url=base_url, cache=cache, progress=progress)
    convert_file(entry.source, src, out, entry.model, image_size=entry.image_size, url=url(entry, base_url))
    return pathlib.Path(out)
  target = cache / 'weights' / entry.source / entry.name
  if (target / checkpoints.META_FILE).is_file():
    return target
  src = download(entry, base_url=base_url, cache=cache, progress=progress)
  target.parent.mkdir(parents=True, exist_ok=True)
  partial = pathlib.Path(tempfile.mkdtemp(prefix=f'.{entry.name}.part-', dir=target.parent))
  try:
    convert_file(entry.source, src, partial, entry.model, image_size=entry.image_size,
                 url=url(entry, base_url))
    if target.exists():  # an incomplete directory of an interrupted conversion
      shutil.rmtree(target)
    os.rename(partial, target)
  finally:
    if partial.exists():
      shutil.rmtree(partial)
  return target


def load(name: str, source: str = 'torchvision', **kwargs) -> tuple[dict, dict]:
  """(variables, meta) of published weights, as checkpoints.load_weights returns a weights directory's
  (kwargs: weights_dir's)."""
  return checkpoints.load_weights(weights_dir(source, name, **kwargs))


def get_model(name: str, weights: str = 'torchvision', **kwargs) -> tuple[models.VGG, dict]:
  """(model, variables) of published weights: ``model.apply(variables, images)`` with the images
  normalised as ``load(...)[1]['normalization']`` says (kwargs: weights_dir's)."""
  variables, meta = load(name, weights, **kwargs)
  return checkpoints.model_from_meta(meta), variables


# ---------------------------------------------------------------------------------------------------------
# A weight file to a weights directory (`vggjax convert --src=FILE`, and each download above).


def sha256(path: str | os.PathLike) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      h.update(block)
  return h.hexdigest()


def _labels_for(labels: str | None, num_classes: int) -> Any:
  """What to record as the class names: ImageNet's for 1000-class weights ('auto'), a file's, or none."""
  if labels in (None, '', 'none'):
    return None
  if labels == 'auto':
    labels = labels_lib.IMAGENET if num_classes == labels_lib.NUM_IMAGENET_CLASSES else 'none'
    if labels == 'none':
      return None
  if labels == labels_lib.IMAGENET:
    try:
      names_ = list(labels_lib.imagenet_names())
    except (OSError, ValueError) as e:
      log.warning('ImageNet class names unavailable (%s); recording %r', e, labels_lib.IMAGENET)
      return labels_lib.IMAGENET
  else:
    names_ = labels_lib.read_labels_file(labels)
  if len(names_) != num_classes:
    raise ValueError(f'{len(names_)} class names for {num_classes} classes')
  return names_


def convert_file(source: str, src: str | os.PathLike, out: str | os.PathLike, model: str | None = None, *,
                 num_classes: int | None = None, image_size: int = 224, labels: str | None = 'auto',
                 url: str | None = None) -> dict:
  """Converts the weight file ``src`` of ``source`` ('torchvision', 'keras' or 'timm') to the weights
  directory ``out`` and returns its metadata.

  Args:
    model: the vggjax model name (vgg16, vgg16_bn, ...); inferred from the file when None.
    num_classes: checked against the file when given.
    image_size: the training resolution the weights were made for (224 for every published VGG).
    labels: class names to record: 'auto' (ImageNet's for 1000 classes), 'imagenet2012', a text file
      with one name per line, or None.
    url: where the file was downloaded from (recorded as source_url).
  """
  _check_source(source)
  src = pathlib.Path(src)
  if not src.is_file():
    raise FileNotFoundError(f'no weight file {src}')
  variables, name = weights.load_file(source, src, model, num_classes=num_classes, image_size=image_size)
  params = variables['params']
  fc8, fc6 = params['fc8']['kernel'], params['fc6']['kernel']
  meta = {
      'model': {'name': name, 'num_classes': int(fc8.shape[-1]), 'image_size': image_size,
                'width': params['conv1_1']['kernel'].shape[-1] / 64, 'fc_features': int(fc6.shape[-1])},
      'normalization': Normalization.from_dict(weights.preprocessing_for(source)).to_dict(),
      'source': source,
      'source_file': src.name,
      'source_sha256': sha256(src),
      'labels': _labels_for(labels, int(fc8.shape[-1])),
  }
  if url:
    meta['source_url'] = url
  checkpoints.save_weights(out, variables, meta)
  return checkpoints.load_meta(out)  # as written (JSON: lists, not tuples)
