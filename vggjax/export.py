"""Export for serving: a checkpoint as a StableHLO or ONNX artefact that needs no vggjax to run.

An export writes two entry points and a side file (``vggjax export``, ``write``):

* ``fixed`` (OUT): uint8 RGB images (batch, S, S, 3), S the training size, the batch symbolic -> the
  network's outputs (batch, K): class scores (logits) of a classifier, the box (4 or 4 x classes) of a box
  net (``localization_model``). The caller rescales and crops as the side file says (the single-crop
  protocol of ``vggjax predict``: smaller side to Q, central S x S crop);
* ``dense`` (OUT with ``.dense`` before its suffix): uint8 RGB images (batch, H, W, 3), H and W symbolic
  and at least S -> the fully convolutional network (the paper's dense evaluation, section 3.2): a
  classifier's class score map averaged over space (batch, classes); a box net's box map (batch, h, w, K);
* the side file (OUT with suffix ``.json``): the labels, each entry's input and output contract, the
  normalisation baked in, the model metadata, the sha256 of the source weights (``weights_sha256``) and the
  vggjax version.

The normalisation the weights were trained with (channel order, mean, std: the weights' metadata) runs
inside the artefact, through ``evaluation.inference.logits``, the function every evaluation in vggjax calls,
so an artefact's outputs are ``vggjax predict``'s (before its softmax). The weights are float32 constants of
the artefact (``checkpoints.load_weights`` restores them as float32, as for every evaluation).

StableHLO goes through ``jax.export`` (``load_stablehlo`` deserializes it: jax alone runs it); ONNX through
jax2onnx (the ``export`` extra), checked with ``onnx.checker``; ``onnx_session`` opens it in ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export

import vggjax
from vggjax import checkpoints, cli
from vggjax.evaluation import inference, loading

FORMATS = ('stablehlo', 'onnx')
ENTRIES = ('fixed', 'dense')
INPUT_NAME = 'images'
ONNX_OPSET = 23
# The converter's plugin trees that a VGG needs (lax and jnp primitives, Flax Linen layers): jax2onnx
# imports every tree on its first conversion, and its Equinox examples build models as they are imported
# (about 20 s of compiling on a CPU); these two take 2 s.
ONNX_PLUGIN_TREES = ('jax', 'flax')


class ExportError(cli.CommandError):
  """A checkpoint or request that cannot be exported: one line and exit status 2 from a command."""


@dataclasses.dataclass
class Servable:
  """What an export needs: the network, its float32 variables, its normalisation and provenance."""
  loaded: loading.EvalModel
  meta: dict
  head: str
  sha256: str

  @property
  def model(self):
    return self.loaded.model

  @property
  def outputs(self) -> int:
    return self.model.num_classes


def weights_sha256(variables: Any) -> str:
  """sha256 of a variables tree as loaded: each array's path, dtype, shape and bytes, in path order. The
  same weights give the same digest whatever file layout holds them (a run's step, a weights directory)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.ascontiguousarray(np.asarray(leaf))
    digest.update(f'{jax.tree_util.keystr(path)} {a.dtype} {a.shape}\n'.encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def load(checkpoint: str) -> Servable:
  """A servable network from anything ``vggjax predict`` accepts: a weights directory (``vggjax convert``),
  a training workdir (its latest checkpoint) or WORKDIR/checkpoints/<step>; a classifier or a box net."""
  meta = checkpoints.load_meta(checkpoint)
  head = (meta.get('model') or {}).get('head') or 'classify'
  try:
    size = checkpoints.model_from_meta(meta).image_size
    loaded = loading.load_model(checkpoint, scales=(size,))
  except ValueError as e:  # an unknown head, model name or option in the weights' metadata
    raise ExportError(f'{checkpoint} cannot be exported: {e}') from None
  return Servable(loaded=loaded, meta=meta, head=head, sha256=weights_sha256(loaded.variables))


# ------------------------------------------------------------------------------------------------ entries

def entry_fn(servable: Servable, entry: str) -> Callable[[jax.Array], jax.Array]:
  """The function an entry point serves: uint8 RGB images -> outputs (see the module docstring)."""
  check_entry(entry)
  box_map = entry == 'dense' and servable.head != 'classify'
  method = 'score_map' if box_map else '__call__'
  model, variables, norm = servable.model, servable.loaded.variables, servable.loaded.norm

  def serve(images):
    return inference.logits(model, variables, images, norm, method=method)
  return serve


def input_spec(servable: Servable, entry: str) -> jax.ShapeDtypeStruct:
  """The entry's input: (batch, S, S, 3) uint8, or (batch, height, width, 3) with height, width >= S."""
  size = servable.model.image_size
  if check_entry(entry) == 'fixed':
    batch, = jax_export.symbolic_shape('batch')
    return jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
  dims = jax_export.symbolic_shape('batch, height, width', constraints=(f'height >= {size}',
                                                                         f'width >= {size}'))
  return jax.ShapeDtypeStruct((*dims, 3), jnp.uint8)


def output_name(servable: Servable) -> str:
  return 'logits' if servable.head == 'classify' else 'boxes'


def check_entry(entry: str) -> str:
  if entry not in ENTRIES:
    raise ExportError(f'unknown entry {entry!r}; valid: {", ".join(ENTRIES)}')
  return entry


def check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ExportError(f'unknown format {fmt!r}; valid: {", ".join(FORMATS)}')
  return fmt


# ------------------------------------------------------------------------------------------------ formats

def stablehlo(servable: Servable, entry: str, platforms: Sequence[str] = ('cpu',)) -> bytes:
  """The entry as a serialized ``jax.export.Exported`` (StableHLO, lowered for `platforms`)."""
  fn = jax.jit(entry_fn(servable, entry))
  exported = jax_export.export(fn, platforms=tuple(platforms))(input_spec(servable, entry))
  return bytes(exported.serialize())


def load_stablehlo(path: str | pathlib.Path) -> Callable[[np.ndarray], jax.Array]:
  """The entry a StableHLO file holds, as a function of uint8 images (needs jax, no vggjax model code)."""
  return jax_export.deserialize(bytearray(pathlib.Path(path).read_bytes())).call


def _onnx_converter():
  import jax2onnx
  from jax2onnx.plugins import plugin_system
  if not plugin_system._already_imported_plugins:
    root = pathlib.Path(plugin_system.__file__).parent
    for tree in ONNX_PLUGIN_TREES:
      plugin_system._import_tree(root / tree, f'jax2onnx.plugins.{tree}')
    plugin_system._already_imported_plugins = True
  logging.getLogger('onnx_ir').setLevel(logging.ERROR)  # one warning per shape constant it folds
  return jax2onnx


def onnx_model(servable: Servable, entry: str):
  """The entry as an ONNX ModelProto (jax2onnx), checked with onnx.checker."""
  import onnx
  jax2onnx = _onnx_converter()
  # jax2onnx 0.17.1's gather lowering registers its constant folders on the first conversion's context
  # but marks them registered for the process: a second conversion of symbolic image sizes (the max
  # pool's slice) could not fold its indices. Each conversion registers them again.
  from jax2onnx.plugins.jax.lax import gather
  gather._CONST_HANDLERS_REGISTERED = False
  proto = jax2onnx.to_onnx(entry_fn(servable, entry), [input_spec(servable, entry)],
                           model_name=f'vggjax_{servable.meta["model"]["name"]}_{entry}', opset=ONNX_OPSET,
                           input_names=[INPUT_NAME], output_names=[output_name(servable)])
  # The converter records the NHWC shapes of values it computes in NCHW (its native Conv layout); ONNX
  # Runtime warns about each and infers them again. Only the graph's inputs and outputs keep shapes.
  del proto.graph.value_info[:]
  onnx.checker.check_model(proto)
  return proto


def onnx_session(path: str | pathlib.Path, threads: int = 0):
  """An ONNX Runtime CPU session of an exported ONNX file (all graph optimisations on)."""
  import onnxruntime as ort
  options = ort.SessionOptions()
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  if threads:
    options.intra_op_num_threads = threads
  return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


# ------------------------------------------------------------------------------------------------ files

def paths(out: str | pathlib.Path) -> dict[str, pathlib.Path]:
  """The files an export writes: {'fixed': OUT, 'dense': OUT.dense<suffix>, 'side': OUT<.json>}."""
  out = pathlib.Path(out)
  if out.suffix == '.json':
    raise ExportError(f'--out={out}: the side file takes the .json name; give the artefact\'s own '
                      f'(e.g. {out.with_suffix(".onnx").name})')
  return {'fixed': out, 'dense': out.with_name(f'{out.stem}.dense{out.suffix}'),
          'side': out.with_suffix('.json')}


def side_record(servable: Servable, fmt: str, files: dict, scale: int | None = None) -> dict:
  """The side file: what a server needs to feed the artefact and read its outputs."""
  size, k = servable.model.image_size, servable.outputs
  out = output_name(servable)
  box_map = servable.head != 'classify'
  dense_out = (['batch', 'map_height', 'map_width', k] if box_map else ['batch', k])
  image = {'name': INPUT_NAME, 'dtype': 'uint8', 'layout': 'NHWC', 'channels': 'RGB', 'range': [0, 255]}
  meta = servable.meta
  return {
      'format': fmt,
      'vggjax_version': vggjax.__version__,
      'head': servable.head,
      'labels': meta.get('labels'),
      'normalization_baked_in': servable.loaded.norm.to_dict(),
      'entries': {
          'fixed': {'file': files['fixed'].name, 'input': {**image, 'shape': ['batch', size, size, 3]},
                    'output': {'name': out, 'dtype': 'float32', 'shape': ['batch', k]},
                    'preprocess': (f'rescale the smaller side to {scale} and take the central {size}x{size} '
                                   f'crop' if scale else f'a {size}x{size} crop')},
          'dense': {'file': files['dense'].name,
                    'input': {**image, 'shape': ['batch', 'height', 'width', 3], 'min_size': size},
                    'output': {'name': out, 'dtype': 'float32', 'shape': dense_out,
                               'map': 'per cell' if box_map else 'averaged over the score map'}},
      },
      'model': dict(meta['model']),
      'scale': scale,
      'data': meta.get('data'),
      'weights': {'sha256': servable.sha256, 'digest': 'vggjax.export.weights_sha256',
                  'source': meta.get('source'), 'step': meta.get('step')},
  }


def write(servable: Servable, fmt: str, out: str | pathlib.Path, *, scale: int | None = None,
          platforms: Sequence[str] = ('cpu',)) -> dict[str, pathlib.Path]:
  """Writes both entry points and the side file; returns their paths (see ``paths``)."""
  check_format(fmt)
  files = paths(out)
  files['fixed'].parent.mkdir(parents=True, exist_ok=True)
  for entry in ENTRIES:
    if fmt == 'stablehlo':
      files[entry].write_bytes(stablehlo(servable, entry, platforms))
    else:
      import onnx
      onnx.save(onnx_model(servable, entry), str(files[entry]))
  side = side_record(servable, fmt, files, scale)
  if fmt == 'stablehlo':
    side['platforms'] = list(platforms)
  files['side'].write_text(json.dumps(side, indent=1))
  return files


def read_side(path: str | pathlib.Path) -> dict:
  """The side file of an artefact (give the artefact or the .json)."""
  path = pathlib.Path(path)
  side = path if path.suffix == '.json' else path.with_suffix('.json')
  if not side.exists():
    raise FileNotFoundError(f'{side} (the side file of an exported model) does not exist')
  return json.loads(side.read_text())


# ------------------------------------------------------------------------------------------------ serving

def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def onnx_posterior_fn(path: str | pathlib.Path, flip: bool = False) -> tuple[Callable, dict]:
  """(fn, meta) for ``vggjax predict --backend=onnxruntime``: fn(_, uint8 images) -> softmax posteriors of
  an exported classifier in ONNX Runtime, through the fixed entry, or the dense one averaged with the
  flipped images' if flip (the dense protocol); meta: the weights metadata the side file records."""
  side = read_side(path)
  if side['format'] != 'onnx' or side['head'] != 'classify':
    raise ExportError(f'{path} is a {side["format"]} {side["head"]} export; --backend=onnxruntime takes an '
                      f'ONNX classifier (vggjax export --format=onnx)')
  base = pathlib.Path(path).with_suffix('.json').parent
  session = onnx_session(base / side['entries']['dense' if flip else 'fixed']['file'])

  def posteriors(_, images):
    p = _softmax(session.run(None, {INPUT_NAME: np.asarray(images, np.uint8)})[0])
    if flip:
      p = (p + _softmax(session.run(None, {INPUT_NAME: np.ascontiguousarray(images[:, :, ::-1])})[0])) / 2
    return p
  meta = {'model': side['model'], 'labels': side['labels'], 'data': side.get('data') or {}}
  return posteriors, meta
