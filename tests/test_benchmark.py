"""The benchmark harness: its arithmetic (vggjax.metrology), its clock discipline, the peak table
(vggjax.hardware), the CLI's JSON, the memory search, and the PyTorch reference's step (one tiny step)."""

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, fast_compile_env, reference_module, subprocess_env

from vggjax import benchmark as vb
from vggjax import hardware, metrology

# A tiny net: vgg11 at width 1/64 (convs 1, 2, 4, 4, 8, 8, 8, 8 wide), fc6/fc7 16 wide, 10 classes, 32 px.
TINY = ['--model=vgg11', '--width=0.015625', '--fc-features=16', '--num-classes=10', '--image-size=32']
# Its forward MACs by hand (h*w*k*k*cin*cout per conv; pools halve h and w; fc6 spans the 1x1 map):
# conv1_1 32*32*9*3*1 = 27648, conv2_1 16*16*9*1*2 = 4608, conv3_1 8*8*9*2*4 = 4608, conv3_2 8*8*9*4*4 = 9216,
# conv4_1 4*4*9*4*8 = 4608, conv4_2 4*4*9*8*8 = 9216, conv5_1 2*2*9*8*8 = 2304, conv5_2 2304,
# fc6 8*16 = 128, fc7 16*16 = 256, fc8 16*10 = 160.
TINY_MACS = 27648 + 4608 + 4608 + 9216 + 4608 + 9216 + 2304 + 2304 + 128 + 256 + 160  # 65056
TINY_OPTIONS = dict(num_classes=10, width=1 / 64, fc_features=16)
# Compilation with LLVM's cheap settings: these tests check the harness, not the speed.
FAST_COMPILE = fast_compile_env()


def test_flops_and_mfu_on_a_hand_computed_case():
  per_image = metrology.train_flops_per_image('vgg11', 32, **TINY_OPTIONS)
  assert per_image == 3 * 2 * TINY_MACS == 390336
  # 100 images in 10 ms on 2 devices of 0.01 TFLOP/s peak each.
  t = metrology.throughput(per_image, batch=100, step_time_s=0.01, peak_per_device=0.01, num_devices=2)
  assert t['images_per_s'] == pytest.approx(10000.0)
  assert t['tflops'] == pytest.approx(390336 * 100 / 0.01 / 1e12)  # 3.90336e-3
  assert t['tflops_per_device'] == pytest.approx(1.95168e-3)
  assert t['mfu'] == pytest.approx(0.195168)
  assert metrology.throughput(per_image, 100, 0.01, None, 2)['mfu'] is None
  # Dense evaluation at 64 px: 4x the pixels in every conv, and a 2x2 score map: fc6-fc8 run at 4 cells.
  assert metrology.eval_flops_per_image('vgg11', 64, 32, **TINY_OPTIONS) == 2 * 4 * TINY_MACS


def test_vgg16_flops_match_the_published_count():
  # VGG-16 at 224: 15.47 GMACs per forward pass (the figure torchvision publishes), 3x for training.
  per_image = metrology.train_flops_per_image('vgg16', 224)
  assert per_image / 6 == pytest.approx(15.47e9, rel=2e-3)
  # 2000 img/s on one H100 SXM in bf16 is 185.6 TFLOP/s, 18.8% of 989.4.
  peak, label = hardware.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16')
  t = metrology.throughput(per_image, 256, 256 / 2000, peak, 1)
  assert label == 'H100 SXM' and t['tflops'] == pytest.approx(per_image * 2000 / 1e12)
  assert t['mfu'] == pytest.approx(per_image * 2000 / 1e12 / 989.4)


