"""Decoding benchmark: GatedLM at K = 2, 4, 8 of 8 heads against the dense model.

Model: D=512, H=8 (Dh=64), N=2 layers, MLP 4D, V=256, rotary positions, float32, so that
attention dominates with a long cache. Every ratio is against the dense model (gate='dense')
measured in the same run, candidates interleaved over repeated trials (experiments.timing).

decode   One prompt of S - T tokens is prefilled (B=1) and its cache repeated to batch B,
         then T greedy one-token steps (decode.decode_step in a lax.fori_loop under jit)
         are timed: tokens/s = B T / seconds. The gated model runs on the gathered path
         with the step projection that decode.choose_projection picks ('auto'), plus K=2
         with the other projection. Reported per step:
           kv_bytes      the cache (DecodeState.kv_bytes): exactly K/H of dense.
           weight_bytes  an analytic count of the weight bytes a step reads: every
                         parameter once (the tied embedding whole, for the logits), routers
                         excluded (the gate was picked at prefill), and for a gathered layer
                         under projection='weights' B K/H of its Q/O head weights and B M/G
                         of its K/V ones (M the cached K/V heads: K without GQA), and
                         for a gathered MLP under 'weights' B Kf/G of its W1, b1 and W2;
                         under 'grouped' run as tiles (the CPU: gating.layers.tiles) N/H
                         of the attention's head weights and N/G of the MLP's group
                         weights, N the layer's tiles.
           xla_bytes     XLA's cost analysis 'bytes accessed' of one compiled step (cache
                         donated): weights, cache and activations as XLA counts them.
groups   The issue-12 configuration (F=2048 MLP channels in G=8 groups, a 512-token prompt,
         64 new tokens, B=1 and 16), decoded as above: dense, heads only at K=2 of 8
         (ungated MLP) and both at 2 of 8 (K=2 heads and Kf=2 MLP groups), with the same
         counts (a row's `projections` gives the attention's then the MLPs' projections).
         `run_groups` makes these rows; the width section (bench_width) runs them.
forward  A whole forward pass (B x L tokens) of GatedLM on the gathered path at K=2 of 8 and
         on the masked path at K=2, against dense. FLOPs are XLA's cost analysis of each
         compiled forward; the FLOP-allowed speedup is dense FLOPs / candidate FLOPs, and
         `of_allowed` is the achieved speedup divided by it.

--size gpu (`run_gpu`): GatedLM D = 1024, H = 8 (Dh = 128), 4 layers, V = 256, rotary,
parameters and compute in bfloat16; 8 different 4096-token prompts prefilled (B = 8) and
tiled to B = 1, 16 and 64 sequences, then 32 greedy steps timed: dense against K = 2 of 8
with each step projection ('weights', 'activations', 'grouped'), with memory figures
(experiments.bench_rows). --dry-run compiles k2_grouped at B = 64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import gating
from experiments.bench_memory import tree_bytes
from experiments.bench_rows import Candidate, Settings, format_rows, run_table
from experiments.timing import summarize, time_interleaved
from gating.layers import decode, tiles

SIZES = dict(features=512, heads=8, layers=2, vocab=256, prefix=16)


GROUPS = dict(prompt=512, steps=64, mlp_groups=8)  # issue 12: F = 4 D = 2048 in 8 groups
# name: (gate, K heads, Kf MLP groups or None for the ungated MLP)
GROUP_CANDIDATES = {'dense': ('dense', None, None), 'heads_k2': ('topk', 2, None),
                    'both_k2': ('topk', 2, 2)}


def build(gate: str, max_length: int, active_heads=None, path='masked', active_groups=None):
  groups = {} if active_groups is None else dict(mlp_groups=GROUPS['mlp_groups'],
                                                 active_groups=active_groups)
  return gating.GatedLM(
      SIZES['vocab'], num_layers=SIZES['layers'], features=SIZES['features'],
      num_heads=SIZES['heads'], max_length=max_length, prefix_len=SIZES['prefix'],
      positions='rotary', gate=gate, active_heads=active_heads, path=path, rngs=nnx.Rngs(0),
      **groups)


def _projection_bytes(attn, name: str) -> int:
  """The bytes of one of attention's projections a gathered step takes per head: its
  kernel, and its bias but for the output projection's (added once, whatever the heads)."""
  lin = getattr(attn, name)
  return lin.kernel[...].nbytes + (0 if lin.bias is None or name == 'out'
                                   else lin.bias[...].nbytes)


