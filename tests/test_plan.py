"""vggjax.plan and vggjax.aot: the real steps compiled for TPU slices that are not attached (libtpu as a compiler only).

A narrow VGG-A on 32x32 images keeps every compile to seconds; the same code plans the full nets.
"""

import dataclasses
import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_env

pytest.importorskip('libtpu', reason='the TPU compiler (pip install "vggjax[tpu-plan]")')

from vggjax import hardware, models, plan  # noqa: E402
from vggjax.aot import analysis, hlo, roofline, search  # noqa: E402
from vggjax.aot.steps import Steps  # noqa: E402
from vggjax.aot.target import Compiled, tpu_target  # noqa: E402

NARROW = dict(width=0.0625, fc_features=64, num_classes=10)
CLI_NARROW = ['--config.model.width=0.0625', '--config.model.fc_features=64', '--config.model.num_classes=10',
              '--config.data.image_size=32', '--config.data.scale_min=32', '--config.data.scale_max=32',
              '--config.model.dtype=bfloat16']


def narrow_config(global_batch: int, **model):
  from configs import vgg11
  c = vgg11.get_config()
  for k, v in {**NARROW, **model}.items():
    c.model[k] = v
  c.model.dtype = 'bfloat16'
  c.data.image_size = c.data.scale_min = c.data.scale_max = 32
  c.train.global_batch_size = global_batch
  return c


@pytest.fixture(scope='module')
def one_host():
  """A v5litepod-8 (one host, 8 chips): the narrow train step at a per-chip batch of 8."""
  target = tpu_target('v5litepod-8')
  compiled = {}
  report = plan.plan(narrow_config(64), target, steps_to_plan=('train',), compiled_out=compiled)
  return target, report, compiled['train']


@pytest.fixture(scope='module')
def quarter():
  """A quarter-width A at 64x64 (its activations outweigh the compiler's fixed scratch), train step at
  per-chip batches 8 and 16 on a v5litepod-8."""
  from vggjax import config_lib, parallel
  target = tpu_target('v5litepod-8')
  config = narrow_config(64, width=0.25, fc_features=256)
  config.data.image_size = config.data.scale_min = config.data.scale_max = 64
  steps = Steps.build(config_lib.resolve(config, 10), parallel.make_mesh(target.devices))
  compiled = {b: search.compile_train(steps, target, b, print) for b in (8, 16)}
  return target, steps, compiled


# --- the slice table ----------------------------------------------------------------------------------------

def test_slice_names():
  s = hardware.parse_slice('v5litepod-16')
  assert (s.shape, s.chips, s.hosts, s.chips_per_host) == ((4, 4), 16, 4, 4)
  assert hardware.parse_slice('v5e-16') == s  # the alias
  assert hardware.parse_slice('v5litepod-8').hosts == 1
  v4 = hardware.parse_slice('v4-8')  # the number counts TensorCores: 4 chips on one host
  assert (v4.shape, v4.chips, v4.hosts, v4.topology_name) == ((2, 2, 1), 4, 1, 'v4:2x2x1')
  assert hardware.parse_slice('v5p-128').wrap == (True, True, True)
  big = hardware.parse_slice('v6e-256', num_slices=2)
  assert (big.chips, big.hosts, big.wrap) == (512, 128, (True, True, False))
  for bad in ('v7-8', 'tpu'):
    with pytest.raises(ValueError, match='v5litepod-N.*v6e-N'):
      hardware.parse_slice(bad)
  with pytest.raises(ValueError, match='v5litepod-1, v5litepod-4, v5litepod-8, v5litepod-16'):
    hardware.parse_slice('v5litepod-12')


# --- one host ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_step_compiles_for_one_host(one_host):
  _, report, _ = one_host
  train = report['steps']['train']
  assert train['compiles'] and train['fits'] and plan.exit_code(report) == 0
  assert report['target']['hosts'] == 1 and report['input']['per_process_batch'] == 64
  grads = [c for c in train['collectives'] if c['kind'] == 'all-reduce' and c['link'] == 'ICI']
  assert grads and grads[0]['participants'] == 8  # the gradient all-reduce over the slice
  assert train['estimate']['step_s'] > 0 and train['estimate']['kind'].startswith('estimate')
  assert 'recomputes' not in train  # no remat: the compiled FLOPs are the model's