@pytest.mark.parametrize('kind, dtype, expected', [
    ('NVIDIA H100 80GB HBM3', 'bfloat16', (989.4, 'H100 SXM')),
    ('NVIDIA H100 PCIe', 'bfloat16', (756.0, 'H100 PCIe')),
    ('NVIDIA H100 NVL', 'float32', (417.5, 'H100 NVL')),
    ('NVIDIA H200', 'bfloat16', (989.4, 'H200')),
    ('NVIDIA GH200 480GB', 'bfloat16', (989.4, 'GH200')),
    ('NVIDIA A100-SXM4-40GB', 'bfloat16', (312.0, 'A100')),
    ('NVIDIA A100 80GB PCIe', 'float32', (156.0, 'A100')),
    ('NVIDIA L4', 'bfloat16', (121.0, 'L4')),
    ('NVIDIA L40S', 'bfloat16', (362.0, 'L40S')),
    ('NVIDIA A10', 'bfloat16', (125.0, 'A10')),
    ('Tesla V100-SXM2-16GB', 'bfloat16', (125.0, 'V100')),
    ('Tesla T4', 'float32', (8.1, 'T4')),
    ('TPU v4', 'bfloat16', (275.0, 'TPU v4')),
    ('TPU v5 lite', 'bfloat16', (197.0, 'TPU v5e')),
    ('TPU v5e', 'bfloat16', (197.0, 'TPU v5e')),
    ('TPU v5', 'bfloat16', (459.0, 'TPU v5p')),
    ('TPU v5p', 'bfloat16', (459.0, 'TPU v5p')),
    ('TPU v6 lite', 'bfloat16', (918.0, 'TPU v6e')),
    ('TPU v3', 'bfloat16', (61.5, 'TPU v3 (per core)')),
    ('cpu', 'bfloat16', (None, None)),
    ('NVIDIA A10G', 'bfloat16', (None, None)),
])
def test_peak_table(kind, dtype, expected):
  assert hardware.peak_tflops(kind, dtype) == expected


def test_peak_table_rejects_unknown_dtype():
  with pytest.raises(ValueError, match='dtype'):
    hardware.peak_tflops('NVIDIA H100', 'float16')


def test_time_steps_excludes_warmup_and_syncs_before_reading_the_clock(monkeypatch):
  clock = {'now': 0.0, 'pending': 0.0}
  durations = iter([5.0, 5.0] + [1.0, 1.0, 3.0, 3.0, 2.0, 2.0])  # 2 warm-up steps (compilation), 3 x 2

  def run():  # dispatch is instantaneous; the device work completes only at sync
    clock['pending'] += next(durations)
    return 'out'

  syncs = []

  def sync(out):
    assert out == 'out'
    syncs.append(clock['pending'])
    clock['now'] += clock['pending']
    clock['pending'] = 0.0

  monkeypatch.setattr(metrology.time, 'perf_counter', lambda: clock['now'])
  timing = metrology.time_steps(run, sync, steps=2, repeats=3, warmup=2)
  assert timing.warmup_s == [5.0, 5.0]
  assert timing.per_step == [1.0, 3.0, 2.0]
  assert timing.median == 2.0
  assert len(syncs) == 5  # after each warm-up step and after each repeat
  d = timing.to_dict()
  assert (d['step_time_s'], d['step_time_min_s'], d['step_time_max_s'], d['repeats']) == (2.0, 1.0, 3.0, 3)
  with pytest.raises(ValueError):
    metrology.time_steps(run, sync, steps=0, repeats=1, warmup=0)


TRAIN_FIELDS = {'step_time_s', 'step_time_min_s', 'step_time_max_s', 'step_times_s', 'steps', 'repeats',
                'warmup_step_s', 'compile_s', 'images_per_s', 'tflops', 'tflops_per_device', 'mfu',
                'gflops_per_image', 'xla_gflops_per_image', 'peak_memory_bytes', 'memory_limit_bytes',
                'compiled_memory', 'final_loss', 'cpu_time_per_step_s'}
TOP_FIELDS = {'framework', 'framework_version', 'backend', 'device_kind', 'device_count', 'process_count',
              'cpu_count', 'peak_tflops_per_device', 'peak_source', 'date', 'model', 'width', 'fc_features',
              'num_classes', 'image_size', 'dtype', 'batch', 'per_device_batch', 'remat', 'optimizer', 'train',
              'eval'}


def _run(args, timeout=240, **env):
  proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        env=subprocess_env(**env))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope='module')
def cli_record():
  records = _run(['-m', 'vggjax.benchmark', *TINY, '--batch=4', '--dtype=float32', '--steps=2', '--repeats=2',
                  '--warmup=1', '--eval_size=64', '--peak_tflops=0.5', '--json'], num_devices=2,
                 **FAST_COMPILE)
  assert len(records) == 1
  return records[0]