def weight_bytes_per_step(model: gating.GatedLM, state: decode.DecodeState) -> int:
  """Analytic weight bytes one decode step reads (see the module docstring)."""
  batch = state.positions_B.shape[0]
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if 'router' in path:
      continue
    total += leaf[...].nbytes
  for block, cache in zip(model.blocks, state.layers):
    if cache.pair_tiles is not None:   # 'grouped' as tiles: N tiles' heads
      attn = block.attention
      count = cache.pair_tiles.units_N.shape[0]
      for name in ('query', 'key', 'value', 'out'):
        nbytes = _projection_bytes(attn, name)
        total -= nbytes - nbytes * count // attn.num_heads
    if cache.projection == 'weights':
      attn = block.attention
      k = cache.idx_BxK.shape[1]
      # Query/output heads: B K/H of them. Key/value heads: B M/G, M the K/V heads cached
      # per sequence (K without GQA; K / (H/G) groups under unit='kv_group'); none
      # gathered under unit='query_head' with GQA (the full K/V weights, read once).
      gathered_kv = cache.gathered.wk_BxDxKxDh is not None
      for name, fraction in (('query', (k, attn.num_heads)), ('out', (k, attn.num_heads)),
                             ('key', None), ('value', None)):
        nbytes = _projection_bytes(attn, name)
        if fraction is None:
          if not gathered_kv:
            continue
          fraction = (cache.k_BxNxSxDh.shape[1], attn.num_kv_heads)
        total -= nbytes - nbytes * batch * fraction[0] // fraction[1]
  for block, mlp_cache in zip(model.blocks, state.mlps):
    if mlp_cache is not None and (mlp_cache.projection == 'weights'
                                  or mlp_cache.pair_tiles is not None):
      mlp = block.gated_mlp
      groups = mlp.linear_in.kernel[...].nbytes + mlp.linear_out.kernel[...].nbytes
      if mlp.linear_in.bias is not None:
        groups += mlp.linear_in.bias[...].nbytes
      copies = (batch * mlp_cache.idx_BxK.shape[1] if mlp_cache.projection == 'weights'
                else mlp_cache.pair_tiles.units_N.shape[0])   # B Kf groups, or N tiles
      total -= groups - groups * copies // mlp.num_groups
  return total


def tile_state(model: gating.GatedLM, state: decode.DecodeState,
               batch: int) -> decode.DecodeState:
  """A state of N prefilled sequences tiled to `batch` sequences (sequence b is prefilled
  sequence b mod N); the 'grouped' projection's pairs sorted (and tiled) again for the new
  batch (decode.sort_pairs)."""
  def tile(cache):
    if cache is None:
      return None
    index_B = jnp.arange(batch) % cache.weights_BxN.shape[0]
    return jax.tree.map(lambda a: jnp.take(a, index_B, axis=0),
                        cache.replace(groups=None, pair_tiles=None, tiled=None))
  index_B = jnp.arange(batch) % state.positions_B.shape[0]
  return decode.sort_pairs(model, decode.DecodeState(
      tuple(tile(c) for c in state.layers), jnp.take(state.positions_B, index_B),
      tuple(map(tile, state.mlps))))


