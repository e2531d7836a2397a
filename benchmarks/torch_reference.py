"""The vggjax train step in PyTorch, for side-by-side figures: the same network, batch, size and optimizer.

    python benchmarks/torch_reference.py --model=vgg16 --batch=128,256 --dtype=bfloat16 --json
    python benchmarks/torch_reference.py --model=vgg16 --batch=256 --dtype=bfloat16 --compile --json
    python benchmarks/torch_reference.py --model=vgg16 --batch=8 --dtype=float32 --device=cpu

One step does what vggjax.train's does: uint8 NHWC images on the device are cast, shifted by AlexNet's PCA
colour noise and mean-subtracted inside the step; the network is benchmarks/torch_vgg.py (torchvision's
layout, the paper's Table 1) in training mode (dropout on); cross-entropy; SGD with momentum 0.9 and L2 5e-4
on weights only (as vggjax's optimizer), lr 0.01. It runs in PyTorch's best configuration for the device:

* GPU: bf16 autocast (``--dtype=bfloat16``; float32 runs allow TF32, as XLA does by default),
  channels_last memory format, cudnn.benchmark, the fused SGD, and ``--compile`` for torch.compile;
* CPU: channels_last (oneDNN's preferred layout), one intra-op thread per core, bf16 autocast if asked.

Timing and output are vggjax.benchmark's: warm-up steps excluded (the first, with cuDNN autotuning or
torch.compile, is reported as ``compile_s``), medians over repeats of back-to-back steps, the device
synchronised before the clock is read, the same JSON fields. Narrow nets (``--width``) and other sizes use
the same layer table with the classifier of vggjax's fully convolutional net at the training size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import sys
from typing import Sequence

# vggjax.models is used only for the analytic FLOP count: keep JAX off the accelerator.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from vggjax import benchmark as vb  # noqa: E402
from vggjax.preprocessing import IMAGENET_EIGVAL, IMAGENET_EIGVEC, IMAGENET_MEAN_RGB  # noqa: E402
from benchmarks.torch_vgg import CFGS, TorchVGG  # noqa: E402


def _scaled(features: int, width: float) -> int:
  return max(1, int(round(features * width)))


class NarrowTorchVGG(nn.Module):
  """TorchVGG's layer table at another width or size, with vggjax's classifier at the training size: fc6
  spans the final (size // 32) feature map, so both frameworks count the same FLOPs."""

  def __init__(self, name: str, num_classes: int, width: float, fc_features: int, image_size: int,
               dropout: float = 0.5):
    super().__init__()
    layers: list[nn.Module] = []
    cin = 3
    for v in CFGS[name.removesuffix('_bn')]:
      if v == 'M':
        layers.append(nn.MaxPool2d(2, 2))
        continue
      k = 1 if isinstance(v, str) else 3
      cout = _scaled(int(v[1:]) if isinstance(v, str) else v, width)
      layers.append(nn.Conv2d(cin, cout, k, padding=k // 2))
      if name.endswith('_bn'):
        layers.append(nn.BatchNorm2d(cout))
      layers.append(nn.ReLU(inplace=True))
      cin = cout
    self.features = nn.Sequential(*layers)
    self.k6 = max(1, image_size // 32)
    fc = fc_features or _scaled(4096, width)
    self.classifier = nn.Sequential(
        nn.Linear(cin * self.k6 * self.k6, fc), nn.ReLU(True), nn.Dropout(dropout),
        nn.Linear(fc, fc), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(fc, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.features(x)
    x = x[:, :, :self.k6, :self.k6]  # the training size: the map is exactly k6 x k6
    return self.classifier(torch.flatten(x, 1))


def init_like_vggjax(model: nn.Module, std: float = 0.01) -> nn.Module:
  """vggjax's default ('paper') init: weights N(0, std), biases 0. With torchvision's He init, VGG16 on
  mean-subtracted 0-255 pixels (vggjax's input) overflows to a NaN loss; both frameworks then time the
  same finite arithmetic."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, (nn.Conv2d, nn.Linear)):
        m.weight.normal_(0.0, std)
        m.bias.zero_()
  return model


def build_model(name: str, num_classes: int, width: float, fc_features: int, image_size: int) -> nn.Module:
  from vggjax import models
  name = models.canonical_name(name)
  if name.removesuffix('_bn') not in CFGS:
    raise SystemExit(f'the PyTorch reference has no {name} (it has {", ".join(CFGS)} and their _bn variants)')
  if width == 1.0 and fc_features in (0, 4096) and image_size == 224:
    return init_like_vggjax(TorchVGG(name, num_classes=num_classes))
  return init_like_vggjax(NarrowTorchVGG(name, num_classes, width, fc_features, image_size))


def device_kind(device: torch.device) -> str:
  if device.type == 'cuda':
    return torch.cuda.get_device_name(device)
  return f'cpu ({vb.cpu_name()})'


def _sync(device: torch.device):
  if device.type == 'cuda':
    return lambda _: torch.cuda.synchronize(device)
  return lambda _: None


def make_step(model: nn.Module, device: torch.device, *, bf16: bool, channels_last: bool,
              color_shift: float = 0.1, compile_model: bool = False, compile_mode: str = 'default'):
  """(images uint8 NHWC, labels) -> loss, one SGD step; the optimizer as vggjax's (L2 on weights only)."""
  decay = [p for p in model.parameters() if p.ndim > 1]
  no_decay = [p for p in model.parameters() if p.ndim <= 1]
  groups = [{'params': decay, 'weight_decay': 5e-4}, {'params': no_decay, 'weight_decay': 0.0}]
  try:
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9, fused=True)
    fused = True
  except (RuntimeError, TypeError, ValueError):
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    fused = False
  if compile_model:
    torch._dynamo.reset()  # a fresh static-shape graph per batch size (no automatic dynamic shapes)
    forward = torch.compile(model, mode=compile_mode, dynamic=False)
  else:
    forward = model
  mean = torch.tensor(IMAGENET_MEAN_RGB, device=device)
  eig = torch.tensor(IMAGENET_EIGVAL, device=device)
  vec = torch.tensor(IMAGENET_EIGVEC, device=device)

  def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    x = images.float()
    if color_shift:
      alpha = color_shift * torch.randn(x.shape[0], 3, device=device)
      x = x + ((alpha * eig) @ vec.T)[:, None, None, :]
    x = (x - mean).permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: exactly the channels_last layout
    if not channels_last:
      x = x.contiguous()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
      logits = forward(x)
    loss = F.cross_entropy(logits.float(), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  return step, {'fused_sgd': fused}


def run(args, batch: int, device: torch.device) -> dict:
  torch.manual_seed(args.seed)
  bf16 = args.dtype == 'bfloat16'
  model = build_model(args.model, args.num_classes, args.width, args.fc_features, args.image_size)
  model = model.to(device).train()
  channels_last = not args.no_channels_last
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  step, extra = make_step(model, device, bf16=bf16, channels_last=channels_last,
                          color_shift=args.color_shift, compile_model=args.compile,
                          compile_mode=args.compile_mode)
  g = torch.Generator().manual_seed(args.seed)
  images = torch.randint(0, 256, (batch, args.image_size, args.image_size, 3), generator=g,
                         dtype=torch.uint8).to(device)
  labels = torch.randint(0, args.num_classes, (batch,), generator=g).to(device)
  if device.type == 'cuda':
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
  timing = vb.time_steps(lambda: step(images, labels), _sync(device), steps=args.steps,
                         repeats=args.repeats, warmup=max(1, args.warmup))
  loss = float(step(images, labels).detach())
  peak_mem = limit = None
  if device.type == 'cuda':
    peak_mem = int(torch.cuda.max_memory_allocated(device))
    limit = int(torch.cuda.get_device_properties(device).total_memory)
  kind = device_kind(device)
  peak, label = (args.peak_tflops, 'flag') if args.peak_tflops else vb.peak_tflops(kind, args.dtype)
  if device.type == 'cpu' and not args.peak_tflops:
    peak, label = None, None
  opts = dict(num_classes=args.num_classes, width=args.width, fc_features=args.fc_features or None)
  flops_img = vb.train_flops_per_image(args.model, args.image_size, **opts)
  t = timing.to_dict()
  return {
      'framework': 'pytorch', 'framework_version': torch.__version__, 'backend': 'gpu' if device.type == 'cuda'
      else 'cpu', 'device_kind': kind, 'device_count': 1, 'process_count': 1, 'cpu_count': os.cpu_count(),
      'peak_tflops_per_device': peak, 'peak_source': label,
      'torch_config': {'channels_last': channels_last, 'autocast_bf16': bf16, 'compile': args.compile,
                       'compile_mode': args.compile_mode if args.compile else None,
                       'cudnn_benchmark': torch.backends.cudnn.benchmark if device.type == 'cuda' else None,
                       'tf32': torch.backends.cuda.matmul.allow_tf32 if device.type == 'cuda' else None,
                       'threads': torch.get_num_threads(), **extra},
      'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ'),
      'model': args.model, 'width': args.width, 'fc_features': args.fc_features or None,
      'num_classes': args.num_classes, 'image_size': args.image_size, 'dtype': args.dtype, 'batch': batch,
      'per_device_batch': batch, 'remat': False, 'optimizer': 'SGD 0.9, L2 5e-4 on weights, lr 0.01',
      'train': {**t, 'compile_s': timing.warmup_s[0],
                **vb.throughput(flops_img, batch, timing.median, peak, 1),
                'gflops_per_image': flops_img / 1e9, 'xla_gflops_per_image': None,
                'peak_memory_bytes': peak_mem, 'memory_limit_bytes': limit, 'compiled_memory': None,
                'final_loss': loss},
      'eval': None}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--model', default='vgg16')
  p.add_argument('--batch', type=vb._batches, default=[256], help='batch; several separated by commas')
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--dtype', choices=vb.DTYPES, default='bfloat16', help='bfloat16: autocast')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--width', type=float, default=1.0)
  p.add_argument('--fc-features', type=int, default=0)
  p.add_argument('--steps', type=int, default=10)
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--warmup', type=int, default=2, help='untimed steps (at least 1)')
  p.add_argument('--color-shift', type=float, default=0.1)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto')
  p.add_argument('--compile', action='store_true', help='torch.compile the network')
  p.add_argument('--compile-mode', default='default', help='torch.compile mode (default, max-autotune, ...)')
  p.add_argument('--no-channels-last', action='store_true', help='keep NCHW (contiguous) tensors')
  p.add_argument('--threads', type=int, default=0, help='CPU intra-op threads (0: one per core)')
  p.add_argument('--peak-tflops', type=float, default=0.0)
  p.add_argument('--json', action='store_true', help='one JSON object per configuration on stdout')
  p.add_argument('--out', default='', help='also append the JSON objects to this file (one per line)')
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if args.device == 'auto':
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  else:
    device = torch.device(args.device)
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  else:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
  for b in args.batch:
    record = run(args, b, device)
    print(vb.summary(record), file=sys.stderr if args.json else sys.stdout, flush=True)
    line = json.dumps(record)
    if args.json:
      print(line, flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(line + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
