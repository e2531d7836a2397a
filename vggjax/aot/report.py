"""The plan's table: the report of ``vggjax.aot.planner.plan`` as text."""

from __future__ import annotations

from vggjax.hardware import GIB


def _gib(b) -> str:
  if b is None:
    return '-'
  return f'{b / GIB:.2f} GiB' if abs(b) >= GIB / 10 else f'{b / 2**20:.1f} MiB'


def _si(x, unit='') -> str:
  if x is None:
    return '-'
  for scale, prefix in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= scale:
      return f'{x / scale:.2f} {prefix}{unit}'
  return f'{x:.0f} {unit}'


def _step_lines(name: str, s: dict, t: dict) -> list[str]:
  """The lines of one compiled step: memory, recomputation, FLOPs, collectives, the estimate."""
  lines = []
  head = (f'\n[{name}] per-chip batch {s["per_chip_batch"]} of {s["image_hw"][0]}x{s["image_hw"][1]} images'
          + (f' (test scale Q={s["test_scale"]})' if 'test_scale' in s else '')
          + f', compiled in {s["compile_s"]} s')
  lines.append(head)
  if not s['compiles']:
    what = 'OUT OF MEMORY at compile time' if s.get('out_of_memory') else 'DOES NOT COMPILE'
    lines.append(f'  {what} for {t["name"]}: {s["error"].splitlines()[0][:400]}')
    return lines
  mm = s['memory']
  verdict = ('fits' if s['fits'] else f'DOES NOT FIT: short by {_gib(s["short_by_bytes"])}') \
      if s['fits'] is not None else 'HBM unknown'
  lines.append(f'  memory per chip: parameters {_gib(mm["parameters_bytes"])}'
               + (f', optimizer state {_gib(mm["optimizer_state_bytes"])}'
                  if 'optimizer_state_bytes' in mm else '')
               + f', batch {_gib(mm["batch_bytes"])}, all arguments {_gib(mm["arguments_bytes"])}, '
               f'temporaries {_gib(mm["temporaries_bytes"])}, code {_gib(mm["code_bytes"])}; '
               f'total {_gib(mm["total_bytes"])} of {_gib(mm["hbm_bytes"])} HBM: {verdict}')
  rc = s.get('recomputes')
  if rc:
    lines.append(f'  RECOMPUTES: the compiled step does {rc["compiler_over_model_flops"]:.2f}x the model\'s '
                 'FLOPs: it fits only by recomputing activations ('
                 + ('model.remat is on' if rc['model_remat'] else
                    'the compiler\'s own rematerialisation: model.remat is off; the activations of this '
                    'batch '
                    'do not fit without it') + '); the estimate includes the recomputation')
  f = s['flops']
  ratio = f['compiler_over_analytic']
  valid = f.get('compiler_over_valid_taps')
  lines.append(f'  FLOPs per chip per step: compiler {_si(f["compiler_per_chip"])}, analytic '
               f'{_si(f["analytic_per_chip"])}' + (f' (compiler/analytic {ratio:.3f}' if ratio else ' (')
               + (f', compiler/analytic without padding taps {valid:.3f}' if valid else '') + ')'
               + (f' [the compiler counts 1 of {f["loop_trips"]} loop trips]'
                  if f.get('loop_trips') else '')
               + f'; HBM bytes accessed {_si(s["hbm_bytes_accessed_per_chip"], "B")}')
  if s['collectives']:
    coll = '; '.join(f'{c["count"]} {c["kind"]} over {c["participants"]} chips on {c["link"]}, '
                     f'{_si(c["bytes"], "B")}' for c in s['collectives'])
    lines.append(f'  collectives: {coll}'
                 + (f' (ASSUMED: {s["collectives_note"]})' if s.get('collectives_note') else ''))
  else:
    lines.append('  collectives: none')
  e = s.get('estimate')
  if e:
    lines.append(f'  ESTIMATE (roofline, not measured): step {1e3 * e["step_s"]:.1f} ms (compute '
                 f'{1e3 * e["compute_s"]:.1f}, HBM {1e3 * e["hbm_s"]:.1f}, ICI {1e3 * e["ici_s"]:.2f}, DCN '
                 f'{1e3 * e["dcn_s"]:.2f}; {e["bound"]}-bound): {e["images_per_s_per_chip"]:.0f} images/s '
                 f'per chip, {e["images_per_s_per_slice"]:.0f} per slice, {e["images_per_s"]:.0f} in all; '
                 f'MFU {100 * e["mfu"]:.0f}%')
  return lines