def decode_candidate(model, prompt_1xL, batch, cache_length, steps, active_heads, projection):
  """(zero-argument call of `steps` greedy steps, info); prompt_1xL: N prompts [N, L],
  prefilled together and tiled to `batch` sequences."""
  prefill = nnx.jit(decode.prefill, static_argnames=('cache_length', 'active_heads',
                                                     'projection'))
  if projection == 'auto':  # the choice for the batch decoded, not for the prefill's B=1
    projection = decode.choose_projection(batch, active_heads or SIZES['heads'], SIZES['heads'])
    for step in decode.group_plan(model, batch):  # one `projection` serves heads and groups
      if step is not None and step[1] != 'masked' and step[1] != projection:
        raise ValueError(f'the MLP groups would decode with {step[1]!r}, the heads with '
                         f'{projection!r}: prefill them at batch {batch}')
  _, state = prefill(model, prompt_1xL, cache_length=cache_length, active_heads=active_heads,
                     projection=projection)
  state = tile_state(model, state, batch)
  graphdef, params = nnx.split(model)
  run_steps = steps_fn(graphdef, steps)
  step = jax.jit(lambda params, state, token_B: decode.decode_step(
      nnx.merge(graphdef, params), state, token_B), donate_argnums=1)
  token_B = jnp.zeros((batch,), jnp.int32)
  xla_bytes = step.lower(params, state, token_B).compile().cost_analysis().get('bytes accessed')
  info = dict(kv_bytes=state.kv_bytes, weight_bytes=weight_bytes_per_step(model, state),
              xla_bytes=xla_bytes, projections='/'.join(state.projections)
              + ('' if not any(state.mlp_projections) else
                 ' mlp ' + '/'.join(p or 'dense' for p in state.mlp_projections)))
  return (lambda: run_steps(params, state, token_B)), info


def run_decode(quick: bool) -> list[dict]:
  cache_length = 2048 if quick else 4096
  steps = 16 if quick else 64
  trials = 3 if quick else 7
  dense = build('dense', cache_length)
  gated = build('topk', cache_length, active_heads=2, path='gathered')
  prompt_1xL = jax.random.randint(jax.random.key(0), (1, cache_length - steps), 0,
                                  SIZES['vocab'])
  rows = []
  for batch in (1, 16):
    cands = {'dense': decode_candidate(dense, prompt_1xL, batch, cache_length, steps, None,
                                        'auto')}
    for k in (2, 4, 8):
      cands[f'k{k}'] = decode_candidate(gated, prompt_1xL, batch, cache_length, steps, k,
                                         'auto')
    auto = decode.choose_projection(batch, 2, SIZES['heads'])
    other = 'activations' if auto == 'weights' else 'weights'
    cands[f'k2_{other}'] = decode_candidate(gated, prompt_1xL, batch, cache_length, steps, 2,
                                             other)
    times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, trials)
    base = summarize(times['dense'])['median_s']
    base_info = cands['dense'][1]
    for name, (_, info) in cands.items():
      stats = summarize(times[name])
      rows.append(dict(
          section='decode', batch=batch, cache_length=cache_length,
          prompt_length=cache_length - steps, steps=steps, candidate=name, **SIZES, **info,
          tokens_per_s=batch * steps / stats['median_s'],
          speedup_vs_dense=base / stats['median_s'],
          kv_ratio_vs_dense=info['kv_bytes'] / base_info['kv_bytes'],
          weight_ratio_vs_dense=info['weight_bytes'] / base_info['weight_bytes'], **stats))
  return rows


