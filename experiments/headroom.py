"""The headroom oracle of a run: python -m experiments.headroom --workdir DIR [...]

For every attention layer and budget K: dense (all heads), the best static K-subset, the
best subset per task or domain, the per-sequence oracle (each sequence's best K-subset,
chosen on half of its target positions and scored on the other half; also scored in
sample, the optimistic side) and the run's own router, as loss on the scored positions;
the headroom (static - oracle) with a bootstrap 95% interval over the sequences, and the
share of static's gap to dense that the oracle closes. A slices model (gate='slices')
also gets its assignment oracle: every sequence run in each slice, the best slice for all,
per label and per sequence against the run's own assignment (and, with the cluster
assigner, routed by prefixes of 8 to 96 tokens). The per-sequence oracle is an
estimate, not a ceiling: with few choice positions per sequence it picks with noise (a
warning says so); see gating/study/headroom.py. Writes DIR/headroom.json.

Examples:
  python -m experiments.headroom --workdir runs/synthetic
  python -m experiments.headroom --workdir runs/text --layers 0 --max-sequences 256
  python -m experiments.headroom --workdir runs/dense --k 2,4          # a dense model
  python -m experiments.headroom --workdir runs/slices --layers none   # slices only
"""

from __future__ import annotations

import argparse
import os
import sys

from experiments.flags import int_list


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='run folder (from experiments.train)')
  parser.add_argument('--k', default=None,
                      help="comma-separated budgets K (default: the run's own K; required "
                           'for a dense run)')
  parser.add_argument('--layers', default=None,
                      help="comma-separated gated layer indices (default: all; 'none': no "
                           "layer's heads searched, only a slices model's assignment)")
  parser.add_argument('--split', default='validation', choices=('validation', 'test'),
                      help='validation (tuning; default) or test')
  parser.add_argument('--max-sequences', type=int, default=512,
                      help='sequences of the split to use, drawn at random with a fixed '
                           'seed (default 512; 0: all)')
  parser.add_argument('--restore-step', type=int, default=None, metavar='N',
                      help='the checkpoint at step N instead of the latest')
  parser.add_argument('--out', default=None, help='JSON file (default: DIR/headroom.json)')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from gating.study import evaluation, headroom
  from gating.training import checkpoint
  from gating.training.folders import check_output_file, write_json
  try:
    if args.out is not None:
      check_output_file(args.out, '--out')   # before the search, not after it
    layers = (None if args.layers is None else [] if args.layers == 'none' else
              int_list(args.layers, '--layers'))
    ks = None if args.k is None else int_list(args.k, '--k')
    run = evaluation.load_run(args.workdir, step=args.restore_step)
    report = headroom.headroom(run, ks=ks, layers=layers, split=args.split,
                               max_sequences=args.max_sequences or None)
  except (FileNotFoundError, ConnectionError, ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f'error: {e}')
  out = args.out or os.path.join(args.workdir, 'headroom.json')
  write_json(out, report)
  print(f"{report['workdir']} at step {report['step']}, {report['split']} split, "
        f"{report['sequences']} sequences ("
        + ', '.join(f'{n} {name}' for name, n in report['sequences_per_label'].items())
        + '); loss per score-position token:')
  def num(value, fmt='.4f'):
    return '-' if value is None else format(value, fmt)
  for r in report['layers']:
    low, high = r['headroom_ci95']
    print(f"  layer {r['layer']} K={r['K']} ({r['num_subsets']} subsets): dense "
          f"{r['dense']:.4f}  static {r['static']:.4f} {r['static_subset']}  by label "
          f"{r['by_label']:.4f}  oracle {r['oracle']:.4f} held out, "
          f"{r['oracle_in_sample']:.4f} in sample ({r['oracle_distinct_subsets']} distinct; "
          f"{r['choice_positions']['median']:g} choice positions per sequence)  router "
          f"{num(r.get('router'))}; headroom {r['headroom']:.4f} [{low:.4f}, {high:.4f}] "
          f"(in sample {r['headroom_in_sample']:.4f}); the oracle closes "
          f"{num(r['oracle_closes'], '.0%')} of static's gap to dense, by label "
          f"{num(r['by_label_closes'], '.0%')}; router gain / oracle gain "
          f"{num(r.get('captured'), '.2f')}, runs {num(r.get('router_recall'), '.0%')} of the "
          "oracle's heads")
  if 'slices' in report:
    r = report['slices']
    low, high = r['headroom_ci95']
    print(f"  slices (E={r['num_slices']}, each sequence run in every slice): static "
          f"{r['static']:.4f} (slice {r['static_slice']})  by label {r['by_label']:.4f} "
          f"{r['by_label_slices']}  oracle {r['oracle']:.4f} held out, "
          f"{r['oracle_in_sample']:.4f} in sample  the run's assignment {r['router']:.4f}  "
          f"whole sequence's {num(r.get('whole'))}; headroom {r['headroom']:.4f} "
          f"[{low:.4f}, {high:.4f}]; the run's gain / oracle gain "
          f"{num(r.get('captured'), '.2f')}, agrees with the oracle on "
          f"{r['router_agreement']:.0%} of sequences")
    for b in r.get('by_prefix', ()):
      print(f"    routed by the first {b['prefix']} tokens: agrees with the whole sequence's "
            f"cluster on {b['agreement']:.0%}; on the {b['score_tokens']} score positions "
            f"after it: {b['route']:.4f} (the run's assignment {b['router']:.4f}, the whole "
            f"sequence's {b['whole']:.4f})")
  print("  the run's own loss on the score positions after the first P' tokens: " +
        ', '.join(f"{a['prefix']}: {a['loss']:.4f}" for a in report['after_prefix']))
  found = [*report['layers'], *([report['slices']] if 'slices' in report else [])]
  for warning in sorted({r['warning'] for r in found if 'warning' in r}):
    print(f'  warning: {warning}')
  print(f'wrote {out}')


if __name__ == '__main__':
  main()
