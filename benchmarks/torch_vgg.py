"""A plain PyTorch VGG with torchvision's module layout: the independent reference for cross-checks and for
the side-by-side benchmark (benchmarks/torch_reference.py). Needs the ``torch`` extra.

It is written from the paper's Table 1 in torchvision's own notation (numbers are 3x3 convs, 'M' a max
pool, 'C' a 1x1 conv of configuration C), so it shares no code with vggjax.models. Its state dict has
torchvision's keys (features.N, classifier.0/3/6) and loads torchvision's weight files.
"""

from __future__ import annotations

import torch
from torch import nn

CFGS = {
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg13': [64, 64, 'M', 128, 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg16_c': [64, 64, 'M', 128, 128, 'M', 256, 256, 'C256', 'M', 512, 512, 'C512', 'M', 512, 512,
                'C512', 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
    'vgg19': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M', 512, 512, 512,
              512, 'M'],
}


class TorchVGG(nn.Module):
  """torchvision's VGG: features, adaptive average pool to 7x7, classifier (Linear-ReLU-Dropout x2, Linear)."""

  def __init__(self, name: str = 'vgg16', num_classes: int = 1000, dropout: float = 0.5,
               init: str = 'torchvision'):
    super().__init__()
    batch_norm = name.endswith('_bn')
    layers: list[nn.Module] = []
    cin = 3
    for v in CFGS[name.removesuffix('_bn')]:
      if v == 'M':
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        continue
      k = 1 if isinstance(v, str) else 3
      cout = int(v[1:]) if isinstance(v, str) else v
      layers.append(nn.Conv2d(cin, cout, kernel_size=k, padding=k // 2))
      if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
      layers.append(nn.ReLU(inplace=True))
      cin = cout
    self.features = nn.Sequential(*layers)
    self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
    self.classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(p=dropout),
        nn.Linear(4096, num_classes))
    if init == 'torchvision':
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
          nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
          nn.init.ones_(m.weight)
          nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
          nn.init.normal_(m.weight, 0, 0.01)
          nn.init.zeros_(m.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.avgpool(self.features(x))
    return self.classifier(torch.flatten(x, 1))