def run_groups(quick: bool) -> list[dict]:
  """Issue 12's decode rows: dense, heads only and heads + MLP groups at 2 of 8."""
  prompt, steps = GROUPS['prompt'], GROUPS['steps']
  cache_length = prompt + steps
  trials = 3 if quick else 7
  models = {name: (build(gate, cache_length, active_heads=k, active_groups=kf,
                         path='masked' if gate == 'dense' else 'gathered'), k)
            for name, (gate, k, kf) in GROUP_CANDIDATES.items()}
  prompt_1xL = jax.random.randint(jax.random.key(0), (1, prompt), 0, SIZES['vocab'])
  rows = []
  for batch in (1, 16):
    cands = {name: decode_candidate(model, prompt_1xL, batch, cache_length, steps, k, 'auto')
             for name, (model, k) in models.items()}
    times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, trials)
    base = summarize(times['dense'])['median_s']
    base_info = cands['dense'][1]
    for name, (_, info) in cands.items():
      stats = summarize(times[name])
      rows.append(dict(
          section='decode', batch=batch, cache_length=cache_length, prompt_length=prompt,
          steps=steps, candidate=name, **SIZES, mlp_features=4 * SIZES['features'],
          mlp_groups=GROUPS['mlp_groups'] if GROUP_CANDIDATES[name][2] else None,
          active_groups=GROUP_CANDIDATES[name][2], **info,
          tokens_per_s=batch * steps / stats['median_s'],
          speedup_vs_dense=base / stats['median_s'],
          kv_ratio_vs_dense=info['kv_bytes'] / base_info['kv_bytes'],
          weight_ratio_vs_dense=info['weight_bytes'] / base_info['weight_bytes'], **stats))
  return rows


def run_forward(quick: bool) -> list[dict]:
  batch, length = (2, 1024) if quick else (2, 2048)
  trials = 3 if quick else 7
  tokens_BxL = jax.random.randint(jax.random.key(1), (batch, length), 0, SIZES['vocab'])
  models = {'dense': build('dense', length),
            'gathered_k2': build('topk', length, active_heads=2, path='gathered'),
            'masked_k2': build('topk', length, active_heads=2, path='masked')}
  cands = {}
  for name, model in models.items():
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda params, x, graphdef=graphdef: nnx.merge(graphdef, params)(
        x, deterministic=True).logits_BxLxV)
    flops = forward.lower(params, tokens_BxL).compile().cost_analysis()['flops']
    cands[name] = ((lambda forward=forward, params=params: forward(params, tokens_BxL)), flops)
  times = time_interleaved({n: fn for n, (fn, _) in cands.items()}, trials)
  base, base_flops = summarize(times['dense'])['median_s'], cands['dense'][1]
  rows = []
  for name, (_, flops) in cands.items():
    stats = summarize(times[name])
    speedup, allowed = base / stats['median_s'], base_flops / flops
    rows.append(dict(section='forward', batch=batch, length=length, candidate=name, **SIZES,
                     xla_flops=flops, speedup_vs_dense=speedup, flop_allowed_speedup=allowed,
                     of_allowed=speedup / allowed, **stats))
  return rows


def run(quick: bool = False) -> list[dict]:
  """The decode section; the MLP-group rows (`run_groups`) run in the width section."""
  return run_decode(quick) + run_forward(quick)


def format_table(rows: list[dict]) -> str:
  s = SIZES
  lines = [f'decode and forward (GatedLM D={s["features"]}, H={s["heads"]}, N={s["layers"]}, '
           f'V={s["vocab"]}, float32): median [IQR], ratios against dense in the same run']
  for r in rows:
    if r['section'] == 'decode' and r['candidate'] == 'dense':
      lines.append(f'\n  decode B={r["batch"]}, cache S={r["cache_length"]} (prompt '
                   f'{r["prompt_length"]}), {r["steps"]} greedy steps')
      lines.append(f'    {"":<21}{"tokens/s":>9} {"speedup":>8} {"ms/step [IQR]":>22} '
                   f'{"KV MB":>8} {"xKV":>6} {"weight MB":>10} {"xW":>6} {"XLA MB":>8}  projection')
    if r['section'] == 'decode':
      ms = 1e3 / r['steps']
      lines.append(
          f'    {r["candidate"]:<21}{r["tokens_per_s"]:9.0f} {r["speedup_vs_dense"]:7.2f}x '
          f'{r["median_s"] * ms:9.2f} [{r["q25_s"] * ms:.2f}, {r["q75_s"] * ms:.2f}] '
          f'{r["kv_bytes"] / 1e6:8.1f} {r["kv_ratio_vs_dense"]:6.3f} '
          f'{r["weight_bytes"] / 1e6:10.2f} {r["weight_ratio_vs_dense"]:6.3f} '
          f'{r["xla_bytes"] / 1e6:8.1f}  {r["projections"]}')
    if r['section'] == 'forward' and r['candidate'] == 'dense':
      lines.append(f'\n  forward B={r["batch"]}, L={r["length"]} (FLOPs: XLA cost analysis)')
    if r['section'] == 'forward':
      lines.append(
          f'    {r["candidate"]:<16}{r["median_s"] * 1e3:9.1f} ms [{r["q25_s"] * 1e3:.1f}, '
          f'{r["q75_s"] * 1e3:.1f}]  {r["xla_flops"] / 1e9:7.2f} GFLOP  speedup '
          f'{r["speedup_vs_dense"]:.2f}x of allowed {r["flop_allowed_speedup"]:.2f}x '
          f'= {r["of_allowed"]:.0%}')
  return '\n'.join(lines)


