"""vggjax.export: StableHLO and ONNX artefacts of tiny nets (configs/tiny.py: a classifier, a batch-norm
classifier fed BGR with a std, a per-class box net) give predict's answers: the fixed entry at two batch
sizes, the dense entry at two image sizes; the StableHLO file runs in a process that imports no vggjax; the
ONNX file passes onnx.checker and runs in ONNX Runtime (also through predict --backend=onnxruntime's
function); checkpoints that cannot be exported fail in one line."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import reference_module, subprocess_env

from vggjax import checkpoints, cli, export, models, predict
from vggjax.configs import tiny
from vggjax.evaluation import inference

# One export per net and format: compile-heavy, so not in the quick loop.
pytestmark = pytest.mark.slow

RTOL = 1e-4  # float32: max |artefact - reference| <= RTOL * max |reference|
BATCHES = (1, 3)
DENSE_SIZES = ((45, 70), (64, 40))  # (height, width), both above the 32 training size
# Each artefact at both batch sizes and both dense sizes for net A; the others at one of each (compiles).
FULL = 'A'
# The batch-norm BGR net in ONNX only: the converter's own BatchNormalization and layout; StableHLO is the
# XLA program that jax runs, which the other two nets check.
FORMATS = {'A': export.FORMATS, 'B_bn_bgr': ('onnx',), 'A_pcr': export.FORMATS}


def tiny_meta(net: str, *, head: str = 'classify', bgr: bool = False, bn: bool = False) -> dict:
  config = tiny.get_config(f'{net},256')
  config.model.num_classes = 10
  config.model.head = head
  if bn:
    config.model.name += '_bn'
  if bgr:
    config.data.color_order, config.data.std_rgb = 'BGR', (58.0, 57.0, 57.5)
    config.data.mean_rgb = (123.0, 117.0, 104.0)
  config.labels = [f'digit {i}' for i in range(10)]
  return checkpoints.meta_from_config(config.to_dict())


def random_variables(model, seed: int, input_scale: float) -> dict:
  """He-scaled random weights (numpy, no compile), conv1_1 divided by the inputs' scale; positive
  batch-norm variances: logits of order 1 to 10, so the comparisons below see the whole network."""
  rng = np.random.RandomState(seed)

  def draw(path, s):
    if 'var' in jax.tree_util.keystr(path):
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    if len(s.shape) == 4:
      first = 'conv1_1' in jax.tree_util.keystr(path)
      return (rng.randn(*s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])) / (input_scale if first else 1)
              ).astype(np.float32)
    return (rng.randn(*s.shape) * 0.1).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, models.variable_shapes(model))


CONFIGS = {'A': {'net': 'A'}, 'B_bn_bgr': {'net': 'B', 'bgr': True, 'bn': True},
           'A_pcr': {'net': 'A', 'head': 'pcr'}}


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  """{name: (weights directory, variables, meta)} of the CONFIGS."""
  out = {}
  for i, (name, kw) in enumerate(CONFIGS.items()):
    meta = tiny_meta(**kw)
    variables = random_variables(checkpoints.model_from_meta(meta), seed=i, input_scale=2 if kw.get('bgr') else 100)
    directory = checkpoints.save_weights(tmp_path_factory.mktemp(f'w_{name}'), variables, meta)
    out[name] = (str(directory), variables, meta)
  return out


@pytest.fixture(scope='module')
def images():
  rng = np.random.RandomState(7)
  return {'fixed': rng.randint(0, 256, (max(BATCHES), 32, 32, 3)).astype(np.uint8),
          'dense': [rng.randint(0, 256, (2, h, w, 3)).astype(np.uint8) for h, w in DENSE_SIZES]}


@pytest.fixture(scope='module')
def exported(weights, tmp_path_factory):
  """{(config, format): files of export.write}: both formats of every config, written once."""
  onnx_ok = True
  try:
    reference_module('jax2onnx'), reference_module('onnxruntime')
  except pytest.skip.Exception:
    onnx_ok = False
  out = {}
  for name, (directory, _, meta) in weights.items():
    servable = export.load(directory)
    for fmt in FORMATS[name] if onnx_ok else set(FORMATS[name]) - {'onnx'}:
      target = tmp_path_factory.mktemp(f'x_{name}') / f'model.{fmt}'
      out[name, fmt] = export.write(servable, fmt, target, scale=predict.default_scale(meta))
  return out


def reference(weights, name, batch, entry):
  """The network's outputs as vggjax computes them (inference.logits: what predict's posterior applies)."""
  _, variables, meta = weights[name]
  model = checkpoints.model_from_meta(meta, dropout_rate=0.0)
  method = 'score_map' if entry == 'dense' and meta['model']['head'] != 'classify' else '__call__'
  fn = jax.jit(lambda v, x: inference.logits(model, v, x, checkpoints.normalization_from_meta(meta), method))
  return np.asarray(fn(variables, batch))


@pytest.fixture(scope='module')
def references(weights, images):
  """{name: {'fixed': outputs, 'dense': [outputs per size], 'single'/'dense_posteriors': predict's}}: what
  vggjax computes, once per config (both formats are compared with it)."""
  out = {}
  for name in weights:
    dense = images['dense'] if name == FULL else images['dense'][:1]
    ref = {'fixed': reference(weights, name, images['fixed'], 'fixed'),
           'dense': [reference(weights, name, b, 'dense') for b in dense]}
    if name == FULL:  # predict itself (the others: the network predict runs, inference.logits)
      ref['single'] = predict_posteriors(weights, name, images['fixed'], 'single')
      ref['dense_posteriors'] = [predict_posteriors(weights, name, b, 'dense') for b in dense]
    out[name] = ref
  return out


def assert_close(got, want, what):
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f'{what}: max abs diff {diff:.2e} (max |value| {np.max(np.abs(want)):.2e})')
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert diff <= RTOL * max(1.0, float(np.max(np.abs(want)))), (what, diff)


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def run_artefact(files, fmt, entry, batch):
  if fmt == 'stablehlo':
    return np.asarray(export.load_stablehlo(files[entry])(batch))
  session = export.onnx_session(files[entry])
  return session.run(None, {export.INPUT_NAME: batch})[0]


def predict_posteriors(weights, name, batch, protocol):
  _, variables, meta = weights[name]
  q = min(batch.shape[1:3])
  return predict.predict(variables, meta, list(batch), protocol=protocol, scales=[q], batch_size=len(batch))


@pytest.mark.parametrize('name, fmt', [(n, f) for n in CONFIGS for f in FORMATS[n]])
def test_artefact_equals_predict(exported, references, weights, images, name, fmt):
  """Each entry's outputs equal vggjax's network on the same uint8 images; a classifier's softmax equals
  predict's posteriors (single crop: the fixed entry; dense: the dense entry averaged with the flip)."""
  if (name, fmt) not in exported:
    reference_module('jax2onnx')
  files = exported[name, fmt]
  ref = references[name]
  classify = 'single' in ref
  for b in BATCHES if name == FULL else BATCHES[-1:]:
    got = run_artefact(files, fmt, 'fixed', images['fixed'][:b])
    assert_close(got, ref['fixed'][:b], f'{name} {fmt} fixed batch {b}')
    if classify:
      assert_close(softmax(got), ref['single'][:b], f'{name} {fmt} fixed batch {b} posteriors')
  for i, batch in enumerate(images['dense'][:len(ref['dense'])]):
    got = run_artefact(files, fmt, 'dense', batch)
    assert_close(got, ref['dense'][i], f'{name} {fmt} dense {batch.shape[1:3]}')
    if classify:
      flipped = run_artefact(files, fmt, 'dense', np.ascontiguousarray(batch[:, :, ::-1]))
      assert_close((softmax(got) + softmax(flipped)) / 2, ref['dense_posteriors'][i],
                   f'{name} {fmt} dense {batch.shape[1:3]} posteriors')


def test_side_file(exported, weights):
  """The side file: labels, input contract, normalisation, sha256 of the source weights, version."""
  import vggjax
  reference_module('jax2onnx')
  directory, variables, meta = weights['B_bn_bgr']
  side = json.loads(exported['B_bn_bgr', 'onnx']['side'].read_text())
  assert side['vggjax_version'] == vggjax.__version__
  assert side['labels'] == meta['labels']
  assert side['weights']['sha256'] == export.weights_sha256(checkpoints.load_weights(directory)[0])
  assert side['weights']['sha256'] == export.weights_sha256(variables)
  assert side['normalization_baked_in']['color_order'] == 'BGR'
  assert side['entries']['fixed']['input'] == {'name': 'images', 'dtype': 'uint8', 'layout': 'NHWC',
                                               'channels': 'RGB', 'range': [0, 255], 'shape': ['batch', 32, 32, 3]}
  assert side['entries']['dense']['input']['shape'] == ['batch', 'height', 'width', 3]
  assert side['entries']['fixed']['preprocess'].startswith('rescale the smaller side to 36')
  box = json.loads(exported['A_pcr', 'stablehlo']['side'].read_text())
  assert box['head'] == 'pcr' and box['entries']['dense']['output']['shape'] == ['batch', 'map_height',
                                                                                 'map_width', 40]


def test_stablehlo_runs_without_vggjax(exported, images, references, tmp_path):
  """A fresh process with jax alone (no vggjax module imported) deserializes and runs both entries."""
  files = exported['A', 'stablehlo']
  np.save(tmp_path / 'fixed.npy', images['fixed'])
  np.save(tmp_path / 'dense.npy', images['dense'][0])
  script = f"""
import sys, numpy as np, jax
from jax import export
for entry, path in (('fixed', {str(files['fixed'])!r}), ('dense', {str(files['dense'])!r})):
  fn = export.deserialize(bytearray(open(path, 'rb').read())).call
  np.save({str(tmp_path)!r} + f'/{{entry}}_out.npy', np.asarray(fn(np.load({str(tmp_path)!r} + f'/{{entry}}.npy'))))
assert not [m for m in sys.modules if m.startswith('vggjax')], 'vggjax imported'
"""
  env = subprocess_env(1)
  env['PYTHONPATH'] = ''  # the checkout's vggjax is not on the path (an installed one is never imported)
  subprocess.run([sys.executable, '-c', script], check=True, env=env, timeout=120, cwd=tmp_path)
  assert_close(np.load(tmp_path / 'fixed_out.npy'), references['A']['fixed'], 'fresh process fixed')
  assert_close(np.load(tmp_path / 'dense_out.npy'), references['A']['dense'][0], 'fresh process dense')


def test_onnx_checker_and_predict_backend(exported, references, images):
  """The ONNX files pass onnx.checker with symbolic input dimensions; predict's onnxruntime posterior
  function gives predict's posteriors."""
  onnx = reference_module('onnx')
  reference_module('onnxruntime')
  files = exported['A', 'onnx']
  for entry, dims in (('fixed', ['batch', 32, 32, 3]), ('dense', ['batch', 'height', 'width', 3])):
    model = onnx.load(str(files[entry]))
    onnx.checker.check_model(model, full_check=True)
    shape = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in shape] == dims
  fn, served_meta = export.onnx_posterior_fn(files['fixed'])
  got = predict.predict(None, served_meta, list(images['fixed']), scales=[32], batch_size=3, fn=fn)
  assert_close(got, references['A']['single'], 'predict --backend=onnxruntime')


def test_unexportable_checkpoints_fail_in_one_line(weights, tmp_path, capsys):
  """An unknown head or network in the weights' metadata: ExportError, a CommandError, so one line and exit
  status 2. (Stored weights of another dtype load as float32, as for every evaluation.)"""
  directory, variables, meta = weights['A']
  bad_head = json.loads(json.dumps(meta))
  bad_head['model']['head'] = 'segment'
  checkpoints.save_weights(tmp_path / 'head', variables, bad_head)
  bad_net = json.loads(json.dumps(meta))
  bad_net['model']['name'] = 'vgg12'
  (tmp_path / 'net').mkdir()
  (tmp_path / 'net' / checkpoints.META_FILE).write_text(json.dumps(bad_net))
  for path, words in ((tmp_path / 'head', "unknown head 'segment'"), (tmp_path / 'net', 'vgg12')):
    with pytest.raises(export.ExportError, match=words) as e:
      export.load(str(path))
    assert '\n' not in str(e.value)
    with pytest.raises(SystemExit) as exit_:
      cli.one_line_errors(export.load)(str(path))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and '\n' not in err, err
  with pytest.raises(export.ExportError, match='unknown format'):
    export.write(export.load(directory), 'tflite', tmp_path / 'm.tflite')
  with pytest.raises(export.ExportError, match='side file'):
    export.paths(tmp_path / 'm.json')
