"""Weights from other frameworks, converted to vggjax variables by layer name.

torchvision (and timm, which republishes the same weights) store a VGG as ``features.N`` (convs and batch
norms in order), then three FC layers; the FC layers are ``classifier.0/3/6`` (torchvision, Linear) or
``pre_logits.fc1``/``pre_logits.fc2`` (timm, Conv2d) and ``head.fc`` (timm, Linear). vggjax's fc6 is a
convolution over the last feature map, so torchvision's fc6 matrix (4096, 512*7*7, flattened as C, H, W) is
reshaped to (7, 7, 512, 4096).

Only numpy arrays cross this module's boundary: loading files (and never running pickled code) is the
caller's business (see vggjax.convert).
"""

from __future__ import annotations

import re
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
                   fc_features=params['fc6']['kernel'].shape[-1])
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
