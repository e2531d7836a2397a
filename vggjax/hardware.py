"""The one table of accelerators: the TPU generations the planner (vggjax.plan) compiles for, with their
sources, and the peak FLOP/s of the other devices the benchmark (vggjax.benchmark) meets.

A Cloud TPU slice is named by its accelerator type: ``v4-8`` ... ``v4-4096`` and ``v5p-8`` ... (the number
counts TensorCores, two per chip), ``v5litepod-1`` ... ``v5litepod-256`` (alias ``v5e-N``) and ``v6e-1`` ...
``v6e-256`` (the number counts chips). ``parse_slice`` turns such a name into the slice's chip grid, its
hosts and the arguments ``jax.experimental.topologies.get_topology_desc`` needs to compile for it without
the hardware (the same mapping MaxText's ``accelerator_to_spec_map.py`` uses for its ahead-of-time compiles).

Figures per chip, from the Cloud TPU system-architecture pages (docs.cloud.google.com/tpu/docs/v4, /v5e,
/v5p, /v6e, read 2026-12-01):

* peak dense bf16 FLOP/s, HBM capacity and HBM bandwidth: as published (capacities taken as GiB: the
  pages write "16 GB" and "32 GB" for chips whose HBM is 16 and 32 GiB; the TPU compiler itself reports
  15.75 GiB available on a v5e chip, which is what decides at compile time);
* ICI: the rate at which one chip takes part in an all-reduce. v4, v5e and v6e publish an "all-reduce
  bandwidth per Pod" (1.1 PB/s over 4096 chips, 51.2 TB/s and 102.4 TB/s over 256): divided by the chips.
  v5p publishes only the bidirectional ICI bandwidth per chip (1200 GB/s); v5e's pod all-reduce figure is
  half of its bidirectional per-chip ICI (400 GB/s -> 200 GB/s), and the same ratio is used for v5p;
* DCN (between slices, through the hosts): v5p 50 Gbit/s per chip as published; v5e 2 x 100 Gbit/s NICs
  per 8-chip host (6.4 Tbit/s per 256-chip pod), 25 Gbit/s per chip. No per-chip DCN figure is published for
  v4 and v6e on those pages: 25 Gbit/s per chip is ASSUMED for them (``vggjax.plan --dcn_gbps`` overrides).

GPUs (and TPU v2/v3, which the planner does not compile for) are in ``PEAK_TFLOPS``, peak FLOP/s only;
``peak_tflops`` looks a device up in both (a GPU plan compiles on the attached card).
"""

from __future__ import annotations

import dataclasses
import math
import re

