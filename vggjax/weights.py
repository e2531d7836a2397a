"""Weights from other frameworks, converted to vggjax variables by layer name.

torchvision (and timm, which republishes the same weights) store a VGG as ``features.N`` (convs and batch
norms in order), then three FC layers; the FC layers are ``classifier.0/3/6`` (torchvision, Linear) or
``pre_logits.fc1``/``pre_logits.fc2`` (timm, Conv2d) and ``head.fc`` (timm, Linear). vggjax's fc6 is a
convolution over the last feature map, so torchvision's fc6 matrix (4096, 512*7*7, flattened as C, H, W) is
reshaped to (7, 7, 512, 4096).

Keras applications (VGG16, VGG19) name their layers block1_conv1 ... block5_conv4, fc1, fc2, predictions;
fc1's (25088, 4096) kernel takes the last feature map flattened as (H, W, C).

The converters take numpy arrays; the readers (``read_torch_file``, ``read_keras_file``, ``load_file``)
never run pickled code: torch.load(weights_only=True), safetensors, h5py.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from vggjax import models

# Preprocessing recorded with imported weights: what the source framework fed its network.
TORCHVISION_PREPROCESSING = {
    'color_order': 'RGB', 'scale': 1.0 / 255.0,
    'mean': [0.485, 0.456, 0.406], 'std': [0.229, 0.224, 0.225],
}
CAFFE_PREPROCESSING = {  # Keras applications and the original Caffe release: BGR, 0-255, mean subtracted
    'color_order': 'BGR', 'scale': 1.0,
    'mean': [103.939, 116.779, 123.68], 'std': [1.0, 1.0, 1.0],
}

_TORCH_FC = {
    'classifier.0': 'fc6', 'classifier.3': 'fc7', 'classifier.6': 'fc8',  # torchvision
    'pre_logits.fc1': 'fc6', 'pre_logits.fc2': 'fc7', 'head.fc': 'fc8',  # timm
}


class ConversionError(ValueError):
  """A state dict does not fit the model it was meant for."""


def _np(x: Any) -> np.ndarray:
  if hasattr(x, 'detach'):  # a torch tensor
    x = x.detach().cpu().float().numpy()
  return np.asarray(x, dtype=np.float32)


def torch_to_variables(state_dict: Mapping[str, Any], name: str, *, num_classes: int | None = None,
                       image_size: int = 224) -> dict:
  """Converts a torchvision or timm VGG state dict to vggjax variables {'params', ['batch_stats']}.

  Args:
    state_dict: tensor or array by key, e.g. ``torchvision.models.vgg16().state_dict()``.
    name: the vggjax model name (``vgg16``, ``vgg16_bn``, ...).
    num_classes: checked against fc8 when given.
    image_size: the training size the weights were made for (fc6 spans image_size // 32).

  Raises:
    ConversionError: naming every tensor that is missing, unexpected or of the wrong shape.
  """
  name = models.canonical_name(name)
  arch = models.ARCHS[name]
  sd = {k: _np(v) for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  convs = models.conv_layer_names(name)
  problems: list[str] = []
  params: dict = {}
  stats: dict = {}

  # features.N: conv layers (4-D weights) and, for _bn, the batch norm that follows each.
  feature_ids = sorted({int(m.group(1)) for k in sd for m in [re.match(r'features\.(\d+)\.', k)] if m})
  conv_ids = [i for i in feature_ids if sd.get(f'features.{i}.weight', np.zeros(0)).ndim == 4]
  bn_ids = [i for i in feature_ids if f'features.{i}.running_mean' in sd]
  if len(conv_ids) != len(convs):
    problems.append(f'{len(conv_ids)} conv layers in the state dict, {len(convs)} in {name}')
  if arch.batch_norm and len(bn_ids) != len(convs):
    problems.append(f'{len(bn_ids)} batch-norm layers in the state dict, {len(convs)} in {name}')
  if not arch.batch_norm and bn_ids:
    problems.append(f'batch-norm layers (features.{bn_ids[0]}, ...) in the state dict but {name} has none; '
                    f'use the _bn model')
  used = set()
  for layer, i in zip(convs, conv_ids):
    w, b = sd[f'features.{i}.weight'], sd.get(f'features.{i}.bias')
    used |= {f'features.{i}.weight', f'features.{i}.bias'}
    params[layer] = {'kernel': w.transpose(2, 3, 1, 0),
                     'bias': b if b is not None else np.zeros(w.shape[0], np.float32)}
  if arch.batch_norm:
    for layer, i in zip(convs, bn_ids):
      bn = layer.replace('conv', 'bn')
      p = f'features.{i}.'
      used |= {p + s for s in ('weight', 'bias', 'running_mean', 'running_var')}
      params[bn] = {'scale': sd[p + 'weight'], 'bias': sd[p + 'bias']}
      stats[bn] = {'mean': sd[p + 'running_mean'], 'var': sd[p + 'running_var']}

  # FC layers: Linear (out, in) or Conv2d (out, in, kh, kw); fc6's input is flattened as (C, H, W).
  k6 = max(1, image_size // 32)
  for prefix, layer in _TORCH_FC.items():
    if prefix + '.weight' not in sd:
      continue
    w, b = sd[prefix + '.weight'], sd[prefix + '.bias']
    used |= {prefix + '.weight', prefix + '.bias'}
    if w.ndim == 2:
      k = k6 if layer == 'fc6' else 1
      if w.shape[1] % (k * k):
        problems.append(f'{prefix}.weight {w.shape}: input size not divisible by {k}x{k}')
        continue
      w = w.reshape(w.shape[0], w.shape[1] // (k * k), k, k)
    params[layer] = {'kernel': w.transpose(2, 3, 1, 0), 'bias': b}
  for layer in ('fc6', 'fc7', 'fc8'):
    if layer not in params:
      problems.append(f'missing {layer} (classifier.0/3/6 or pre_logits.fc1/fc2, head.fc)')
  unexpected = sorted(set(sd) - used)
  if unexpected:
    problems.append(f'unexpected tensors: {", ".join(unexpected[:10])}' + (' ...' if len(unexpected) > 10
                                                                           else ''))
  if not problems:
    fc8 = params['fc8']['kernel']
    options = dict(num_classes=num_classes or fc8.shape[-1], image_size=image_size,
                   fc_features=params['fc6']['kernel'].shape[-1],
                   width=params[convs[0]]['kernel'].shape[-1] / 64)  # a narrow net's: conv1_1's channels / 64
    problems += check_shapes(name, {'params': params, 'batch_stats': stats}, **options)
  if problems:
    raise ConversionError(f'state dict does not fit {name}:\n  ' + '\n  '.join(problems))
  variables = {'params': params}
  if stats:
    variables['batch_stats'] = stats
  return variables


def check_shapes(name: str, variables: Mapping, **options) -> list[str]:
  """Every layer whose shape differs from ``get_model(name, **options)``'s, as 'layer/param: got vs want'."""
  want = models.variable_shapes(models.get_model(name, **options))
  problems = []
  for col in ('params', 'batch_stats'):
    w_col, g_col = want.get(col, {}), variables.get(col, {})
    for layer in sorted(set(w_col) | set(g_col)):
      if layer not in g_col:
        problems.append(f'{col}/{layer}: missing')
        continue
      if layer not in w_col:
        problems.append(f'{col}/{layer}: not in {name}')
        continue
      for p, spec in w_col[layer].items():
        got = g_col[layer].get(p)
        if got is None:
          problems.append(f'{col}/{layer}/{p}: missing')
        elif tuple(got.shape) != tuple(spec.shape):
          problems.append(f'{col}/{layer}/{p}: got shape {tuple(got.shape)}, {name} needs {tuple(spec.shape)}')
  return problems


def variables_to_torch(variables: Mapping, name: str) -> dict[str, np.ndarray]:
  """The inverse of torch_to_variables, in torchvision's naming (for exporting and for tests)."""
  name = models.canonical_name(name)
  arch = models.ARCHS[name]
  params, stats = variables['params'], variables.get('batch_stats', {})
  out: dict[str, np.ndarray] = {}
  i = 0
  for stage_index, stage in enumerate(arch.stages):
    for j in range(len(stage)):
      layer = f'conv{stage_index + 1}_{j + 1}'
      out[f'features.{i}.weight'] = np.asarray(params[layer]['kernel']).transpose(3, 2, 0, 1)
      out[f'features.{i}.bias'] = np.asarray(params[layer]['bias'])
      i += 1
      if arch.batch_norm:
        bn = layer.replace('conv', 'bn')
        out[f'features.{i}.weight'] = np.asarray(params[bn]['scale'])
        out[f'features.{i}.bias'] = np.asarray(params[bn]['bias'])
        out[f'features.{i}.running_mean'] = np.asarray(stats[bn]['mean'])
        out[f'features.{i}.running_var'] = np.asarray(stats[bn]['var'])
        i += 1
      i += 1  # ReLU
    i += 1  # max pool
  for prefix, layer in list(_TORCH_FC.items())[:3]:
    k = np.asarray(params[layer]['kernel'])
    out[prefix + '.weight'] = k.transpose(3, 2, 0, 1).reshape(k.shape[3], -1)
    out[prefix + '.bias'] = np.asarray(params[layer]['bias'])
  return out


# ---------------------------------------------------------------------------------------------------------
# Keras applications (VGG16, VGG19): block{b}_conv{i}, then flatten, fc1, fc2, predictions (Dense layers).
# Kernels are stored (kh, kw, in, out) for convolutions and (in, out) for Dense layers; fc1's input is the
# flattened last feature map, over (H, W, C): Keras' Flatten moves channels last before flattening in a
# channels_first model too. Only a channels_first model whose Flatten says channels_last flattens (C, H, W).

KERAS_FC = {'fc1': 'fc6', 'fc2': 'fc7', 'predictions': 'fc8'}


def keras_layer_name(layer: str) -> str:
  """The Keras applications name of a vggjax layer: conv3_2 -> block3_conv2, fc6 -> fc1, ..."""
  m = re.fullmatch(r'conv(\d+)_(\d+)', layer)
  if m:
    return f'block{m.group(1)}_conv{m.group(2)}'
  for keras, ours in KERAS_FC.items():
    if ours == layer:
      return keras
  raise ValueError(f'{layer!r} has no Keras applications name')


def _kernel_and_bias(arrays: list[np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
  kernels = [a for a in arrays if a.ndim >= 2]
  biases = [a for a in arrays if a.ndim == 1]
  return (kernels[0] if len(kernels) == 1 else None), (biases[0] if len(biases) == 1 else None)


def keras_to_variables(layers: Mapping[str, list], name: str, *, num_classes: int | None = None,
                       image_size: int = 224, flatten_order: str = 'HWC', width: float = 1.0) -> dict:
  """Converts Keras applications VGG weights to vggjax variables {'params'}.

  Args:
    layers: Keras layer name -> its weight arrays (kernel and bias), e.g. from ``read_keras_file``.
    name: the vggjax model name (``vgg16``, ``vgg19``, ...).
    num_classes: checked against fc8 when given.
    image_size: the training size the weights were made for (fc6 spans image_size // 32).
    flatten_order: the order fc1's input was flattened in: 'HWC' (every Keras applications model) or 'CHW'
      (see ``read_keras_file``).
    width: the conv width multiplier of the model (1 for the applications' VGGs).

  Raises:
    ConversionError: naming every Keras layer that is missing, unexpected or of the wrong shape.
  """
  name = models.canonical_name(name)
  if flatten_order not in ('HWC', 'CHW'):
    raise ValueError(f'flatten_order must be HWC or CHW, got {flatten_order!r}')
  arch = models.ARCHS[name]
  layers = {k: [_np(a) for a in v] for k, v in layers.items() if len(v)}
  want = {keras_layer_name(layer): layer for layer in models.layer_names(name)}
  problems: list[str] = []
  if arch.batch_norm:
    problems.append(f'{name} has batch norm; Keras applications VGGs have none (use {name[:-3]})')
  missing = [k for k in want if k not in layers]
  if missing:
    hint = ' (a _notop / include_top=False file: no classifier)' if set(KERAS_FC) <= set(missing) else ''
    problems.append(f'missing Keras layers: {", ".join(missing)}{hint}')
  unexpected = sorted(set(layers) - set(want))
  if unexpected:
    problems.append(f'unexpected Keras layers: {", ".join(unexpected)}')
  params: dict = {}
  k6 = max(1, image_size // 32)
  for keras, layer in want.items():
    if keras not in layers:
      continue
    arrays = layers[keras]
    w, b = _kernel_and_bias(arrays)
    if w is None or b is None:
      problems.append(f'{keras}: expected a kernel and a bias, got shapes {[a.shape for a in arrays]}')
      continue
    if layer in ('fc6', 'fc7', 'fc8'):
      if w.ndim != 2:
        problems.append(f'{keras}/kernel {w.shape}: expected a Dense kernel (in, out)')
        continue
      k = k6 if layer == 'fc6' else 1
      if w.shape[0] % (k * k):
        problems.append(f'{keras}/kernel {w.shape}: input size not divisible by {k}x{k}')
        continue
      cin = w.shape[0] // (k * k)
      if flatten_order == 'CHW':
        w = w.reshape(cin, k, k, w.shape[1]).transpose(1, 2, 0, 3)
      else:
        w = w.reshape(k, k, cin, w.shape[1])
    elif w.ndim != 4:
      problems.append(f'{keras}/kernel {w.shape}: expected a Conv2D kernel (kh, kw, in, out)')
      continue
    params[layer] = {'kernel': w, 'bias': b}
  if not problems:
    options = dict(num_classes=num_classes or params['fc8']['kernel'].shape[-1], image_size=image_size,
                   fc_features=params['fc6']['kernel'].shape[-1], width=width)
    for p in check_shapes(name, {'params': params}, **options):
      layer = p.split('/')[1].split(':')[0]
      problems.append(f'{p} (Keras {keras_layer_name(layer)})' if layer in want.values() else p)
  if problems:
    raise ConversionError(f'Keras weights do not fit {name}:\n  ' + '\n  '.join(problems))
  return {'params': params}


# ---------------------------------------------------------------------------------------------------------
# Reading weight files without running pickled code.

TORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt')
KERAS_SUFFIXES = ('.h5', '.hdf5', '.keras')
_WRAPPER_KEYS = ('state_dict', 'model', 'model_state_dict', 'state_dict_ema', 'model_ema', 'module')


def source_from_path(path: str | os.PathLike) -> str:
  """'torchvision' for .pth/.pt/.bin/.ckpt/.safetensors files, 'keras' for .h5/.hdf5/.keras files."""
  p = os.fspath(path).lower()
  if p.endswith(TORCH_SUFFIXES + ('.safetensors',)):
    return 'torchvision'
  if p.endswith(KERAS_SUFFIXES):
    return 'keras'
  raise ValueError(f'cannot tell the framework of {os.fspath(path)!r} from its name; '
                   f'say --from=torchvision or --from=keras')


def _is_tensor_dict(obj: Any) -> bool:
  return isinstance(obj, Mapping) and bool(obj) and all(
      hasattr(v, 'shape') and hasattr(v, 'dtype') for v in obj.values())


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A torchvision/timm state dict as float32 numpy arrays, from ``.safetensors`` (needs only the
  safetensors package) or a PyTorch file (``.pth``, ``.pt``, ``.bin``: loaded with weights_only=True,
  so a file holding anything but tensors and plain containers is refused, never executed). A state dict
  wrapped in a training checkpoint ({'state_dict': ...}, {'model': ...}) and DataParallel's 'module.'
  prefix are unwrapped."""
  path = os.fspath(path)
  if path.lower().endswith('.safetensors'):
    from safetensors import safe_open
    out = {}
    try:
      with safe_open(path, framework='numpy') as f:
        for k in f.keys():
          out[k] = f.get_tensor(k)
    except (TypeError, ValueError) as e:  # e.g. bfloat16, which numpy lacks: read through torch
      try:
        import torch  # noqa: F401
      except ImportError:
        raise ConversionError(f'{path}: {e}; reading this dtype needs torch (pip install torch)') from e
      with safe_open(path, framework='pt') as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
    sd = out
  else:
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'reading {path} needs PyTorch (pip install torch), or use a .safetensors file'
                        ) from e
    try:
      sd = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for anything beyond tensors and containers
      raise ConversionError(f'{path} is not a plain state dict that loads with weights_only=True (vggjax '
                            f'never runs pickled code): {type(e).__name__}: {str(e).splitlines()[0]}') from e
    while isinstance(sd, Mapping) and not _is_tensor_dict(sd):
      inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
      if inner is None:
        break
      sd = inner
    if not _is_tensor_dict(sd):
      keys = list(sd)[:10] if isinstance(sd, Mapping) else type(sd).__name__
      raise ConversionError(f'{path} holds no state dict of tensors (found {keys})')
  if all(k.startswith('module.') for k in sd):
    sd = {k[len('module.'):]: v for k, v in sd.items()}
  return {k: _np(v) for k, v in sd.items()}


def _keras3_layers(group, out: dict) -> None:
  """Walks a Keras 3 ``.weights.h5`` tree: layers/<path>/vars/<i>, the layer's name in vars' 'name' attr."""
  for container in ('layers', '_layer_checkpoint_dependencies'):
    if container not in group:
      continue
    for key, child in group[container].items():
      if 'vars' in child and len(child['vars']):
        vars_ = child['vars']
        name = vars_.attrs.get('name', key)
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name in out:
          raise ConversionError(f'two Keras layers are called {name!r}')
        out[name] = [np.asarray(vars_[i]) for i in sorted(vars_, key=int)]
      _keras3_layers(child, out)


def _decode(names) -> list[str]:
  return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


def _legacy_layers(group) -> dict[str, list[np.ndarray]]:
  """Reads Keras' legacy HDF5 layout (the applications' published files, and model.save('x.h5') under
  'model_weights'): attr layer_names; per layer a group whose attr weight_names lists its datasets, named
  'layer/kernel(:0)' (or, for a model nested in a model, 'outer/layer/kernel')."""
  out: dict[str, list[np.ndarray]] = {}
  for layer in _decode(group.attrs['layer_names']):
    g = group[layer]
    if 'weight_names' in g.attrs:
      names = _decode(g.attrs['weight_names'])
    else:  # no index: every dataset in the group
      names = []
      g.visititems(lambda n, obj, found=names: found.append(n) if hasattr(obj, 'shape') else None)
    for weight in names:
      parts = weight.split('/')
      owner = parts[-2] if len(parts) >= 2 else layer
      out.setdefault(owner, []).append(np.asarray(g[weight]))
  return out


def _layer_configs(config: Any) -> list[dict]:
  """Every {'class_name', 'config'} layer entry of a Keras model config, nested models included, in order."""
  found = []
  if isinstance(config, Mapping):
    if isinstance(config.get('class_name'), str) and isinstance(config.get('config'), Mapping):
      found.append(config)
    for v in config.values():
      found += _layer_configs(v)
  elif isinstance(config, (list, tuple)):
    for v in config:
      found += _layer_configs(v)
  return found


def flatten_order(config: Any) -> str:
  """'CHW' when a Keras model config has channels_first convolutions and a channels_last Flatten (the
  feature map is then flattened as it lies), else 'HWC'."""
  entries = _layer_configs(config)
  convs = [e['config'].get('data_format') for e in entries if e['class_name'] == 'Conv2D']
  flattens = [e['config'].get('data_format') for e in entries if e['class_name'] == 'Flatten']
  if convs and convs[-1] == 'channels_first' and flattens and flattens[0] == 'channels_last':
    return 'CHW'
  return 'HWC'


def read_keras_file(path: str | os.PathLike) -> tuple[dict[str, list[np.ndarray]], str]:
  """(Keras layer name -> weight arrays, fc1's flatten order) from any file Keras writes: the applications'
  published weight files (``vgg16_weights_tf_dim_ordering_tf_kernels.h5``), a legacy full-model ``.h5``,
  Keras 3's ``.weights.h5`` and ``.keras`` archives. Read with h5py: nothing is executed. The flatten order
  comes from the model config where the file has one ('HWC' otherwise, as in every Keras application)."""
  import h5py

  path = os.fspath(path)
  config = None
  if zipfile.is_zipfile(path):  # a .keras archive: config.json and model.weights.h5
    with zipfile.ZipFile(path) as z:
      if 'model.weights.h5' not in z.namelist():
        raise ConversionError(f'{path}: a zip without model.weights.h5 (found {z.namelist()[:5]})')
      if 'config.json' in z.namelist():
        config = json.loads(z.read('config.json'))
      source = io.BytesIO(z.read('model.weights.h5'))
  else:
    source = path
  with h5py.File(source, 'r') as f:
    if 'model_weights' in f and 'layer_names' not in f.attrs:
      group = f['model_weights']
    else:
      group = f
    if 'layer_names' in group.attrs:
      layers = _legacy_layers(group)
      raw = f.attrs.get('model_config')
      if raw is not None:
        config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    elif 'layers' in f or '_layer_checkpoint_dependencies' in f:
      layers = {}
      _keras3_layers(f, layers)
    else:
      raise ConversionError(f'{path} is not a Keras weight file (no layer_names attribute, no layers/ group; '
                            f'top-level keys: {list(f)[:10]})')
  return layers, flatten_order(config) if config else 'HWC'


def infer_model_name(source: str, tensors: Mapping) -> str:
  """The vggjax model a torchvision state dict or Keras layer dict holds (vgg11/13/16/19, _bn, vgg16_c)."""
  if source == 'keras':
    convs = [k for k in tensors if re.fullmatch(r'block\d+_conv\d+', k)]
    one_by_one, batch_norm = False, False
  else:
    convs = [k for k, v in tensors.items() if re.fullmatch(r'features\.\d+\.weight', k) and v.ndim == 4]
    one_by_one = any(tensors[k].shape[-1] == 1 for k in convs)
    batch_norm = any(k.endswith('running_mean') for k in tensors)
  by_count = {8: 'vgg11', 10: 'vgg13', 13: 'vgg16', 16: 'vgg19'}
  if len(convs) not in by_count:
    raise ConversionError(f'{len(convs)} conv layers: not a VGG of Table 1 (8, 10, 13 or 16 expected)')
  name = by_count[len(convs)]
  if one_by_one:
    if name != 'vgg16':
      raise ConversionError('1x1 conv layers in a network other than configuration C')
    name = 'vgg16_c'
  return name + '_bn' if batch_norm else name


def load_file(source: str, path: str | os.PathLike, name: str | None = None, *,
              num_classes: int | None = None, image_size: int = 224) -> tuple[dict, str]:
  """(variables, model name) from a weight file of ``source`` ('torchvision' (timm too) or 'keras');
  the model is inferred from the file when ``name`` is None."""
  if source in ('torchvision', 'torch', 'timm', 'pytorch'):
    sd = read_torch_file(path)
    name = models.canonical_name(name) if name else infer_model_name('torchvision', sd)
    return torch_to_variables(sd, name, num_classes=num_classes, image_size=image_size), name
  if source == 'keras':
    layers, flatten_order = read_keras_file(path)
    name = models.canonical_name(name) if name else infer_model_name('keras', layers)
    return keras_to_variables(layers, name, num_classes=num_classes, image_size=image_size,
                              flatten_order=flatten_order), name
  raise ValueError(f'unknown source {source!r}; valid: torchvision, keras')


def preprocessing_for(source: str) -> dict:
  """The Normalization (as a dict) that weights from ``source`` expect."""
  if source in ('torchvision', 'torch', 'timm', 'pytorch'):
    return dict(TORCHVISION_PREPROCESSING)
  if source in ('keras', 'caffe'):
    return dict(CAFFE_PREPROCESSING)
  raise ValueError(f'unknown source {source!r}; valid: torchvision, keras')