# -- --size gpu ---------------------------------------------------------------------------

GPU = dict(features=1024, heads=8, layers=4, vocab=256, prefix=16, prompt=4096, steps=32,
           prompts=8, batches=(1, 16, 64), dtype='bfloat16')
GPU_CANDIDATES = {'dense': None, 'k2_weights': 'weights', 'k2_activations': 'activations',
                  'k2_grouped': 'grouped'}     # name: step projection of the K=2 model
GPU_DRY = (64, 'k2_grouped')


def gpu_model(dense: bool, sizes=GPU) -> gating.GatedLM:
  dtype = jnp.dtype(sizes['dtype'])
  return gating.GatedLM(
      sizes['vocab'], num_layers=sizes['layers'], features=sizes['features'],
      num_heads=sizes['heads'], max_length=sizes['prompt'] + sizes['steps'],
      prefix_len=sizes['prefix'], positions='rotary', gate='dense' if dense else 'topk',
      active_heads=None if dense else 2, path='masked' if dense else 'gathered', dtype=dtype,
      param_dtype=dtype, rngs=nnx.Rngs(0))


def _estimate(batch, projection, sizes, param_bytes: int) -> int:
  """The parameters; the state twice (the call's input and the loop's carry): K/V of the
  N cached heads (2 B N S Dh per layer) and, for 'weights', the gathered Q/K/V/O weights
  (4 B K D Dh per layer), for 'grouped' run as tiles (the CPU) the tiles' Q/K/V/O weights
  (4 T D Dh per layer, T tiles), at the compute dtype; one layer's float32 scores B N S
  and logits B V."""
  D, H, V, n = sizes['features'], sizes['heads'], sizes['vocab'], sizes['layers']
  S, e = sizes['prompt'] + sizes['steps'], jnp.dtype(sizes['dtype']).itemsize
  N = H if projection is None else 2
  copies = batch * 2 if projection == 'weights' else 0   # per-layer copies of head weights
  if projection == 'grouped' and decode.grouped_runs_tiles():
    copies = tiles.tile_count(batch * 2, H, tiles.tile_rows(batch * 2, H))
  state = n * (2 * batch * N * S * (D // H) + 4 * copies * D * (D // H)) * e
  return param_bytes + 2 * state + batch * N * S * 4 + batch * V * 4


class _Prefilled:
  """Each candidate's model and its prefilled state of the 8 prompts, made once per run,
  and the parameter bytes of the dense and the gated model, counted once per run."""

  def __init__(self, sizes):
    self.sizes, self.done, self.bytes_of = sizes, {}, {}
    self.prompts_NxL = jax.random.randint(jax.random.key(0), (sizes['prompts'],
                                                              sizes['prompt']),
                                          0, sizes['vocab'])

  def prefill_fn(self, graphdef, projection):
    S = self.sizes['prompt'] + self.sizes['steps']
    return jax.jit(lambda params, prompts: decode.prefill(
        nnx.merge(graphdef, params), prompts, cache_length=S,
        projection=projection or 'auto')[1])

  def param_bytes(self, dense: bool) -> int:
    if dense not in self.bytes_of:
      abstract = nnx.eval_shape(lambda: gpu_model(dense, self.sizes))
      self.bytes_of[dense] = tree_bytes(nnx.state(abstract, nnx.Param))
    return self.bytes_of[dense]

  def get(self, name):
    if name not in self.done:
      model = gpu_model(GPU_CANDIDATES[name] is None, self.sizes)
      graphdef, params = nnx.split(model)
      state = self.prefill_fn(graphdef, GPU_CANDIDATES[name])(params, self.prompts_NxL)
      self.done[name] = (params, jax.block_until_ready(state))
    return self.done[name]


def steps_fn(graphdef, steps: int):
  """jit of `steps` greedy decode steps: (params, state, token_B) -> the last tokens."""
  @jax.jit
  def run_steps(params, state, token_B):
    model = nnx.merge(graphdef, params)

    def body(_, carry):
      state, token_B = carry
      logits_BxV, state = decode.decode_step(model, state, token_B)
      return state, jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.lax.fori_loop(0, steps, body, (state, token_B))[1]
  return run_steps


def gpu_candidate(name, batch, prefilled: _Prefilled) -> Candidate:
  sizes, projection = prefilled.sizes, GPU_CANDIDATES[name]
  make = lambda: gpu_model(projection is None, sizes)
  params = prefilled.param_bytes(projection is None)

  def build():
    graphdef, abstract_params = nnx.split(nnx.eval_shape(make))
    prompts = jax.ShapeDtypeStruct(prefilled.prompts_NxL.shape, jnp.int32)
    state_N = jax.eval_shape(prefilled.prefill_fn(graphdef, projection), abstract_params,
                             prompts)
    tiled = lambda p, s: tile_state(nnx.merge(graphdef, p), s, batch)
    state = jax.eval_shape(tiled, abstract_params, state_N)

    def make_call(compiled):
      params, state_N = prefilled.get(name)
      state = jax.jit(tiled)(params, state_N)
      token_B = jnp.zeros((batch,), jnp.int32)
      return lambda: compiled(params, state, token_B)
    return (steps_fn(graphdef, sizes['steps']),
            (abstract_params, state, jax.ShapeDtypeStruct((batch,), jnp.int32)), make_call)
  return Candidate(_estimate(batch, projection, sizes, params), build)


def run_gpu(settings: Settings) -> list[dict]:
  s, rows = GPU, []
  prefilled = _Prefilled(s)
  for batch in s['batches']:
    fields = dict(batch=batch, prompt=s['prompt'], steps=s['steps'], features=s['features'],
                  heads=s['heads'], layers=s['layers'], dtype=s['dtype'],
                  auto=decode.choose_projection(batch, 2, s['heads']))
    cands = {name: gpu_candidate(name, batch, prefilled) for name in GPU_CANDIDATES}
    rows += run_table('decode', fields, cands, settings,
                      dry_compile=GPU_DRY[1] if batch == GPU_DRY[0] else None)
  for r in rows:
    r['tokens_per_s'] = None if r['median_s'] is None else r['batch'] * r['steps'] / r['median_s']
    r['speedup_vs_dense'] = None if r['ratio_vs_dense'] is None else 1 / r['ratio_vs_dense']
  return rows


def format_gpu_table(rows: list[dict]) -> str:
  r0 = rows[0]
  return format_rows(
      f"decode (GatedLM {r0['layers']} layers, D={r0['features']}, H={r0['heads']}, "
      f"{r0['dtype']}, {r0['prompt']}-token prompts, {r0['steps']} greedy steps; K=2 of 8 "
      "with each step projection; 'auto' picks the `auto` one): median of the steps",
      rows, ('batch', 'auto'),
      extra=lambda r: f"{r['tokens_per_s']:,.0f} tok/s")
