"""One compiled step's memory, FLOPs and collectives per chip, and its ESTIMATED time: a roofline.

max(FLOPs / peak, HBM bytes / HBM bandwidth) + collectives at link bandwidth (ring all-reduce: 2 (n-1)/n x
bytes / the chip's all-reduce bandwidth; across slices, a hierarchical all-reduce whose DCN part moves each
chip's 1/n_ici share), collectives NOT overlapped with compute (a conservative assumption: XLA can overlap
part of the gradient all-reduce with the backward pass). It is an estimate, never a measurement.
"""

from __future__ import annotations

import re
from typing import Any

from vggjax.aot import analysis, hlo
from vggjax.aot import target as target_lib
from vggjax.aot.analysis import PlanError

# A train step whose compiled FLOPs exceed the model's (the taps inside the image) by more than this
# recomputes activations. Measured on a v5litepod-8: D 1.004; the narrow test net 1.15 (its elementwise work
# is a larger share of a tiny net), 1.54 with model.remat (the forward convolutions done twice).
RECOMPUTE_RATIO = 1.25


def collective_seconds(c: dict, target: target_lib.Target, chips_per_slice: int) -> tuple[float, float]:
  """(ICI seconds, DCN seconds) of one collective entry: ring algorithms at the chip's link bandwidth;
  a DCN-spanning all-reduce as ICI reduce-scatter, DCN all-reduce of 1/n_ici of the bytes, ICI all-gather."""
  ici, dcn = target.ici_bytes_per_s, target.dcn_bytes_per_s
  b, n = c['bytes'], c['participants']
  if not ici:
    return 0.0, 0.0
  factor = {'all-reduce': 2.0, 'all-gather': 1.0, 'reduce-scatter': 1.0, 'all-to-all': 1.0}.get(c['kind'])
  if c['link'] == 'ICI':
    if factor is None:  # collective-permute, broadcast: the bytes cross one link
      return b / ici, 0.0
    return factor * (n - 1) / n * b / ici, 0.0
  s = c['slices_spanned']
  if n == s:  # a host transfer between slices of each chip's shard (the compiler did the ICI part)
    return 0.0, ((factor or 1.0) * (s - 1) / s * b / dcn if dcn else 0.0)
  n_ici = max(1, n // s)  # one collective over chips of several slices: hierarchical
  ici_s = (factor or 1.0) * (n_ici - 1) / n_ici * b / ici if n_ici > 1 else 0.0
  dcn_s = (factor or 1.0) * (s - 1) / s * (b / n_ici) / dcn if dcn else 0.0
  return ici_s, dcn_s


def step_report(step: str, comp: target_lib.Compiled, target: target_lib.Target, *, global_batch: int,
                analytic_flops_per_image: float, state_parts: dict, batch_bytes_per_chip: int,
                image_hw: tuple[int, int], loop_trips: int = 1,
                valid_flops_per_image: float | None = None, step_remat: bool = False) -> dict:
  """Memory, FLOPs, collectives and the roofline estimate of one compiled step (per chip). XLA's cost
  analysis counts the body of a loop once: where the step loops (`loop_trips`: the dense step's flip, the
  train step's accumulation), the estimate scales the compiler's FLOPs and bytes by the trip count (which
  also scales the small part outside the loop: an upper bound)."""
  n = target.chips
  per_chip = global_batch // n
  r: dict[str, Any] = {'step': step, 'global_batch': global_batch, 'per_chip_batch': per_chip,
                       'image_hw': list(image_hw), 'compiles': comp.ok, 'compile_s': round(comp.seconds, 1)}
  if not comp.ok:
    r.update(error=comp.error, out_of_memory=comp.oom, fits=False if comp.oom else None)
    return r
  mem = analysis.compiled_memory(comp.compiled)
  if mem is None:
    raise PlanError(f'{target.name}: the compiler gives no memory analysis of the {step} step')
  total, temporaries = target_lib.checked_memory(mem, target, step)
  logical = sum(state_parts.values()) + batch_bytes_per_chip
  r['memory'] = {
      **state_parts, 'batch_bytes': batch_bytes_per_chip,
      'arguments_bytes': mem['argument_bytes'], 'layout_padding_bytes': mem['argument_bytes'] - logical,
      'outputs_bytes': mem['output_bytes'], 'aliased_bytes': mem['alias_bytes'],
      'temporaries_bytes': temporaries, 'compiler_temp_bytes': mem['temp_bytes'],
      'code_bytes': mem['code_bytes'],
      'compiler_peak_bytes': mem.get('peak_bytes'), 'total_bytes': total, 'hbm_bytes': target.hbm_bytes}
  fits = total <= target.hbm_bytes if target.hbm_bytes else None
  r['fits'] = fits
  r['short_by_bytes'] = max(0, total - target.hbm_bytes) if target.hbm_bytes else None
  cost = analysis.cost(comp.compiled)
  flops = cost.get('flops')
  analytic = analytic_flops_per_image * per_chip
  valid = valid_flops_per_image * per_chip if valid_flops_per_image else None
  r['flops'] = {'compiler_per_chip': flops, 'analytic_per_chip': analytic,
                'compiler_over_analytic': (flops / analytic) if flops and analytic else None,
                'analytic_valid_taps_per_chip': valid,
                'compiler_over_valid_taps': (flops / valid) if flops and valid else None}
  over = r['flops']['compiler_over_valid_taps']
  if step == 'train' and over and over > RECOMPUTE_RATIO and loop_trips == 1:
    # More FLOPs than the model's: the compiler recomputes activations (model.remat, or its own
    # rematerialisation when the activations do not fit; libtpu 0.0.42.1 squeezes into HBM batches that
    # 0.0.52 rejects). The step fits only by recomputing, and the estimate below includes the recomputation.
    r['recomputes'] = {'compiler_over_model_flops': over, 'model_remat': step_remat}
  hbm_bytes = cost.get('bytes accessed')
  r['hbm_bytes_accessed_per_chip'] = hbm_bytes
  try:
    text = comp.compiled.as_text() or ''
  except Exception as e:  # noqa: BLE001  XLA could not print this program (libtpu 0.0.52, VGG-A at 4,096 per
    text = None           # v5p chip: a RET_CHECK on an async-update instruction); the compile itself is fine
    r['collectives_note'] = (
        f'the compiled program\'s text could not be read ({str(e).splitlines()[0][:200]}); its collectives '
        'are taken to be the data-parallel step\'s gradient all-reduce of the float32 parameters')
  trips = loop_trips if (loop_trips > 1 and (text is None or re.search(r'\swhile\(', text))) else 1
  if trips > 1:
    r['flops']['loop_trips'] = trips  # the compiler's figures count one trip of the loop
  if text is not None:
    coll = hlo.collectives(text, target.chips_per_slice, n)
  elif n > 1:
    spans = max(1, n // target.chips_per_slice)
    coll = [{'kind': 'all-reduce', 'link': 'DCN' if spans > 1 else 'ICI', 'participants': n,
             'slices_spanned': spans, 'count': 1, 'bytes': state_parts['parameters_bytes'],
             'source': 'analytic: the compiled text was unreadable'}]
  else:
    coll = []
  ici_s = dcn_s = 0.0
  for c in coll:
    a, b = collective_seconds(c, target, target.chips_per_slice)
    c['estimated_s'] = a + b
    ici_s, dcn_s = ici_s + a, dcn_s + b
  r['collectives'] = coll
  est = None
  if target.peak_flops and (flops or analytic):
    compute_s = (trips * flops if flops else analytic) / target.peak_flops
    memory_s = trips * hbm_bytes / target.hbm_bytes_per_s if (hbm_bytes and target.hbm_bytes_per_s) else 0.0
    step_s = max(compute_s, memory_s) + ici_s + dcn_s
    est = {'kind': 'estimate (roofline; not a measurement)', 'compute_s': compute_s, 'hbm_s': memory_s,
           'ici_s': ici_s, 'dcn_s': dcn_s, 'step_s': step_s,
           'bound': 'compute' if compute_s >= memory_s else 'HBM bandwidth',
           'images_per_s_per_chip': per_chip / step_s,
           'images_per_s_per_slice': per_chip * target.chips_per_slice / step_s,
           'images_per_s': global_batch / step_s,
           'mfu': analytic / (step_s * target.peak_flops)}
  r['estimate'] = est
  return r