def _max_batch_lines(r: dict) -> list[str]:
  """The largest batch found by the search, or the estimate from one compile."""
  lines = []
  mb = r.get('max_batch')
  if mb:
    b = mb['max_per_chip_batch']
    if b:
      acc = mb.get('accumulate_steps_for_config_batch', 1)
      lines.append(f'\nlargest per-chip batch whose train step fits ({mb["dtype"]}'
                   f'{", remat" if mb["remat"] else ", no remat"}): {b} '
                   f'(global {mb["global_batch_at_max"]}); '
                   + (f'{mb["first_not_fitting"]} does not fit' if mb['first_not_fitting'] else
                      f'larger batches were not tried (the search stops at --max_batch_limit='
                      f'{mb.get("limit", 4096)})')
                   + ('' if mb.get('exact', True) else
                      f'; NOT the exact edge: {mb["search"][-1]} (the search\'s compiles ran out)')
                   + ''.join(f'\n  at that batch: {ts["memory"]["total_bytes"] / GIB:.2f} GiB per chip; '
                             f'ESTIMATE {ts["estimate"]["images_per_s"]:,.0f} images/s, MFU '
                             f'{100 * ts["estimate"]["mfu"]:.0f}%' for ts in [mb.get('train_step')]
                             if ts and ts.get('estimate'))
                   + ''.join(f'; {sc["epochs"]} epochs: {sc["days"]:.2f} days, '
                             f'{sc["chip_hours"]:,.0f} chip-hours (ESTIMATE)' for sc in [mb.get('schedule')]
                             if sc)
                   + (f'; the config\'s batch {r["global_batch"]} needs train.accumulate_steps={acc}'
                      if acc > 1 else ''))
    else:
      lines.append('\nno per-chip batch fits: even 1 image per chip needs more than the HBM')
  mbe = r.get('max_batch_estimate')
  if mbe and not mb:
    b, acc = mbe['per_chip_batch'], mbe['accumulate_steps_for_config_batch'] or 1
    if b:
      lines.append(f'\nthe train step does not fit: about {b} images per chip would ({mbe["kind"]})'
                   + (f'; the config\'s batch then needs train.accumulate_steps={acc}' if acc > 1 else ''))
    else:
      lines.append('\nthe train step does not fit even without its batch (parameters, optimizer state, code)')
  return lines


def format_report(r: dict) -> str:
  t, m = r['target'], r['model']
  remat = ', remat' if m['remat'] else ''
  lines = [f'plan: {m["name"]} ({m["parameters"]:,} parameters, {m["dtype"]}{remat}) '
           f'on {t["name"]}, {t["chips"]} chips ({t["device_kind"]}), global batch {r["global_batch"]}'
           + (f' in {r["accumulate_steps"]} accumulation steps' if r['accumulate_steps'] > 1 else '')
           + (f'; compiled by libtpu {r["libtpu_version"]}' if r.get('libtpu_version') else '')]
  for name, s in r['steps'].items():
    lines += _step_lines(name, s, t)
  lines += _max_batch_lines(r)
  sc = r.get('schedule')
  if sc:
    lines.append(f'\nschedule (ESTIMATE): {sc["steps"]:,} steps'
                 + (f' ({sc["epochs"]} epochs of {sc["train_examples"]:,} images)' if sc['epochs'] else '')
                 + f': {sc["days"]:.2f} days wall-clock, {sc["chip_hours"]:,.0f} chip-hours')
  i = r['input']
  line = (f'hosts {i["hosts"]} ({i["chips_per_host"]} chips each), one process per host, per-process batch '
          f'{i["per_process_batch"]}')
  if 'images_per_s_per_host' in i:
    line += (f'; input per host {i["images_per_s_per_host"]:.0f} images/s (estimate) = '
             f'{i["cores_per_host"]:.1f} cores at {i["pipeline_images_per_core_s"]:.0f} images/s per core')
  lines.append(line)
  lines.append('assumptions: ' + '; '.join(r['assumptions']))
  return '\n'.join(lines)
