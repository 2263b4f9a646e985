"""Decode step projections on this CPU: 'weights', 'activations' and 'grouped' at B = 1, 2, 3,
16 and 64.

The issue-12 decoding configuration (bench_decode: D = 512, H = 8, 2 layers, V = 256,
rotary, float32; F = 2048 MLP channels in G = 8 groups; 512-token prompts, 64 greedy
steps), with 8 different prompts prefilled together and tiled to B sequences
(bench_decode.tile_state), so that the sequences do not all pick the same heads. Per
batch, timed interleaved: dense, then heads only at K = 2 of 8 (ungated MLP) and heads and
MLP groups both at 2 of 8, each with every step projection (decode's module docstring):

  weights      each sequence's K heads' (and Kf groups') weights gathered at prefill:
               a step reads B K/H of the weight bytes
  activations  every head (group) computed with the full weights, the K (Kf) taken
  grouped      the (sequence, head) pairs sorted by head, each head's weights times
               its pairs' rows: on GPU and TPU one jax.lax.ragged_dot per projection (the
               weights read once, the gathered path's FLOPs); on the CPU, which has no
               ragged-dot kernel, tiles of one head's pairs cut at prefill, their weights
               gathered once (at most twice the weight bytes), one batched matmul a step
               (gating.layers.tiles)

Reported as in the decode section (tokens/s, speedup against dense, weight bytes a step
reads, XLA's bytes accessed per step), and per model and batch the best of 'weights' and
'activations' against 'grouped' (the issue-29 goal: grouped >= 1.3x the best of the other
two at B = 64, K = 2 of 8).
"""

from __future__ import annotations

import jax

from experiments import bench_decode
from experiments.timing import summarize, time_interleaved

BATCHES = (1, 2, 3, 16, 64)   # 2 and 3: where 'auto' picks between weights and grouped
PROJECTIONS = ('weights', 'activations', 'grouped')
# name: (gate, K heads, Kf MLP groups or None for the ungated MLP)
MODELS = {'heads_k2': ('topk', 2, None), 'both_k2': ('topk', 2, 2)}
PROMPTS = 8


def run(quick: bool = False) -> list[dict]:
  prompt, steps = bench_decode.GROUPS['prompt'], 16 if quick else bench_decode.GROUPS['steps']
  cache_length = prompt + steps
  trials = 3 if quick else 7
  models = {'dense': (bench_decode.build('dense', cache_length), None)}
  for name, (gate, k, kf) in MODELS.items():
    models[name] = (bench_decode.build(gate, cache_length, active_heads=k, path='gathered',
                                       active_groups=kf), k)
  prompts_NxL = jax.random.randint(jax.random.key(0), (PROMPTS, prompt), 0,
                                   bench_decode.SIZES['vocab'])
  candidate = bench_decode.decode_candidate
  rows = []
  for batch in BATCHES if not quick else (1, 64):
    cands = {'dense': candidate(models['dense'][0], prompts_NxL, batch, cache_length, steps,
                                None, 'auto')}
    for name in MODELS:
      model, k = models[name]
      for projection in PROJECTIONS:
        cands[f'{name}_{projection}'] = candidate(model, prompts_NxL, batch, cache_length,
                                                  steps, k, projection)
    times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, trials)
    base = summarize(times['dense'])['median_s']
    base_info = cands['dense'][1]
    for name, (_, info) in cands.items():
      stats = summarize(times[name])
      rows.append(dict(
          section='projection', batch=batch, cache_length=cache_length, prompt_length=prompt,
          prompts=PROMPTS, steps=steps, candidate=name, **bench_decode.SIZES,
          mlp_groups=bench_decode.GROUPS['mlp_groups'], **info,
          tokens_per_s=batch * steps / stats['median_s'],
          speedup_vs_dense=base / stats['median_s'],
          kv_ratio_vs_dense=info['kv_bytes'] / base_info['kv_bytes'],
          weight_ratio_vs_dense=info['weight_bytes'] / base_info['weight_bytes'], **stats))
  return rows


def grouped_vs_best(rows: list[dict]) -> list[dict]:
  """Per batch and model: grouped's speed over the faster of 'weights' and 'activations'."""
  out = []
  for batch in sorted({r['batch'] for r in rows}):
    speed = {r['candidate']: r['tokens_per_s'] for r in rows if r['batch'] == batch}
    for name in MODELS:
      best = max(PROJECTIONS[:2], key=lambda p: speed[f'{name}_{p}'])
      out.append(dict(batch=batch, model=name, best_other=best,
                      grouped_over_best=speed[f'{name}_grouped'] / speed[f'{name}_{best}']))
  return out


def format_table(rows: list[dict]) -> str:
  r0 = rows[0]
  lines = [bench_decode.format_table([dict(r, section='decode') for r in rows]).replace(
      'decode and forward', f'decode projections ({r0["prompts"]} prompts tiled to B)', 1)]
  lines.append('\n  grouped against the best of weights and activations (goal: >= 1.3x '
               'at B=64)')
  for g in grouped_vs_best(rows):
    lines.append(f'    B={g["batch"]:<3} {g["model"]:<9} grouped / {g["best_other"]:<11} = '
                 f'{g["grouped_over_best"]:.2f}x tokens/s')
  return '\n'.join(lines)
