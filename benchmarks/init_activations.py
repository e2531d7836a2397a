"""The reason for the default init std (docs/design.md, decision 16): the RMS of every layer's output at
initialisation, on a real photograph, for the paper's Gaussian init at std 0.01 and at std 0.1 (the text's
"variance 1e-2" read literally).

    python benchmarks/init_activations.py [--model=vgg16] [--stds=0.01,0.1]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_sample_images  # noqa: E402

from vggjax.models import get_model, layer_names  # noqa: E402


def layer_rms(model_name: str, std: float, image: np.ndarray) -> list[tuple[str, float]]:
  model = get_model(model_name, num_classes=1000, init_std=std)
  x = jax.numpy.asarray(image)[None]
  variables = jax.jit(model.init)(jax.random.key(0), x)
  _, state = model.apply(variables, x, capture_intermediates=True, mutable=['intermediates'])
  inter = state['intermediates']
  return [(name, float(np.sqrt(np.mean(np.asarray(inter[name]['__call__'][0], np.float64) ** 2))))
          for name in layer_names(model_name) if name in inter]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--model', default='vgg16')
  p.add_argument('--stds', default='0.01,0.1')
  args = p.parse_args()
  photo = load_sample_images().images[0][:224, :224].astype(np.float32)
  image = photo - np.array([123.68, 116.779, 103.939], np.float32)
  stds = [float(s) for s in args.stds.split(',')]
  table = {std: layer_rms(args.model, std, image) for std in stds}
  print(f'{args.model}: RMS of each layer output at initialisation (input RMS {np.sqrt(np.mean(image**2)):.1f})')
  print('layer    ' + ''.join(f'  std={s:<10g}' for s in stds))
  for i, (name, _) in enumerate(table[stds[0]]):
    print(f'{name:8s} ' + ''.join(f'  {table[s][i][1]:<14.3g}' for s in stds))
  for s in stds:
    rows = table[s]
    per_layer = (rows[-1][1] / rows[0][1]) ** (1 / (len(rows) - 1))
    print(f'std={s:g}: {per_layer:.2f}x per layer on average from {rows[0][0]} to {rows[-1][0]}')


if __name__ == '__main__':
  main()
