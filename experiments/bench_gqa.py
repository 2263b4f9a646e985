"""Grouped-query attention benchmark: our GQA layer's units against our dense GQA layer.

attention  H = 16 query heads in G = 4 KV groups (H/G = 4), D = 1024 (Dh = 64), B = 8,
           float32, L = 128 and 512, forward and forward+backward. Candidates: 'dense'
           (gate='dense', every head: the denominator, measured in the same run), and for
           each unit, 'kv_group' (a group opens with its 4 query heads and only the chosen
           groups' K/V are computed) and 'query_head' (any K query heads; every group's
           K/V computed), the gathered path at K = 4 (one group), 8 and 16 query heads and
           the masked path at K = 4. FLOPs are XLA's cost analysis of each compiled call.
decode     A GatedLM with the same attention shape at D = 512 (H = 16, G = 4, Dh = 32), 2
           layers, rotary, float32: one prompt prefilled, its cache tiled to B = 1 and 16,
           then greedy steps timed (experiments.bench_decode.decode_candidate). kv_group
           at K = 4 and 8 and query_head at K = 4, all gathered; kv_bytes is the cache,
           exactly K/H of dense's under kv_group and all of it under query_head.

    python -m experiments.benchmark --sections gqa [--quick]
"""

from __future__ import annotations

import jax
from flax import nnx

import gating
from experiments.bench_attention import _callable
from experiments.bench_decode import decode_candidate
from experiments.timing import summarize, time_interleaved

ATTENTION = dict(batch=8, features=1024, heads=16, kv_heads=4)
DECODE = dict(features=512, heads=16, kv_heads=4, layers=2, vocab=256, prefix=16)
UNITS = ('kv_group', 'query_head')


def attention_candidates(length: int, mode: str) -> dict:
  B, D, H, G = (ATTENTION[k] for k in ('batch', 'features', 'heads', 'kv_heads'))
  x = jax.random.normal(jax.random.key(0), (B, length, D))
  layer = lambda **kw: gating.GatedMultiHeadAttention(H, D, num_kv_heads=G, rngs=nnx.Rngs(0),
                                                      **kw)
  out = {'dense': _callable(layer(gate='dense'), x, mode)}
  for unit in UNITS:
    for k in (4, 8, H):
      gated = layer(gate='topk', active_heads=k, unit=unit, deterministic=True)
      out[f'{unit}_gathered_k{k}'] = _callable(gated, x, mode, path='gathered')
    gated = layer(gate='topk', active_heads=4, unit=unit, deterministic=True)
    out[f'{unit}_masked_k4'] = _callable(gated, x, mode, path='masked')
  return out


def run_attention(quick: bool) -> list[dict]:
  rows = []
  for length in ((512,) if quick else (128, 512)):
    for mode in ('forward', 'forward+backward'):
      cands = attention_candidates(length, mode)
      times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, 3 if quick else 9)
      base = summarize(times['dense'])['median_s']
      base_flops = cands['dense'][1]
      for name, (_, flops) in cands.items():
        stats = summarize(times[name])
        rows.append(dict(section='gqa_attention', length=length, mode=mode, candidate=name,
                         **ATTENTION, xla_flops=flops, flops_ratio=flops / base_flops,
                         ratio_vs_dense=stats['median_s'] / base, **stats))
  return rows


def build(gate: str, max_length: int, **kw) -> gating.GatedLM:
  return gating.GatedLM(
      DECODE['vocab'], num_layers=DECODE['layers'], features=DECODE['features'],
      num_heads=DECODE['heads'], num_kv_heads=DECODE['kv_heads'], max_length=max_length,
      prefix_len=DECODE['prefix'], positions='rotary', gate=gate, rngs=nnx.Rngs(0), **kw)


def run_decode(quick: bool) -> list[dict]:
  cache_length, steps, trials = (1024, 16, 3) if quick else (2048, 32, 5)
  prompt_1xL = jax.random.randint(jax.random.key(0), (1, cache_length - steps), 0,
                                  DECODE['vocab'])
  models = {'dense': (build('dense', cache_length), None)}
  for unit, k in (('kv_group', 4), ('kv_group', 8), ('query_head', 4)):
    models[f'{unit}_k{k}'] = (build('topk', cache_length, active_heads=k, unit=unit,
                                    path='gathered'), k)
  rows = []
  for batch in (1, 16):
    projection = lambda k: 'auto' if k is None else (
        'weights' if batch * k < DECODE['heads'] else 'activations')
    cands = {name: decode_candidate(model, prompt_1xL, batch, cache_length, steps, k,
                                    projection(k))
             for name, (model, k) in models.items()}
    times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, trials)
    base = summarize(times['dense'])['median_s']
    base_info = cands['dense'][1]
    for name, (_, info) in cands.items():
      stats = summarize(times[name])
      rows.append(dict(section='gqa_decode', batch=batch, cache_length=cache_length,
                       steps=steps, candidate=name, **DECODE, **info,
                       tokens_per_s=batch * steps / stats['median_s'],
                       speedup_vs_dense=base / stats['median_s'],
                       kv_ratio_vs_dense=info['kv_bytes'] / base_info['kv_bytes'], **stats))
  return rows


def run(quick: bool = False) -> list[dict]:
  return run_attention(quick) + run_decode(quick)


def format_table(rows: list[dict]) -> str:
  a = ATTENTION
  lines = [f"gqa attention (B={a['batch']}, D={a['features']}, H={a['heads']}, "
           f"G={a['kv_heads']}, float32): median ms [IQR], time and XLA FLOPs vs dense GQA"]
  key = None
  for r in (r for r in rows if r['section'] == 'gqa_attention'):
    if (r['length'], r['mode']) != key:
      key = (r['length'], r['mode'])
      lines.append(f'\n  L={r["length"]} {r["mode"]}')
    lines.append(f'    {r["candidate"]:<24} {r["median_s"] * 1e3:9.2f} ms '
                 f'[{r["q25_s"] * 1e3:.2f}, {r["q75_s"] * 1e3:.2f}]  '
                 f'{r["ratio_vs_dense"]:6.3f}x  flops {r["flops_ratio"]:.3f}x')
  d = DECODE
  lines.append(f"\ngqa decode (D={d['features']}, H={d['heads']}, G={d['kv_heads']}, "
               f"{d['layers']} layers): tokens/s, speedup and KV cache vs dense GQA")
  for r in (r for r in rows if r['section'] == 'gqa_decode'):
    lines.append(f"  B={r['batch']:<3} {r['candidate']:<16} {r['tokens_per_s']:9.1f} tok/s "
                 f"{r['speedup_vs_dense']:6.2f}x  kv {r['kv_ratio_vs_dense']:.3f}x  "
                 f"({r['projections']})")
  return '\n'.join(lines)
