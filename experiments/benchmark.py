"""All speed and memory figures in one place: a table on screen and JSON on disk.

  python -m experiments.benchmark [--quick] [--sections attention,...] [--out DIR]

Sections: attention (nnx.MultiHeadAttention vs the masked and gathered paths, forward and
forward+backward); decode (GatedLM decoding at K = 2, 4, 8 of 8 vs dense: tokens/s, KV-cache
and weight bytes per step; and a whole forward pass against its FLOP-allowed speedup);
train (the train step of a GatedLM: masked and gathered at K=2 of 8 vs dense); study (the
forward pass of the study's K=2 models, gathered and masked, vs their dense twins); width
(heads and MLP channel groups gated at 2 of 8 each and together vs dense: forward on the
gathered path, train step on the masked path, and decoding with heads only and heads + MLP
groups at 2 of 8 on a 512-token prompt).
Every ratio is against the dense baseline measured in the same run, with candidates
interleaved over repeated trials. Benchmarks never run in the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from experiments import bench_attention, bench_decode, bench_study, bench_train, bench_width
from gating.training.provenance import provenance

SECTIONS = {'attention': bench_attention, 'decode': bench_decode, 'train': bench_train,
            'study': bench_study, 'width': bench_width}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--quick', action='store_true',
                      help='fewer sizes and trials: a shorter run (each section prints '
                           'its own time)')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help=f'comma-separated subset of: {", ".join(SECTIONS)}')
  parser.add_argument('--out', default='runs/benchmark',
                      help='folder for benchmark.json (default: runs/benchmark)')
  args = parser.parse_args(argv)
  names = [s for s in args.sections.split(',') if s]
  unknown = sorted(set(names) - set(SECTIONS))
  if unknown:
    parser.error(f'unknown sections {unknown}; known: {sorted(SECTIONS)}')

  result = {'provenance': provenance(), 'quick': args.quick, 'sections': {}}
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, 'benchmark.json')
  for name in names:
    start = time.time()
    rows = SECTIONS[name].run(quick=args.quick)
    print(SECTIONS[name].format_table(rows), flush=True)
    print(f'  ({name}: {time.time() - start:.0f} s)\n', flush=True)
    result['sections'][name] = rows
    with open(path, 'w') as f:  # rewritten after each section: a long run keeps its progress
      json.dump(result, f, indent=1)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