@pytest.mark.slow
def test_recomputation_is_reported():
  """A train step that recomputes activations (here model.remat; an older libtpu also rematerialises by
  itself to fit a batch whose activations do not fit) does more FLOPs than the model: the plan says so."""
  report = plan.plan(narrow_config(64, remat=True), tpu_target('v5litepod-8'), steps_to_plan=('train',))
  train = report['steps']['train']
  assert train['recomputes']['model_remat'] is True
  assert train['recomputes']['compiler_over_model_flops'] > roofline.RECOMPUTE_RATIO
  assert 'RECOMPUTES' in plan.format_report(report)


@pytest.mark.slow
def test_memory_is_the_compilers(one_host):
  _, report, comp = one_host
  mem = report['steps']['train']['memory']
  ma = comp.compiled.memory_analysis()
  assert mem['arguments_bytes'] == ma.argument_size_in_bytes
  assert mem['compiler_peak_bytes'] == ma.peak_memory_in_bytes > 0
  assert mem['code_bytes'] == ma.generated_code_size_in_bytes
  assert mem['temporaries_bytes'] == ma.peak_memory_in_bytes - ma.argument_size_in_bytes
  assert mem['total_bytes'] == ma.peak_memory_in_bytes + ma.generated_code_size_in_bytes
  model = models.get_model('vgg11', image_size=32, **NARROW)
  assert mem['parameters_bytes'] == models.param_count(model) * 4  # float32 parameters, replicated
  assert mem['optimizer_state_bytes'] >= mem['parameters_bytes']  # the momentum buffer
  assert mem['arguments_bytes'] >= mem['parameters_bytes'] + mem['optimizer_state_bytes'] + mem['batch_bytes']



@pytest.mark.slow
def test_unreadable_compiled_text_gives_the_analytic_all_reduce(one_host):
  """libtpu compiled VGG-A at 4,096 images per v5p chip, then failed to print the program (an XLA RET_CHECK):
  the plan keeps its memory and FLOPs, takes the gradient all-reduce of the float32 parameters as the
  collectives, and says so, instead of failing on a program that compiled."""
  target, report, comp = one_host

  class Unprintable:
    def __getattr__(self, name):
      return getattr(comp.compiled, name)

    def as_text(self):
      raise RuntimeError('INTERNAL: RET_CHECK failure async-update instruction should have 1 operands')

  train = report['steps']['train']
  size = report['model']['image_size']
  parts = {k: train['memory'][k] for k in ('parameters_bytes', 'optimizer_state_bytes', 'other_state_bytes')}
  r = roofline.step_report('train', Compiled(True, Unprintable(), comp.seconds), target, global_batch=64,
                       analytic_flops_per_image=train['flops']['analytic_per_chip'] / 8, state_parts=parts,
                       batch_bytes_per_chip=train['memory']['batch_bytes'], image_hw=(size, size))
  assert r['memory'] == train['memory']
  assert r['flops']['compiler_per_chip'] == train['flops']['compiler_per_chip']
  [c] = r['collectives']
  assert (c['kind'], c['link'], c['participants']) == ('all-reduce', 'ICI', 8)
  assert c['bytes'] == parts['parameters_bytes']
  assert 'RET_CHECK' in r['collectives_note'] and r['estimate']['step_s'] > 0

def _memory(target, steps, comp, per_chip):
  """The plan's memory report of one compiled train step."""
  parts = steps.state_parts()
  size = steps.image_size
  return roofline.step_report('train', comp, target, global_batch=per_chip * target.chips,
                          analytic_flops_per_image=1, state_parts=parts,
                          batch_bytes_per_chip=per_chip * (size * size * 3 + 4),
                          image_hw=(size, size))['memory']