@pytest.mark.slow
def test_cli_prints_json_with_every_field(cli_record):
  r = cli_record
  assert TOP_FIELDS <= set(r) and TRAIN_FIELDS <= set(r['train'])
  assert (r['framework'], r['backend'], r['device_count'], r['batch'], r['per_device_batch']) == (
      'vggjax', 'cpu', 2, 4, 2)
  t = r['train']
  assert len(t['step_times_s']) == 2 and t['step_time_min_s'] <= t['step_time_s'] <= t['step_time_max_s']
  assert t['images_per_s'] == pytest.approx(4 / t['step_time_s'])
  assert t['gflops_per_image'] == pytest.approx(6 * TINY_MACS / 1e9)
  assert t['tflops'] == pytest.approx(6 * TINY_MACS * 4 / t['step_time_s'] / 1e12)
  assert r['peak_tflops_per_device'] == 0.5 and r['peak_source'] == 'flag'
  assert t['mfu'] == pytest.approx(t['tflops'] / 2 / 0.5)
  assert t['compile_s'] > 0 and len(t['warmup_step_s']) == 1 and math.isfinite(t['final_loss'])
  cm = t['compiled_memory']
  assert cm['total_bytes'] > cm['temp_bytes'] > 0 and cm['alias_bytes'] > 0  # the state is donated
  assert t['xla_gflops_per_image'] > 0
  e = r['eval']
  assert (e['image_size'], e['batch'], e['score_map']) == (64, 4, [2, 2])
  assert e['images_per_s'] == pytest.approx(4 / e['step_time_s'])
  assert e['gflops_per_image'] == pytest.approx(metrology.eval_flops_per_image('vgg11', 64, 32, **TINY_OPTIONS) / 1e9)


@pytest.mark.slow
def test_cli_rejects_a_batch_the_devices_cannot_split():
  proc = subprocess.run([sys.executable, '-m', 'vggjax.benchmark', *TINY, '--batch=3', '--eval_size=0'],
                        cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=subprocess_env(num_devices=2, **FAST_COMPILE))
  assert proc.returncode != 0 and 'multiple of the number of devices' in proc.stderr


def test_dashed_flag_spellings_of_earlier_versions_are_accepted():
  """TINY (dashed, shared with benchmarks/torch_reference.py) reaches vggjax.benchmark's underscore flags."""
  names = {'image_size', 'fc_features', 'remat', 'json'}
  argv = vb.undash(['prog', '--image-size=32', '--fc-features', '16', '--remat', '--json', '--a-b=1'], names)
  assert argv == ['prog', '--image_size=32', '--fc_features', '16', '--remat', '--json', '--a-b=1']


@pytest.mark.slow
def test_max_batch_search_finds_the_edge():
  """--max_batch is the plan's search (vggjax.aot.search) with a probe that compiles on the attached devices:
  with a limit just above the memory at 40 images per device, 40 fits and 48 does not."""
  from vggjax.aot import search
  opts = metrology.Options(model='vgg11', image_size=32, dtype='float32', **TINY_OPTIONS)
  steps = metrology.build_steps(opts)
  at_40 = search.TrainStepProbe.on_attached_devices(steps, 2 ** 40, print, opts.dtype)(40)
  found = metrology.largest_batch(opts, limit_bytes=at_40 + 1, granularity=8)
  assert found['max_per_device_batch'] == 40 and found['exact'] and found['first_not_fitting'] == 48
  assert found['bytes_at_max'] == at_40 and found['probes']['48'] > at_40 + 1
  assert found['bytes_per_image'] > 0 and found['search'][0].startswith('32:')


@pytest.mark.slow
def test_torch_reference_runs_one_step_with_the_same_fields(cli_record):
  reference_module('torch')
  records = _run(['benchmarks/torch_reference.py', *TINY, '--batch=4', '--dtype=float32', '--steps=1',
                  '--repeats=1', '--warmup=1', '--device=cpu', '--json'])
  assert len(records) == 1
  r = records[0]
  assert set(cli_record) - {'xla_flags', 'jax_version'} <= set(r)
  assert set(cli_record['train']) <= set(r['train'])
  assert (r['framework'], r['backend'], r['batch'], r['model']) == ('pytorch', 'cpu', 4, 'vgg11')
  t = r['train']
  assert t['gflops_per_image'] == pytest.approx(cli_record['train']['gflops_per_image'])
  assert t['images_per_s'] == pytest.approx(4 / t['step_time_s']) and math.isfinite(t['final_loss'])
  assert r['torch_config']['channels_last'] and r['torch_config']['threads'] >= 1


def test_torch_reference_narrow_net_matches_the_flop_count():
  torch = reference_module('torch')
  sys.path.insert(0, str(REPO / 'benchmarks'))
  import torch_reference as tr
  net = tr.build_model('vgg11', 10, 1 / 64, 16, 32)
  widths = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
  assert widths == [1, 2, 4, 4, 8, 8, 8, 8]
  # MACs of the convs and linears, counted by hooks on one forward pass.
  macs = []
  hooks = [m.register_forward_hook(lambda m, i, o: macs.append(
      o.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, torch.nn.Conv2d)
      else o.numel() * m.in_features)) for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
  net.eval()(torch.zeros(1, 3, 32, 32))
  for h in hooks:
    h.remove()
  assert sum(macs) == TINY_MACS