GB = 1e9
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: what the planner needs of one chip."""
  generation: str  # v4, v5e, v5p, v6e
  names: tuple[str, ...]  # accelerator-type prefixes: 'v5litepod', 'v5e'
  topology_prefix: str  # libtpu's topology names: 'v5e:4x4', 'v5:2x2x1'
  chip_config: str  # 'megacore' (two TensorCores as one device) or 'default' (one TensorCore)
  cores_per_chip: int  # TensorCores counted by the accelerator-type name (v4-8 = 4 chips)
  host_chips: int  # chips per host of multi-host slices
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bytes_per_s: float
  ici_allreduce_bytes_per_s: float  # per chip (see the module docstring)
  dcn_bytes_per_s: float  # per chip
  dcn_assumed: bool  # True where no DCN figure is published (see the module docstring)
  device_kind: str  # what jax reports as device_kind
  source: str
  kind_pattern: str = ''  # matches the lower-cased device kinds of this generation (peak_tflops)


CHIPS: dict[str, Chip] = {c.generation: c for c in (
    Chip('v4', ('v4',), 'v4', 'megacore', 2, 4, 32 * GIB, 275e12, 1200 * GB, 1.1e15 / 4096,
         25e9 / 8, True, 'TPU v4', 'docs.cloud.google.com/tpu/docs/v4', r'^tpu.*v4'),
    Chip('v5e', ('v5litepod', 'v5e'), 'v5e', 'default', 1, 4, 16 * GIB, 197e12, 819 * GB, 51.2e12 / 256,
         25e9 / 8, False, 'TPU v5 lite', 'docs.cloud.google.com/tpu/docs/v5e', r'^tpu.*(v5 ?lite|v5e)'),
    Chip('v5p', ('v5p',), 'v5', 'megacore', 2, 4, 95 * GIB, 459e12, 2765 * GB, 1200 * GB / 2,
         50e9 / 8, False, 'TPU v5', 'docs.cloud.google.com/tpu/docs/v5p', r'^tpu.*v5'),
    Chip('v6e', ('v6e',), 'v6e', 'default', 1, 4, 32 * GIB, 918e12, 1640 * GB, 102.4e12 / 256,
         25e9 / 8, True, 'TPU v6 lite', 'docs.cloud.google.com/tpu/docs/v6e', r'^tpu.*(v6|trillium)'),
)}

DTYPES = ('float32', 'bfloat16')

# Peak dense (no structured sparsity) TFLOP/s of one device as JAX sees it, from the vendors' datasheets, for
# the devices CHIPS does not hold. 'bfloat16': the 16-bit matrix units. 'float32': the rate of what XLA runs
# by default for float32 convolutions and matmuls: TF32 tensor cores on Ampere and later, the FP32 units on
# Volta/Turing, and single-pass bf16 on TPUs (JAX's default precision there: a CHIPS generation's float32
# peak is its bf16 peak). TPU v2/v3 show each core as a device (half a chip). V100 and T4 have no bf16
# units: their 'bfloat16' entry is the fp16 tensor-core peak, which XLA does not reach with bf16.
# (pattern on the lower-cased device kind, label, bfloat16, float32)
PEAK_TFLOPS: tuple[tuple[str, str, float, float], ...] = (
    (r'b200', 'B200', 2250.0, 1100.0),
    (r'gh200', 'GH200', 989.4, 494.7),
    (r'h200', 'H200', 989.4, 494.7),
    (r'h100.*nvl', 'H100 NVL', 835.5, 417.5),
    (r'h100.*pcie', 'H100 PCIe', 756.0, 378.0),
    (r'h100|h800', 'H100 SXM', 989.4, 494.7),
    (r'a100|a800', 'A100', 312.0, 156.0),
    (r'l40s', 'L40S', 362.0, 183.0),
    (r'\bl40\b', 'L40', 181.0, 90.5),
    (r'\bl4\b', 'L4', 121.0, 60.0),
    (r'\ba10\b', 'A10', 125.0, 62.5),
    (r'v100', 'V100', 125.0, 15.7),
    (r'\bt4\b', 'T4', 65.0, 8.1),
    (r'^tpu.*v3', 'TPU v3 (per core)', 61.5, 61.5),
    (r'^tpu.*v2', 'TPU v2 (per core)', 22.5, 22.5),
)


def peak_tflops(device_kind: str, dtype: str) -> tuple[float | None, str | None]:
  """(peak dense TFLOP/s of one device for `dtype`, its label), or (None, None) if unknown: a TPU generation
  of CHIPS (its bf16 peak for both dtypes), else a device of PEAK_TFLOPS."""
  if dtype not in DTYPES:
    raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
  kind = (device_kind or '').lower()
  for chip in CHIPS.values():
    if re.search(chip.kind_pattern, kind):
      return chip.peak_bf16_flops / 1e12, f'TPU {chip.generation}'
  for pattern, label, bf16, f32 in PEAK_TFLOPS:
    if re.search(pattern, kind):
      return (bf16 if dtype == 'bfloat16' else f32), label
  return None, None


# Slice shapes by chip count. 2-D (v5e, v6e): single-host slices of 1, 4 and 8 chips, then hosts of 4 chips.
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
# 3-D (v4, v5p): hosts of 4 chips (2x2x1); wraparound (a torus) where every side is a multiple of 4.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8), 768: (8, 8, 12),
              1024: (8, 8, 16), 1536: (8, 12, 16), 2048: (8, 16, 16), 3072: (12, 16, 16),
              4096: (16, 16, 16), 6144: (16, 16, 24)}
_MAX_CHIPS = {'v4': 2048, 'v5p': 6144, 'v5e': 256, 'v6e': 256}


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice (or num_slices identical slices joined by DCN) by its accelerator type."""
  accelerator_type: str  # canonical: v5litepod-16, v4-8, v5p-8, v6e-256
  chip: Chip
  shape: tuple[int, ...]  # chips along each ICI axis
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.shape)

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    """Chips per host along each axis (get_topology_desc's chips_per_host_bounds)."""
    n = self.chips_per_slice
    if len(self.shape) == 2 and n <= 8:
      return (*self.shape, 1)  # single-host v5e/v6e slices: all their chips on one host
    return (2, 2, 1)

  @property
  def chips_per_host(self) -> int:
    return math.prod(self.host_bounds)

  @property
  def hosts_per_slice(self) -> int:
    return self.chips_per_slice // self.chips_per_host

  @property
  def hosts(self) -> int:
    return self.hosts_per_slice * self.num_slices

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    if len(self.shape) == 3:
      torus = all(s % 4 == 0 for s in self.shape)
      return (torus,) * 3
    if self.shape == (16, 16):  # a full v5e/v6e pod: wraparound in both directions
      return (True, True, False)
    if self.shape == (8, 16):
      return (False, True, False)
    return (False, False, False)

  @property
  def topology_name(self) -> str:
    return f'{self.chip.topology_prefix}:{"x".join(map(str, self.shape))}'

  def topology_kwargs(self) -> dict:
    """Arguments of jax.experimental.topologies.get_topology_desc for this slice."""
    return dict(platform='tpu', topology_name=self.topology_name, chip_config_name=self.chip.chip_config,
                chips_per_host_bounds=self.host_bounds, num_slices=self.num_slices, wrap=self.wrap)

  def describe(self) -> str:
    many = f'{self.num_slices} x ' if self.num_slices > 1 else ''
    return (f'{many}{self.accelerator_type} ({"x".join(map(str, self.shape))} {self.chip.generation} chips, '
            f'{self.hosts_per_slice} host{"s" if self.hosts_per_slice > 1 else ""} of {self.chips_per_host})')


