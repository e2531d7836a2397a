"""One table from the JSON lines of vggjax.benchmark and benchmarks/torch_reference.py (what gpu.sh prints).

    python benchmarks/summarize.py RESULTS_DIR            # reads RESULTS_DIR/*.jsonl, writes summary.md/.json

Rows: one per (model, dtype, image size, batch). vggjax's figure is its plain run (no remat); PyTorch's is
its best configuration among those run (eager or torch.compile), named in the row. The ratio is vggjax's
images/s over PyTorch's best. Below the table: remat's cost, the largest batch, the dense eval.
"""

from __future__ import annotations

import glob
import json
import math
import os
import sys

GIB = 1024 ** 3


def load(directory: str) -> list[dict]:
  records = []
  for path in sorted(glob.glob(os.path.join(directory, '*.jsonl'))):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if line.startswith('{'):
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError:
            pass  # a line cut by a timeout
  return records


def _gib(n) -> str:
  return '-' if n is None else f'{n / GIB:.1f} GiB'


def _pct(x) -> str:
  return '-' if x is None else f'{100 * x:.1f}%'


def _torch_mode(r: dict) -> str:
  c = r.get('torch_config') or {}
  return 'compile' if c.get('compile') else 'eager'


def summarize(records: list[dict]) -> dict:
  key = lambda r: (r['model'], r['dtype'], r['image_size'], r['batch'])  # noqa: E731
  rows: dict[tuple, dict] = {}
  for r in records:
    if 'train' not in r:
      continue
    row = rows.setdefault(key(r), {'model': r['model'], 'dtype': r['dtype'], 'image_size': r['image_size'],
                                   'batch': r['batch']})
    t = r['train']
    if r['framework'] == 'vggjax' and r.get('remat'):
      row['vggjax_remat'] = {'images_per_s': t['images_per_s'], 'mfu': t['mfu'],
                             'peak_memory_bytes': t['peak_memory_bytes']}
    elif r['framework'] == 'vggjax':
      row['vggjax'] = {'images_per_s': t['images_per_s'], 'mfu': t['mfu'],
                       'peak_memory_bytes': t['peak_memory_bytes'], 'compile_s': t['compile_s'],
                       'device_kind': r['device_kind'], 'device_count': r['device_count'],
                       'version': r.get('jax_version')}
      if r.get('eval'):
        row['eval'] = {k: r['eval'][k] for k in ('image_size', 'batch', 'images_per_s', 'mfu', 'score_map')}
    elif r['framework'] == 'pytorch':
      mode = _torch_mode(r)
      row.setdefault('pytorch_all', {})[mode] = {
          'images_per_s': t['images_per_s'], 'mfu': t['mfu'], 'peak_memory_bytes': t['peak_memory_bytes'],
          'compile_s': t['compile_s'], 'device_kind': r['device_kind'], 'version': r['framework_version']}
  for row in rows.values():
    if row.get('pytorch_all'):
      mode, best = max(row['pytorch_all'].items(), key=lambda kv: kv[1]['images_per_s'])
      row['pytorch'] = {**best, 'mode': mode}
    if row.get('vggjax') and row.get('pytorch'):
      row['ratio'] = row['vggjax']['images_per_s'] / row['pytorch']['images_per_s']
    if row.get('vggjax') and row.get('vggjax_remat'):
      row['remat_cost'] = 1 - row['vggjax_remat']['images_per_s'] / row['vggjax']['images_per_s']
  memory = [{'remat': r['remat'], 'model': r['model'], 'dtype': r['dtype'], 'image_size': r['image_size'],
             'device_kind': r['device_kind'], **r['max_batch']} for r in records if 'max_batch' in r]
  kinds = sorted({r['device_kind'] for r in records if 'device_kind' in r})
  nonfinite = [f"{r['framework']} batch {r['batch']}{' remat' if r.get('remat') else ''}"
               for r in records if 'train' in r and not math.isfinite(r['train'].get('final_loss', 0.0))]
  return {'devices': kinds, 'rows': [rows[k] for k in sorted(rows)], 'max_batch': memory,
          'nonfinite_loss': nonfinite}


def table(summary: dict) -> str:
  out = [f"devices: {', '.join(summary['devices']) or '-'}", '',
         '| model | dtype | size | batch | vggjax img/s | MFU | peak mem | PyTorch img/s (best) | MFU | '
         'peak mem | ratio |',
         '|---|---|---|---|---|---|---|---|---|---|---|']
  for row in summary['rows']:
    v, p = row.get('vggjax') or {}, row.get('pytorch') or {}
    out.append(
        f"| {row['model']} | {row['dtype']} | {row['image_size']} | {row['batch']} | "
        f"{v.get('images_per_s', 0):.1f} | {_pct(v.get('mfu'))} | {_gib(v.get('peak_memory_bytes'))} | "
        + (f"{p['images_per_s']:.1f} ({p['mode']}) | {_pct(p.get('mfu'))} | {_gib(p.get('peak_memory_bytes'))} | "
           if p else '- | - | - | ')
        + (f"{row['ratio']:.2f}x |" if 'ratio' in row else '- |'))
  notes = []
  for row in summary['rows']:
    for mode, p in sorted((row.get('pytorch_all') or {}).items()):
      notes.append(f"PyTorch {mode} at batch {row['batch']}: {p['images_per_s']:.1f} img/s "
                   f"(first step {p['compile_s']:.1f} s)")
    if 'vggjax' in row:
      notes.append(f"vggjax compile at batch {row['batch']}: {row['vggjax']['compile_s']:.1f} s")
    if 'remat_cost' in row:
      r = row['vggjax_remat']
      notes.append(f"remat at batch {row['batch']}: {r['images_per_s']:.1f} img/s "
                   f"(throughput {-100 * row['remat_cost']:+.1f}%), peak mem {_gib(r['peak_memory_bytes'])}")
    if 'eval' in row:
      e = row['eval']
      notes.append(f"dense eval at {e['image_size']} (score map {e['score_map'][0]}x{e['score_map'][1]}), "
                   f"batch {e['batch']}: {e['images_per_s']:.1f} img/s, MFU {_pct(e['mfu'])}")
  for m in summary['max_batch']:
    ver = (m.get('verified') or {})
    ran = (f", runs at {ver['per_device_batch']}: {ver['images_per_s']:.1f} img/s, peak "
           f"{_gib(ver['peak_memory_bytes'])}" if ver.get('per_device_batch') else '')
    notes.append(f"largest per-device batch, {m['model']} {m['dtype']} {m['image_size']}"
                 f"{' remat' if m['remat'] else ''}: {m['max_per_device_batch']} "
                 f"({_gib(m['bytes_at_max'])} of {_gib(m['limit_bytes'])}, "
                 f"{(m['bytes_per_image'] or 0) / 2 ** 20:.1f} MiB/image){ran}")
  if summary.get('nonfinite_loss'):
    notes.append('WARNING: non-finite final loss in ' + ', '.join(summary['nonfinite_loss']))
  return '\n'.join(out + [''] + [f'- {n}' for n in notes])


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    print(__doc__, file=sys.stderr)
    return 2
  summary = summarize(load(argv[0]))
  text = table(summary)
  with open(os.path.join(argv[0], 'summary.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(argv[0], 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