@pytest.mark.slow
def test_larger_batch_needs_more_temporaries(quarter):
  target, steps, compiled = quarter
  small, large = (_memory(target, steps, compiled[b], b) for b in (8, 16))
  assert large['temporaries_bytes'] > small['temporaries_bytes']
  assert large['batch_bytes'] == 2 * small['batch_bytes']
  assert large['parameters_bytes'] == small['parameters_bytes']


@pytest.mark.slow
def test_max_batch_fits_and_its_double_does_not(quarter):
  target, steps, compiled = quarter
  at8, at16 = (_memory(target, steps, compiled[b], b)['total_bytes'] for b in (8, 16))
  # An HBM between the memory at 8 and at 16 images per chip: the search (from 8, in steps of 8) probes 8,
  # doubles to 16, and stops (the compiles at 8 and 16 are the fixture's).
  small = dataclasses.replace(target, hbm_bytes=(at8 + at16) // 2)
  kept = {}
  found = search.max_batch(steps, small, 8, print, known=compiled, granularity=8, compiled_out=kept)
  b = found['max_per_chip_batch']
  assert b == 8
  assert kept['train_at_max_batch'] is compiled[8]  # the edge's program, reported without compiling again
  assert found['probes'][str(b)]['fits'] and found['probes'][str(b)]['total_bytes'] <= small.hbm_bytes
  assert found['first_not_fitting'] <= 2 * b  # memory grows with the batch: the double does not fit either
  assert not found['probes'][str(found['first_not_fitting'])]['fits']


def _affine_probe(base, per_image, bend=0.0):
  """A stand-in for compiling: memory base + per_image x b (+ a small convex bend), with the probes asked."""
  asked = []

  def probe(b):
    asked.append(b)
    return int(base + per_image * b + bend * b * b)
  return probe, asked


@pytest.mark.parametrize('start,bend', [(32, 0.0), (32, 2e3), (8, 0.0), (512, 0.0), (512, 5e3)])
def test_max_batch_search_follows_the_line(start, bend):
  """The search asks few probes (two give the line, the edge and one step above it confirm it) and its
  answer is the true edge of the probed function: fits, and one step more does not."""
  hbm = 16 * 2 ** 30
  probe, asked = _affine_probe(2 * 2 ** 30, 37 * 2 ** 20, bend)
  lo, hi, why = search.search_max_batch(probe, hbm, start, 8)
  assert probe(lo) <= hbm < probe(lo + 8) and hi == lo + 8 and lo % 8 == 0
  assert len(set(asked)) <= 5, why
  if bend == 0.0 and start < lo:
    assert len(set(asked)) <= 4, why  # start, its double, the predicted edge, one step above


def test_max_batch_search_without_figures_bisects():
  """A probe that runs out of memory at compile time gives no figure: the search falls back to halving and
  bisection, and still ends on a compiled edge; nothing fitting gives 0."""
  edge = 100
  asked = []

  def probe(b):
    asked.append(b)
    return 1 if b <= edge else None
  lo, hi, _ = search.search_max_batch(probe, 10, 512, 4)
  assert (lo, hi) == (100, 104)
  assert search.search_max_batch(lambda b: None, 10, 64, 8)[:2] == (0, 8)


def test_max_batch_search_bisects_when_the_compiler_stops_before_the_line():
  """As VGG-A on a v5litepod-8 did: the figures are affine below the edge, but the compiler runs out of memory
  (no figure) well before the line's edge. The search bisects between the last fit and the line's failed
  guess instead of stepping down from it one granule per compile, and ends on the compiled edge."""
  probe, asked = _affine_probe(2 * 2 ** 30, 20 * 2 ** 20, 0.0)
  edge = 500

  def capped(b):
    return probe(b) if b <= edge else None
  lo, hi, why = search.search_max_batch(capped, 16 * 2 ** 30, 32, 8)
  assert (lo, hi) == (496, 504), why
  assert len(why) <= 10, why  # stepping down from the line's 712 one granule at a time took 12+


def test_max_batch_search_stops_at_its_limit():
  """Where everything up to the limit fits (VGG-A in a v5p's 95 GiB), the answer is the limit, with no batch
  known not to fit; the limit itself is compiled, never a batch above it."""
  probe, asked = _affine_probe(2 * 2 ** 30, 20 * 2 ** 20, 0.0)
  lo, hi, why = search.search_max_batch(probe, 95 * 2 ** 30, 64, 8, limit=1024)
  assert (lo, hi) == (1024, None), why
  assert max(asked) == 1024


def test_max_batch_search_out_of_compiles_keeps_its_bracket():
  """A search that runs out of compiles (D in a v5p's 95 GiB needed 14) returns the largest batch known to
  fit and the smallest known not to, and says it stopped, instead of failing and losing both."""
  probe, _ = _affine_probe(2 * 2 ** 30, 20 * 2 ** 20, 0.0)
  asked = []

  def capped(b):  # the compiler gives up above 1000
    asked.append(b)
    return probe(b) if b <= 1000 else None
  lo, hi, why = search.search_max_batch(capped, 95 * 2 ** 30, 64, 8, max_probes=4)
  assert len(set(asked)) == 4 and why[-1] == f'stopped after 4 compiles: the edge lies between {lo} and {hi}'
  assert lo <= 1000 < hi and lo in asked and hi in asked and hi - lo > 8

def test_valid_taps_against_the_analytic_count():
  """At the paper's size the analytic count (every tap) and the compiler's (taps inside the image) differ by
  the zero padding only: within 5% for A, D and E."""
  for name in ('vgg11', 'vgg16', 'vgg19'):
    model = models.get_model(name, image_size=224)
    ratio = hlo.valid_tap_flops(model, (224, 224), True) / (3 * models.flops(name, 224).flops)
    assert 0.95 < ratio < 1.0, (name, ratio)


@pytest.mark.slow
def test_compiler_flops_agree(quarter):
  """The compiler's FLOPs per image (the difference between two batches, which leaves out the per-step work
  on the parameters: the optimizer, the finite checks) equal the analytic count of the taps inside the image
  within 5%, on a quarter-width A at 64x64."""
  _, steps, compiled = quarter
  flops = {b: analysis.cost(compiled[b].compiled)['flops'] for b in (8, 16)}
  per_image = (flops[16] - flops[8]) / 8
  valid = hlo.valid_tap_flops(steps.model, (64, 64), True)
  assert abs(per_image / valid - 1) < 0.05, (per_image, valid)


def test_fixed_and_jittered_scale_share_the_train_step():
  """S=256 and S~U[256,512] differ in the data transform only: the train step sees image_size crops in both
  and lowers to the same program (the plan's table gives them one compiled train step); the dense
  evaluation step differs (its test scale Q: 256 against 384)."""
  from configs import vgg11
  from vggjax import config_lib, parallel
  mesh = parallel.make_mesh(tpu_target('v5litepod-8').devices)
  texts, dense = [], []
  for scale in ('256', 'jitter'):
    c = vgg11.get_config(scale)
    for k, v in NARROW.items():
      c.model[k] = v
    c.model.dtype = 'bfloat16'
    c.data.image_size = 32
    c.train.global_batch_size = 64
    steps = Steps.build(config_lib.resolve(c, 10), mesh)
    texts.append(steps.train_step().lower(*steps.train_args(64)).as_text())
    dense.append(steps.dense_shape())
  assert texts[0] == texts[1]
  assert dense[0][0] == 256 and dense[1][0] == 384


# --- multi-host, multi-slice, the command line ------------------------------------------------------------

def _run(args, timeout=900):
  cmd = [sys.executable, '-m', 'vggjax.plan', '--config=configs/vgg11.py', *CLI_NARROW, *args]
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_multi_host_slice_all_steps(tmp_path):
  """The command on a 4-host v5litepod-16: the train, validation and dense steps, a table, JSON and
  plan.json."""
  r = _run(['--topology=v5litepod-16', '--config.train.global_batch_size=64', '--json',
            f'--workdir={tmp_path}'])
  assert r.returncode == 0, r.stderr[-3000:]
  report = json.loads(r.stdout)
  assert report == json.loads((tmp_path / 'plan.json').read_text())
  assert set(report['steps']) == {'train', 'eval', 'dense'}
  assert all(s['compiles'] and s['fits'] for s in report['steps'].values())
  assert report['target']['hosts'] == 4 and report['input']['per_process_batch'] == 16
  assert report['steps']['dense']['test_scale'] == 32
  sc = report['schedule']  # 74 epochs of ImageNet at 64 images a step
  assert sc['steps'] == math.ceil(74 * 1_281_167 / 64) and sc['chip_hours'] > 0
  assert 'ESTIMATE' in r.stderr and 'memory per chip' in r.stderr  # the table


@pytest.mark.slow
def test_two_slices_cross_dcn():
  report = plan.plan(narrow_config(256), tpu_target('v5litepod-16', num_slices=2),
                     steps_to_plan=('train',))
  train = report['steps']['train']
  assert report['target']['chips'] == 32 and report['target']['hosts'] == 8
  links = {(c['link'], c['kind'], c['participants']) for c in train['collectives']}
  assert ('DCN', 'all-reduce', 2) in links and ('ICI', 'all-reduce', 16) in links
  assert train['estimate']['dcn_s'] > 0


@pytest.mark.slow
def test_impossible_batch_is_reported():
  """524,288 images per chip: libtpu 0.0.52 (the tpu extra's) stops with CompileTimeHbmOom in under a minute;
  0.0.42.1 squeezes it into HBM after 22 minutes (BENCHMARKS.md, "Which libtpu")."""
  r = _run(['--topology=v5litepod-8', '--steps=train', f'--config.train.global_batch_size={8 * 2 ** 19}'])
  assert r.returncode == plan.EXIT_DOES_NOT_FIT, r.stderr[-3000:]
  assert 'OUT OF MEMORY' in r.stdout and 'does not fit' in r.stderr


def test_topology_compiles_leave_the_persistent_cache_alone():
  """A compile-only TPU topology has no client to load a cached executable with: its compiles neither write
  nor read JAX's persistent compilation cache (the session's, tests/conftest.py), so the second compile does
  not warn "Error reading persistent compilation cache entry", and the cache is on again afterwards."""
  import pathlib
  import warnings

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  from vggjax.aot.target import compile_step

  cache = pathlib.Path(jax.config.jax_compilation_cache_dir)
  target = tpu_target('v5litepod-8')
  sharding = NamedSharding(Mesh(np.array(target.devices), ('d',)), PartitionSpec('d'))

  def topology_cache_probe(x):
    return jnp.sin(x) * 2

  fn = jax.jit(topology_cache_probe, in_shardings=sharding, out_shardings=sharding)
  arg = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=sharding)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    for _ in range(2):
      assert compile_step(fn, (arg,), 'probe', target, lambda _: None).ok
  assert not [w for w in caught if 'persistent compilation cache' in str(w.message)]
  assert not list(cache.glob('jit_topology_cache_probe-*'))

  def attached_cache_probe(x):
    return jnp.cos(x) + 1

  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  try:
    jax.jit(attached_cache_probe).lower(jnp.ones(3)).compile()
  finally:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_seconds)
  assert jax.config.jax_enable_compilation_cache and list(cache.glob('jit_attached_cache_probe-*'))


def test_unknown_topology_lists_the_known():
  r = _run(['--topology=v7-8', '--steps=train'], timeout=300)
  assert r.returncode != 0 and 'v5litepod-N' in r.stderr and 'v6e-N' in r.stderr


def test_gpu_without_a_gpu_says_so():
  """`--topology=gpu` compiles on the attached GPUs (JAX's CUDA plugin has no compile-only GPU topology): on a
  machine without one the command says so, with a non-zero exit and no traceback."""
  r = _run(['--topology=gpu', '--steps=train'], timeout=300)
  assert r.returncode != 0, r.stdout[-2000:]
  assert 'needs an attached GPU' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-3000:]