def known_names() -> list[str]:
  """Every accelerator type parse_slice accepts (canonical names)."""
  names = []
  for gen, chip in CHIPS.items():
    shapes = _SHAPES_2D if gen in ('v5e', 'v6e') else _SHAPES_3D
    names += [f'{chip.names[0]}-{n * chip.cores_per_chip}' for n in shapes if n <= _MAX_CHIPS[gen]]
  return names


def _summary() -> str:
  parts = []
  for gen, chip in CHIPS.items():
    shapes = _SHAPES_2D if gen in ('v5e', 'v6e') else _SHAPES_3D
    counts = [n * chip.cores_per_chip for n in shapes if n <= _MAX_CHIPS[gen]]
    alias = f' (alias {chip.names[1]}-N)' if len(chip.names) > 1 else ''
    parts.append(f'{chip.names[0]}-N{alias} for N in {", ".join(map(str, counts))}')
  return '; '.join(parts)


def parse_slice(name: str, num_slices: int = 1) -> Slice:
  """'v5litepod-16' (or 'v5e-16', 'v4-8', 'v5p-128', 'v6e-256') -> Slice. Raises ValueError naming the
  known ones."""
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices}: at least 1')
  m = re.fullmatch(r'\s*([a-z0-9]+)-(\d+)\s*', name.lower())
  chip = None
  if m:
    chip = next((c for c in CHIPS.values() if m.group(1) in c.names), None)
  if chip is None or not m:
    raise ValueError(f'unknown TPU topology {name!r}; known: {_summary()}')
  count = int(m.group(2))
  shapes = _SHAPES_2D if chip.generation in ('v5e', 'v6e') else _SHAPES_3D
  chips, rest = divmod(count, chip.cores_per_chip)
  if rest or chips not in shapes or chips > _MAX_CHIPS[chip.generation]:
    raise ValueError(f'unknown TPU topology {name!r}: {chip.names[0]} slices are '
                     f'{", ".join(n for n in known_names() if n.startswith(chip.names[0] + "-"))}')
  return Slice(f'{chip.names[0]}-{count}', chip, shapes[chips], num_slices)
