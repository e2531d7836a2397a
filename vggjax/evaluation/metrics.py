"""Top-k errors and the fusion of several models' posteriors (host side)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

def topk_hits(posteriors: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Whether each label is among the k highest posteriors. Classes are ranked by decreasing posterior, ties
  by increasing class index (as jax.lax.top_k, which validation during training uses)."""
  posteriors = np.asarray(posteriors)
  labels = np.asarray(labels, np.int64)
  if len(labels) == 0:
    return np.zeros((0,), bool)
  true = posteriors[np.arange(len(labels)), labels][:, None]
  before = np.arange(posteriors.shape[1])[None, :] < labels[:, None]
  rank = np.sum(posteriors > true, axis=1) + np.sum((posteriors == true) & before, axis=1)
  return rank < k


def topk_error(posteriors: np.ndarray, labels: np.ndarray, k: int) -> float:
  """The fraction of images whose label is not among the k highest posteriors."""
  hits = topk_hits(posteriors, labels, k)
  return float(1.0 - hits.mean()) if len(hits) else float('nan')


def fuse(posteriors: Sequence[np.ndarray]) -> np.ndarray:
  """Fusion of several models (4.4): the average of their softmax posteriors."""
  if not posteriors:
    raise ValueError('fusion needs at least one model')
  return np.mean(np.stack([np.asarray(p, np.float32) for p in posteriors]), axis=0)
