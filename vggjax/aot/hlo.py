"""What the compiled program's text says (its collectives), and the FLOPs XLA's cost analysis counts."""

from __future__ import annotations

import math
import re

import numpy as np

from vggjax import models

_COLLECTIVE = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(all-reduce|all-gather|reduce-scatter|'
                         r'collective-permute|all-to-all|collective-broadcast)(-start)?\(')
_SHAPE = re.compile(r'\b(pred|s4|u4|s8|u8|s16|u16|bf16|f16|s32|u32|f32|s64|u64|f64|c64|c128|f8e4m3fn|f8e5m2)'
                    r'\[([\d,]*)\]')
_DTYPE_BYTES = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2, 'f16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16,
                'f8e4m3fn': 1, 'f8e5m2': 1}


def shape_bytes(text: str) -> int:
  return int(sum(_DTYPE_BYTES[d] * math.prod(int(x) for x in dims.split(',') if x)
                 for d, dims in _SHAPE.findall(text)))


def _replica_groups(line: str, n: int) -> list[list[int]] | None:
  """The groups of device indices (positions in the mesh) of one collective, from its HLO attributes."""
  m = re.search(r'replica_groups=\{(\{[\d,{} ]*\})\}', line)
  if m:
    groups = [[int(x) for x in g.split(',') if x.strip()] for g in re.findall(r'\{([\d, ]*)\}', m.group(1))]
    return [g for g in groups if g] or [list(range(n))]
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if m:
    g, s = int(m.group(1)), int(m.group(2))
    dims = [int(x) for x in m.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(4):
      ids = ids.transpose([int(x) for x in m.group(4).split(',')])
    return ids.reshape(g, s).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
  if m:
    axes = re.findall(r"'([^']+)'=(\d+)", m.group(1))
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    chosen = re.findall(r"'([^']+)'", m.group(2))
    ids = np.arange(math.prod(sizes)).reshape(sizes)
    keep = [names.index(c) for c in chosen if c in names]
    rest = [i for i in range(len(names)) if i not in keep]
    ids = ids.transpose(rest + keep)
    return ids.reshape(-1, math.prod(sizes[i] for i in keep) if keep else 1).tolist()
  if 'collective-permute' in line:
    pairs = re.search(r'source_target_pairs=\{([^=]*?)\}(?:,|$)', line)
    if pairs:
      return [[int(a), int(b)] for a, b in re.findall(r'\{(\d+),(\d+)\}', pairs.group(1))]
  return None


def collectives(hlo_text: str, chips_per_slice: int, num_devices: int) -> list[dict]:
  """The collectives of a compiled program, by kind and by link: count, bytes (the result's, per chip),
  participants and whether the groups stay inside one slice (ICI) or span slices (DCN). Across slices
  the TPU compiler emits host transfers (send ops marked _xla_megascale_transfer_type) of each chip's
  shard: those are the DCN collectives, their bytes the shard's."""
  found: dict[tuple, dict] = {}
  num_slices = max(1, num_devices // chips_per_slice)

  def add(kind, link, participants, spans, nbytes):
    entry = found.setdefault((kind, link, participants, spans), {
        'kind': kind, 'link': link, 'participants': participants, 'slices_spanned': spans, 'count': 0,
        'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += nbytes

  for line in hlo_text.splitlines():
    if '-done(' in line:
      continue
    dcn = re.search(r'_xla_megascale_transfer_type="([A-Z_]+)"', line)
    if dcn and re.search(r'\ssend\(', line):
      data = re.search(r'=\s*\((.*?)\)\s+send\(', line)
      shapes = _SHAPE.findall(data.group(1)) if data else []
      nbytes = shape_bytes('{}[{}]'.format(*shapes[0])) if shapes else 0
      add(dcn.group(1).lower().replace('_', '-'), 'DCN', num_slices, num_slices, nbytes)
      continue
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    kind = m.group(2)
    nbytes = shape_bytes(m.group(1))
    if m.group(3):  # async start: (operands, results[, context]): count the results
      nbytes = shape_bytes(m.group(1)) // 2
    groups = _replica_groups(line, num_devices) or [list(range(num_devices))]
    participants = max(len(g) for g in groups)
    spans = max(len({i // chips_per_slice for i in g}) for g in groups)
    add(kind, 'DCN' if spans > 1 else 'ICI', participants, spans, nbytes)
  return sorted(found.values(), key=lambda e: (e['link'], -e['bytes']))


def _valid_taps(n: int, k: int) -> int:
  """Multiply-adds along one axis of a stride-1 'same' convolution of kernel k over n positions, counting
  only the taps that fall inside the input (the padding's zeros are not multiplied)."""
  if k == 1:
    return n
  half = k // 2
  return sum(min(n - 1, o + half) - max(0, o - half) + 1 for o in range(n))


def valid_tap_flops(model, image_hw: tuple[int, int], train: bool) -> int:
  """FLOPs (2 x multiply-adds) of the convolutions and FC layers of one image counting only taps inside
  the input, as XLA's cost analysis counts them. models.flops counts every tap (the usual convention); the
  two differ by the zero padding, a few percent at 224 and more on small images. Training: forward, the
  weight gradients and the input gradients of every layer but conv1_1 (whose input needs none)."""
  params = models.variable_shapes(model)['params']
  h, w = image_hw
  macs, first = 0, 0
  for b, stage in enumerate(model.stages):
    for i in range(len(stage)):
      kh, kw, cin, cout = params[f'conv{b + 1}_{i + 1}']['kernel'].shape
      layer = _valid_taps(h, kh) * _valid_taps(w, kw) * cin * cout
      first = first or layer
      macs += layer
    h, w = h // 2, w // 2
  k6 = model.fc6_kernel
  cells = (h - k6 + 1) * (w - k6 + 1)
  for name in ('fc6', 'fc7', 'fc8'):
    macs += cells * math.prod(params[name]['kernel'].shape)
  if train:
    macs = 3 * macs - first
  return 2 * macs
