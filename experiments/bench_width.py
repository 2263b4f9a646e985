"""Width benchmark: heads and MLP channel groups gated together, against the dense model.

Forward pass (gathered path) of a GatedLM with 4 layers, D=256, H=8, F=1024 hidden MLP
channels in G=8 groups, L=512, batch 8 (--quick: 2 layers), random weights and tokens:

  dense       gate='dense', ungated MLP (the denominator)
  heads_k2    top-k, K=2 of 8 heads, ungated MLP
  groups_k2   top-k, all 8 heads (K = H: no head is skipped), Kf=2 of 8 MLP groups
  both_k2     top-k, K=2 of 8 heads and Kf=2 of 8 MLP groups

and the train step (`train.jit_train_step`, as training runs it) on the masked path,
dense against both_k2 (every head and group computed, then gated). Candidates are timed
interleaved in one run; FLOPs are XLA's cost analysis of each compiled function.
Then cached decoding with MLP groups (`bench_decode.run_groups`): D=512, F=2048 in G=8
groups, a 512-token prompt, 64 greedy steps, B=1 and 16; dense, heads only at 2/8 and both
at 2/8. Targets (issue 12): both_k2 forward <= 0.40x dense time; masked train step <=
1.10x; decode both at 2/8 >= 3x dense tokens/s at B=1 and >= 1.3x heads only.

--size gpu, section 'forward' (`run_gpu`): the whole forward of the GatedLM of
bench_train.GPU (8 layers, D = 1024, H = 8, F = 4096 in G = 8 groups, L = 2048, batch 16,
parameters and compute in bfloat16): dense against heads, groups and both at 2 of 8 on the
gathered path, with memory figures (experiments.bench_rows). --dry-run compiles both_k2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import bench_decode
from experiments.bench_memory import tree_bytes
from experiments.bench_rows import Candidate, Settings, format_rows, run_table
from experiments.bench_train import GPU, GPU_CANDIDATES, GPU_DRY, gpu_lm, step_callable
from experiments.timing import summarize, time_interleaved
from gating.layers.models import GatedLM
from gating.training.config import DataConfig, ModelConfig, TrainConfig

FULL = dict(layers=4, features=256, heads=8, mlp=1024, groups=8, length=512, batch=8,
            prefix=64, vocab=256)
QUICK = dict(FULL, layers=2)
# name: (gate, K heads, G groups or None, Kf groups)
FORWARD = {'dense': ('dense', None, None, None), 'heads_k2': ('topk', 2, None, None),
           'groups_k2': ('topk', 8, 8, 2), 'both_k2': ('topk', 2, 8, 2)}
TRAIN = {'train_dense': ('dense', None, None, None), 'train_masked_both_k2': ('topk', 2, 8, 2)}


def _forward(gate, k, groups, kf, sizes):
  """(zero-argument forward callable, XLA flops of the compiled forward)."""
  model = GatedLM(sizes['vocab'], num_layers=sizes['layers'], features=sizes['features'],
                  num_heads=sizes['heads'], mlp_features=sizes['mlp'],
                  max_length=sizes['length'], prefix_len=sizes['prefix'], gate=gate,
                  active_heads=k, mlp_groups=groups, active_groups=kf,
                  path='masked' if gate == 'dense' else 'gathered', rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(0), (sizes['batch'], sizes['length']), 0,
                              sizes['vocab'])
  fn = jax.jit(lambda state, tokens: nnx.merge(graphdef, state, copy=True)(
      tokens, deterministic=True).logits_BxLxV)
  compiled = fn.lower(state, tokens).compile()
  return (lambda: compiled(state, tokens)), compiled.cost_analysis().get('flops')


def _train(gate, k, groups, kf, sizes):
  model = ModelConfig(num_layers=sizes['layers'], features=sizes['features'],
                      num_heads=sizes['heads'], mlp_features=sizes['mlp'],
                      prefix_len=sizes['prefix'], gate=gate, active_heads=k,
                      mlp_groups=groups, active_groups=kf, path='masked',
                      eval_path='masked', noise=None if gate == 'dense' else 'gumbel')
  cfg = TrainConfig(model=model, data=DataConfig(kind='text', seq_len=sizes['length']),
                    steps=10_000, batch_size=sizes['batch'])
  return step_callable(cfg, sizes)


def _rows(kind, specs, built, times, sizes):
  base_name = next(iter(specs))
  base = summarize(times[base_name])['median_s']
  rows = []
  for name, (gate, k, groups, kf) in specs.items():
    stats = summarize(times[name])
    flops, base_flops = built[name][1], built[base_name][1]
    rows.append(dict(section='width', kind=kind, candidate=name, gate=gate, K=k, G=groups,
                     Kf=kf, **sizes, xla_flops=flops,
                     flop_ratio=None if not (flops and base_flops) else flops / base_flops,
                     ratio_vs_dense=stats['median_s'] / base, **stats))
  return rows


def run(quick: bool = False) -> list[dict]:
  sizes = QUICK if quick else FULL
  forward = {name: _forward(*spec, sizes) for name, spec in FORWARD.items()}
  times = time_interleaved({n: fn for n, (fn, _) in forward.items()}, 3 if quick else 9)
  rows = _rows('forward (gathered)', FORWARD, forward, times, sizes)
  del forward
  steps = {name: _train(*spec, sizes) for name, spec in TRAIN.items()}
  times = time_interleaved({n: fn for n, (fn, _) in steps.items()}, 3 if quick else 7,
                           min_seconds=0.5)
  rows += _rows('train step (masked)', TRAIN, steps, times, sizes)
  del steps
  return rows + bench_decode.run_groups(quick)


def format_table(rows: list[dict]) -> str:
  decode_rows = [r for r in rows if r['section'] == 'decode']
  rows = [r for r in rows if r['section'] != 'decode']
  r0 = rows[0]
  lines = [f"width: GatedLM {r0['layers']} layers, D={r0['features']}, H={r0['heads']}, "
           f"F={r0['mlp']} in G={r0['groups']} groups, L={r0['length']}, batch {r0['batch']}: "
           'median ms [IQR], time and FLOP ratios to dense',
           '  targets: both_k2 forward <= 0.40x, masked train step <= 1.10x']
  kind = None
  for r in rows:
    if r['kind'] != kind:
      kind = r['kind']
      lines.append(f'  {kind}')
    flops = '-' if r['flop_ratio'] is None else f"{r['flop_ratio']:6.3f}x FLOPs"
    lines.append(f"    {r['candidate']:<22} {r['median_s'] * 1e3:9.1f} ms "
                 f"[{r['q25_s'] * 1e3:.1f}, {r['q75_s'] * 1e3:.1f}]  "
                 f"{r['ratio_vs_dense']:6.3f}x time  {flops}")
  if decode_rows:
    lines += ['', bench_decode.format_table(decode_rows),
              '  targets: both_k2 >= 3x dense at B=1, >= 1.3x heads_k2']
    for batch in sorted({r['batch'] for r in decode_rows}):
      speed = {r['candidate']: r['speedup_vs_dense'] for r in decode_rows
               if r['batch'] == batch}
      lines.append(f"    B={batch}: both_k2 / heads_k2 = "
                   f"{speed['both_k2'] / speed['heads_k2']:.2f}x tokens/s")
  return '\n'.join(lines)


# -- --size gpu: the forward section --------------------------------------------------------

def _estimate(spec, sizes, param_bytes: int) -> int:
  """The parameters, the tokens and the float32 logits, and one layer at a time: the
  residual stream and norm (3 B L D), q/k/v/o of the N computed heads, the float32 scores
  B N L L, the MLP's computed channels twice, and the per-sequence weight copies of the
  gathered heads (4 B K D Dh) and groups (2 B Kf D F/G), at the compute dtype."""
  _, k, groups, kf = spec
  B, L, D, H, F, V = (sizes[n] for n in ('batch', 'length', 'features', 'heads', 'mlp',
                                         'vocab'))
  e, N = jnp.dtype(sizes['dtype']).itemsize, k or H
  Fk = F if groups is None else F * kf // groups
  copies = (4 * B * N * D * (D // H) if N < H else 0) + (2 * B * Fk * D if groups else 0)
  layer = (3 * B * L * D + 4 * B * L * N * (D // H) + 2 * B * L * Fk + copies) * e
  return param_bytes + B * L * 4 + B * L * V * 4 + layer + B * N * L * L * 4


def gpu_candidate(spec, sizes) -> Candidate:
  dtype = jnp.dtype(sizes['dtype'])
  make = lambda: gpu_lm(spec, sizes, param_dtype=dtype, train=False)
  B, L = sizes['batch'], sizes['length']

  def build():
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    fn = jax.jit(lambda state, tokens: nnx.merge(graphdef, state, copy=True)(
        tokens, deterministic=True).logits_BxLxV)

    def make_call(compiled):
      _, state = nnx.split(make())
      tokens = jax.random.randint(jax.random.key(0), (B, L), 0, sizes['vocab'])
      return lambda: compiled(state, tokens)
    return fn, (abstract, jax.ShapeDtypeStruct((B, L), jnp.int32)), make_call
  params = tree_bytes(nnx.state(nnx.eval_shape(make), nnx.Param))
  return Candidate(_estimate(spec, sizes, params), build)


def run_gpu(settings: Settings) -> list[dict]:
  s = GPU
  fields = dict(layers=s['layers'], features=s['features'], heads=s['heads'], mlp=s['mlp'],
                groups=s['groups'], length=s['length'], batch=s['batch'], dtype=s['dtype'])
  rows = run_table('forward', fields, {name: gpu_candidate(spec, s)
                                       for name, spec in GPU_CANDIDATES.items()},
                   settings, dry_compile=GPU_DRY)
  for r in rows:
    r['tokens_per_s'] = None if r['median_s'] is None else s['batch'] * s['length'] / r['median_s']
  return rows


def format_gpu_table(rows: list[dict]) -> str:
  r0 = rows[0]
  return format_rows(
      f"forward (GatedLM {r0['layers']} layers, D={r0['features']}, H={r0['heads']}, "
      f"F={r0['mlp']} in G={r0['groups']} groups, L={r0['length']}, batch {r0['batch']}, "
      f"{r0['dtype']}; gated: gathered path, 2 of 8)", rows, ('batch', 'length'),
      extra=lambda r: f"{r['tokens_per_s']:,.0f} tok/s")
