"""Training benchmark: step time and tokens/s of a GatedLM on the masked and gathered paths
against the dense model, with the train step that training runs (`train.jit_train_step`:
forward, backward, AdamW update, state donated).

Candidates, timed interleaved in one run on one model size:
  dense         gate='dense' (every head, no router), the denominator
  masked_k2     gate='topk', K=2 of 8, masked path (every head computed, then gated)
  gathered_k2   gate='topk', K=2 of 8, gathered path (only the 2 selected heads computed)
Top-k trains with Gumbel noise as the presets do. Sizes: 4 layers, D=256, H=8, L=512,
batch 8 (--quick: 2 layers), where attention (projections and scores) is about half of
the step's FLOPs. Inputs are random byte tokens (vocabulary 258), every position valid and
scored after the gate prefix. Targets (issue 4): masked at most 1.10x the dense step
time; gathered at K=2 of 8 faster than dense.

--size gpu (`run_gpu`): the GatedLM of the gpu forward section (GPU: 8 layers, D = 1024,
H = 8, F = 4096 in G = 8 groups, L = 2048, batch 16), float32 parameters and bfloat16
compute, dense against heads, groups and both at 2 of 8 on the gathered path (top-k with
Gumbel noise), with `plain_train_step`: the train step without `gating.training.loop`,
which imports `datasets` and orbax (a GPU image may lack them). It computes what the
loop's step computes for these configs (the next-token loss, its gradients, clipping and
AdamW with the loop's schedule; a test checks it against the loop's step), less the loop's
metrics. --dry-run compiles both_k2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.bench_memory import tree_bytes
from experiments.bench_rows import Candidate, Settings, format_rows, run_table
from experiments.timing import summarize, time_interleaved
from gating.layers.models import GatedLM
from gating.training import losses
from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

FULL = dict(layers=4, features=256, heads=8, length=512, batch=8, prefix=64)
QUICK = dict(layers=2, features=256, heads=8, length=512, batch=8, prefix=64)
CANDIDATES = {'dense': ('dense', 8, 'masked'), 'masked_k2': ('topk', 2, 'masked'),
              'gathered_k2': ('topk', 2, 'gathered')}


def _config(gate, k, path, sizes) -> TrainConfig:
  model = ModelConfig(num_layers=sizes['layers'], features=sizes['features'],
                      num_heads=sizes['heads'], prefix_len=sizes['prefix'], gate=gate,
                      active_heads=k, path=path, noise=None if gate == 'dense' else 'gumbel')
  return TrainConfig(model=model, data=DataConfig(kind='text', seq_len=sizes['length']),
                     steps=10_000, batch_size=sizes['batch'])


def _step(gate, k, path, sizes):
  """(zero-argument step callable, XLA flops of the compiled step)."""
  return step_callable(_config(gate, k, path, sizes), sizes)


def step_callable(cfg: TrainConfig, sizes):
  """The jitted train step of `cfg` on random byte tokens of sizes['batch'] x
  sizes['length']: (zero-argument step callable, XLA flops of the compiled step)."""
  from gating import data  # pylint: disable=import-outside-toplevel (imports datasets)
  from gating.training import loop as train  # pylint: disable=import-outside-toplevel
  k = cfg.model.active_heads
  B, L = sizes['batch'], sizes['length']
  info = data.DataInfo(vocab_size=data.BYTE_VOCAB, seq_len=L, prompt_len=0,
                       pad_id=data.BYTE_PAD_ID, label_names=('random',), fingerprint={})
  graphdef, state = train.create(cfg, info)
  tokens = np.random.default_rng(0).integers(0, 256, (1, B, L), dtype=np.int32)
  ones = np.ones((1, B, L), bool)
  batch = {'tokens': jnp.asarray(tokens), 'valid': jnp.asarray(ones),
           'target_mask': jnp.asarray(ones), 'label': jnp.zeros((1, B), jnp.int32)}
  compiled = train.jit_train_step(graphdef, cfg, k).lower(state, batch, jnp.int32(0)).compile()
  cost = compiled.cost_analysis()
  holder = {'state': state, 'step': 0}

  def call():
    holder['state'], metrics = compiled(holder['state'], batch, jnp.int32(holder['step']))
    holder['step'] += 1
    return metrics['loss']

  return call, cost.get('flops') if isinstance(cost, dict) else None


def run(quick: bool = False) -> list[dict]:
  sizes = QUICK if quick else FULL
  steps = {name: _step(*spec, sizes) for name, spec in CANDIDATES.items()}
  times = time_interleaved({name: fn for name, (fn, _) in steps.items()},
                           trials=5 if quick else 9, min_seconds=0.5)
  base = summarize(times['dense'])['median_s']
  tokens = sizes['batch'] * sizes['length']
  rows = []
  for name, (gate, k, path) in CANDIDATES.items():
    stats = summarize(times[name])
    rows.append(dict(section='train', candidate=name, gate=gate, K=k, path=path, **sizes,
                     xla_flops=steps[name][1], tokens_per_s=tokens / stats['median_s'],
                     ratio_vs_dense=stats['median_s'] / base, **stats))
  return rows


def format_table(rows: list[dict]) -> str:
  r0 = rows[0]
  lines = [f"train step (GatedLM {r0['layers']} layers, D={r0['features']}, H={r0['heads']}, "
           f"L={r0['length']}, batch {r0['batch']}): median ms [IQR], tokens/s, ratio to dense",
           '  targets: masked_k2 <= 1.10x, gathered_k2 < 1.00x']
  for r in rows:
    flops = '-' if r['xla_flops'] is None else f"{r['xla_flops'] / 1e9:.1f} GFLOP"
    lines.append(f"    {r['candidate']:<12} {r['median_s'] * 1e3:9.1f} ms "
                 f"[{r['q25_s'] * 1e3:.1f}, {r['q75_s'] * 1e3:.1f}]  "
                 f"{r['tokens_per_s']:9,.0f} tok/s  {r['ratio_vs_dense']:6.3f}x  {flops}")
  return '\n'.join(lines)


# -- --size gpu: the plain train step -------------------------------------------------------

GPU = dict(layers=8, features=1024, heads=8, mlp=4096, groups=8, length=2048, batch=16,
           prefix=64, vocab=256, dtype='bfloat16')
# name: (gate, K heads, G groups or None, Kf groups); K = H: every head runs (groups only)
GPU_CANDIDATES = {'dense': ('dense', None, None, None), 'heads_k2': ('topk', 2, None, None),
                  'groups_k2': ('topk', 8, 8, 2), 'both_k2': ('topk', 2, 8, 2)}
GPU_DRY = 'both_k2'


def gpu_lm(spec, sizes, *, param_dtype, train: bool) -> GatedLM:
  """The GatedLM of one candidate: bfloat16 compute, the gated ones on the gathered path,
  with Gumbel noise on the top-k gate when `train` (as the presets train)."""
  gate, k, groups, kf = spec
  return GatedLM(sizes['vocab'], num_layers=sizes['layers'], features=sizes['features'],
                 num_heads=sizes['heads'], mlp_features=sizes['mlp'],
                 max_length=sizes['length'], prefix_len=sizes['prefix'], gate=gate,
                 active_heads=k, mlp_groups=groups, active_groups=kf,
                 path='masked' if gate == 'dense' else 'gathered',
                 noise='gumbel' if train and gate != 'dense' else None,
                 dtype=jnp.dtype(sizes['dtype']), param_dtype=param_dtype, rngs=nnx.Rngs(0))


def optimizer(optim: OptimConfig, steps: int) -> optax.GradientTransformation:
  """The loop's optimizer for the model's parameters: global-norm clipping, then AdamW with
  linear warmup and cosine decay (gating.training.loop.make_optimizer, whose router and
  default groups share this rate unless optim.router_learning_rate is set)."""
  o = optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, min(o.warmup_steps, steps - 1), steps,
      end_value=o.learning_rate * o.final_learning_rate_fraction)
  return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                     optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def plain_train_step(state, batch, step, *, graphdef, seed: int = 0):
  """One step of (model, nnx.Optimizer) on batch {'tokens', 'valid', 'target_mask'} [B, L]:
  loss = mean over scored positions t with a target at t+1 of -log p(token_{t+1});
  gradients, then the optimizer's update. -> (state, loss). Pure.

  Gate noise and dropout draw from key(seed) folded with the step and micro-batch 0, as
  the loop's train_step does with one micro-batch.
  """
  model, opt = nnx.merge(graphdef, state)
  model_def, params, rest = nnx.split(model, nnx.Param, ...)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 0)

  def loss_fn(params):
    out = nnx.merge(model_def, params, rest, copy=True)(
        batch['tokens'], valid_BxL=batch['valid'], deterministic=False,
        rngs=nnx.Rngs(dropout=key))
    ce_BxL, _ = losses.next_token_losses(out.logits_BxLxV, batch['tokens'])
    return losses.weighted_mean(ce_BxL, losses.next_token_weights(out.scored_BxL,
                                                                  batch['target_mask']))
  loss, grads = jax.value_and_grad(loss_fn)(params)
  opt.update(model, grads)
  return nnx.state((model, opt)), loss


def _estimate(spec, sizes, param_bytes: int) -> int:
  """Parameters and gradients (float32) and AdamW's two moments, the batch, and the
  activations the backward keeps: per layer the residual stream and norms (8 B L D), q/k/v/o
  of the N computed heads, the attention probabilities B N L L and the MLP's computed
  channels twice, all at the compute dtype; one layer's float32 scores twice; the float32
  logits three times."""
  _, k, groups, kf = spec
  B, L, D, H, F, V = (sizes[n] for n in ('batch', 'length', 'features', 'heads', 'mlp',
                                         'vocab'))
  e, N = jnp.dtype(sizes['dtype']).itemsize, k or H
  Fk = F if groups is None else F * kf // groups
  per_layer = (8 * B * L * D + 4 * B * L * N * (D // H) + B * N * L * L + 2 * B * L * Fk) * e
  return (4 * param_bytes + B * L * 6 + sizes['layers'] * per_layer + 2 * B * N * L * L * 4
          + 3 * B * L * V * 4)


def gpu_candidate(spec, sizes, steps: int = 10_000) -> Candidate:
  make = lambda: gpu_lm(spec, sizes, param_dtype=jnp.float32, train=True)
  tx = optimizer(OptimConfig(), steps)
  params = tree_bytes(nnx.state(nnx.eval_shape(make), nnx.Param))
  B, L = sizes['batch'], sizes['length']

  def build():
    graphdef, abstract = nnx.split(nnx.eval_shape(
        lambda: (lambda m: (m, nnx.Optimizer(m, tx, wrt=nnx.Param)))(make())))
    fn = jax.jit(lambda s, b, i: plain_train_step(s, b, i, graphdef=graphdef),
                 donate_argnums=0)
    batch = {'tokens': jax.ShapeDtypeStruct((B, L), jnp.int32),
             'valid': jax.ShapeDtypeStruct((B, L), jnp.bool_),
             'target_mask': jax.ShapeDtypeStruct((B, L), jnp.bool_)}

    def make_call(compiled):
      model = make()
      _, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
      tokens = np.random.default_rng(0).integers(0, sizes['vocab'], (B, L), dtype=np.int32)
      ones = jnp.ones((B, L), bool)
      concrete = {'tokens': jnp.asarray(tokens), 'valid': ones, 'target_mask': ones}
      holder = {'state': state, 'step': 0}

      def call():
        holder['state'], loss = compiled(holder['state'], concrete, jnp.int32(holder['step']))
        holder['step'] += 1
        return loss
      return call
    return fn, (abstract, batch, jax.ShapeDtypeStruct((), jnp.int32)), make_call
  return Candidate(_estimate(spec, sizes, params), build)


def run_gpu(settings: Settings) -> list[dict]:
  s = GPU
  fields = dict(layers=s['layers'], features=s['features'], heads=s['heads'], mlp=s['mlp'],
                groups=s['groups'], length=s['length'], batch=s['batch'],
                compute_dtype=s['dtype'], param_dtype='float32')
  rows = run_table('train', fields, {name: gpu_candidate(spec, s)
                                     for name, spec in GPU_CANDIDATES.items()},
                   settings, dry_compile=GPU_DRY)
  for r in rows:
    r['tokens_per_s'] = None if r['median_s'] is None else s['batch'] * s['length'] / r['median_s']
  return rows


def format_gpu_table(rows: list[dict]) -> str:
  r0 = rows[0]
  return format_rows(
      f"train step (plain_train_step: GatedLM {r0['layers']} layers, D={r0['features']}, "
      f"H={r0['heads']}, F={r0['mlp']} in G={r0['groups']} groups, L={r0['length']}, batch "
      f"{r0['batch']}, {r0['compute_dtype']} compute; gated: gathered path, 2 of 8)", rows,
      ('batch', 'length'), extra=lambda r: f"{r['tokens_per_s']:,.0f} tok/s")
