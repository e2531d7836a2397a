"""The warm start (paper 3.1): a run's first parameters copied, layer by layer, from another run or a weights
directory (``config.init_from``, ``config.init_layers``), and the warning for a deep net started from scratch.

The paper trains net A from a Gaussian initialisation and initialises the first four conv layers and the
three FC layers of the deeper nets B-E from A ('paper'); a run at another scale or with another number of
classes starts from every layer whose name and shape match ('all'). config_lib parses ``init_layers`` with
``parse_init_layers`` when it validates a config; the training loop calls ``warm_start`` on a fresh state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, TypeVar

import flax
import jax
import numpy as np

from vggjax import checkpoints, models, parallel
from vggjax.preprocessing import Normalization

if TYPE_CHECKING:
  import ml_collections

log = logging.getLogger('vggjax')
State = TypeVar('State')  # train.TrainState (this module reads its params and batch_stats only)


def parse_init_layers(spec) -> str | tuple[str, ...]:
  """config.init_layers: 'paper' (the paper's warm start of B-E from A: conv1_1, conv2_1, conv3_1, conv3_2,
  fc6, fc7, fc8), 'all' (every layer whose name and shape match), or layer names ('conv1_1,fc6' or a
  sequence). Returns 'all' or a tuple of names."""
  if isinstance(spec, str):
    key = spec.strip().strip('()[]').strip('\'"').strip()
    if key in ('all', 'paper'):
      return 'all' if key == 'all' else models.WARM_START_LAYERS
    spec = spec.strip().strip('()[]').split(',')
  names = tuple(n.strip().strip('\'"').strip() for item in spec for n in str(item).split(','))
  names = tuple(n for n in names if n)
  if names in (('all',), ('paper',)):
    return parse_init_layers(names[0])
  if not names:
    raise ValueError("init_layers is empty: use 'paper', 'all' or layer names")
  return names


def matching_layers(src: dict, params: dict, stats: dict) -> tuple[list[str], list[str]]:
  """init_layers='all': (layers whose every variable matches by name and shape, [why each other is fresh])."""
  copied, fresh = [], []
  for layer in list(params) + [s for s in stats if s not in params]:
    own = {**params.get(layer, {}), **stats.get(layer, {})}
    theirs = {**src.get('params', {}).get(layer, {}), **src.get('batch_stats', {}).get(layer, {})}
    if not theirs:
      fresh.append(f'{layer} (not in the source)')
    elif set(theirs) != set(own):
      fresh.append(f'{layer} (variables {sorted(theirs)} there, {sorted(own)} here)')
    elif any(tuple(np.shape(theirs[k])) != tuple(np.shape(own[k])) for k in own):
      k = next(k for k in own if tuple(np.shape(theirs[k])) != tuple(np.shape(own[k])))
      fresh.append(f'{layer} ({k} {tuple(np.shape(theirs[k]))} there, {tuple(np.shape(own[k]))} here)')
    else:
      copied.append(layer)
  return copied, fresh


def warm_start(state: State, source: str, layers, mesh, norm: Normalization | None = None,
               model_name: str | None = None) -> State:
  """Copies layers from another run's (or a weights directory's) parameters; the rest stay fresh.

  ``layers`` (config.init_layers): 'paper' (default: conv1_1, conv2_1, conv3_1, conv3_2, fc6, fc7, fc8 of
  net A into B-E, paper 3.1), 'all' (every layer whose name and shape match: the S=384 net from the S=256
  net, multi-scale from S=384, transfer to another number of classes keeps its new fc8), or layer names
  (each must exist in both with the same shape)."""
  layers = parse_init_layers(layers)
  src, meta = checkpoints.load_weights(source)
  src_norm = checkpoints.normalization_from_meta(meta)
  src_name = (meta.get('model') or {}).get('name')
  if norm is not None and not src_norm.equivalent(norm):
    log.warning('warm start: %s was trained on inputs normalised as %s, this run feeds %s; set '
                'config.data.mean_rgb/std_rgb/color_order to match unless that is intended', source,
                src_norm, norm)
  params = flax.core.unfreeze(jax.device_get(state.params))
  stats = flax.core.unfreeze(jax.device_get(state.batch_stats)) if state.batch_stats else {}
  fresh: list[str] = []
  if layers == 'all':
    layers, fresh = matching_layers(src, params, stats)
    if not layers:
      raise ValueError(f'warm start: no layer of {source} matches this model by name and shape '
                       f'({"; ".join(fresh)})')
    if model_name and src_name and models.canonical_name(src_name) != models.canonical_name(model_name):
      log.warning("warm start: init_layers='all' from %s into %s copies %d layers by name and shape; the "
                  "paper's warm start of a deeper net from A copies only %s (init_layers='paper')",
                  src_name, model_name, len(layers), ', '.join(models.WARM_START_LAYERS))
  for layer in layers:
    if layer not in params and layer not in stats:
      raise ValueError(f'warm start: layer {layer} is not in this model ({", ".join(params)})')
    found = False
    for coll, target in (('params', params), ('batch_stats', stats)):
      for name, value in src.get(coll, {}).get(layer, {}).items():
        found = True
        want = target[layer][name].shape
        if tuple(value.shape) != tuple(want):
          raise ValueError(f'warm start: {layer}/{name} has shape {tuple(value.shape)} in {source} but '
                           f'{tuple(want)} in this model')
        target[layer][name] = np.asarray(value, target[layer][name].dtype)
    if not found:
      raise ValueError(f'warm start: layer {layer} is not in {source} ({", ".join(src["params"])})')
  log.info('warm start from %s (%s): copied %d layers: %s%s', source, src_name, len(layers),
           ', '.join(layers), f'; fresh: {", ".join(fresh)}' if fresh else '')
  rep = parallel.replicated(mesh)
  return state.replace(params=jax.device_put(params, rep),
                       batch_stats=jax.device_put(stats, rep) if stats else state.batch_stats)


DEEP_NETS = ('vgg13', 'vgg16_c', 'vgg16', 'vgg19')  # B-E: the nets the paper warm-starts from A


def warn_deep_from_scratch(config: ml_collections.ConfigDict) -> bool:
  """Logs a warning (and returns True) when a deep net (B-E, no batch norm) with the paper's Gaussian init
  starts from scratch: the case the paper (3.1) says stalls ("bad initialisation can stall learning due to
  the instability of gradient in deep nets")."""
  name = models.canonical_name(config.model.name)
  if name not in DEEP_NETS or config.init_from or config.model.init != 'paper':
    return False
  log.warning('%s (net %s) starts from scratch with the paper\'s Gaussian init (std %g): the paper (3.1) '
              'trains only net A this way, because bad initialisation stalls deep nets, and initialises '
              'B-E from A. Either --config.init_from=A_RUN (a trained vgg11 run: conv1_1, conv2_1, '
              'conv3_1, conv3_2, fc6, fc7, fc8 are copied) or --config.model.init=glorot (the paper\'s '
              'note: Glorot init trains without pre-training).', name, models.ARCHS[name].paper_name,
              config.model.init_std)
  return True
