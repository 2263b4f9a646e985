"""The headroom oracle of a run: python -m experiments.headroom --workdir DIR [...]

For every gated attention layer: the best static K-subset, the per-sequence oracle (each
sequence's best K-subset, chosen on half of its target positions and scored on the other
half) and the run's own router, as loss on the scored positions (see
gating/study/headroom.py). Writes DIR/headroom.json.

Examples:
  python -m experiments.headroom --workdir runs/synthetic
  python -m experiments.headroom --workdir runs/text --layers 0 --max-sequences 256
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='run folder (from experiments.train)')
  parser.add_argument('--layers', default=None,
                      help='comma-separated gated layer indices (default: all)')
  parser.add_argument('--split', default='validation', choices=('validation', 'test'),
                      help='validation (tuning; default) or test')
  parser.add_argument('--max-sequences', type=int, default=512,
                      help='sequences of the split to use (default 512; 0: all)')
  parser.add_argument('--restore-step', type=int, default=None, metavar='N',
                      help='the checkpoint at step N instead of the latest')
  parser.add_argument('--out', default=None, help='JSON file (default: DIR/headroom.json)')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from gating.study import evaluation, headroom
  from gating.training import checkpoint
  try:
    layers = None if args.layers is None else [int(x) for x in args.layers.split(',') if x]
    run = evaluation.load_run(args.workdir, step=args.restore_step)
    report = headroom.headroom(run, layers=layers, split=args.split,
                               max_sequences=args.max_sequences or None)
  except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f'error: {e}')
  out = args.out or os.path.join(args.workdir, 'headroom.json')
  with open(out + '.tmp', 'w') as f:
    json.dump(report, f, indent=1)
  os.replace(out + '.tmp', out)
  print(f"{report['workdir']} at step {report['step']}, {report['split']} split, "
        f"{report['sequences']} sequences; loss per score-position token:")
  for r in report['layers']:
    captured = '-' if r['captured'] is None else f"{r['captured']:.2f}"
    print(f"  layer {r['layer']} (K={r['K']}, {r['num_subsets']} subsets): static "
          f"{r['static']:.4f} {r['static_subset']}  oracle {r['oracle']:.4f} "
          f"({r['oracle_distinct_subsets']} distinct)  router {r['router']:.4f}  "
          f"headroom {r['headroom']:.4f}  captured {captured}")
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
