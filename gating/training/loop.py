"""Training: a pure jitted train step, an eval step, and the loop (checkpoints, metrics).

The step is a pure function of (state, batch, step): the batch is `data.batch_at(step)`,
randomness is `fold_in(key(seed), step)`, schedules are functions of the step. So a run
restored from the checkpoint of step s continues exactly as the uninterrupted run would:
on the CPU, bit for bit with the same device count.

Loop order at every step s: run the step; fetch the previous step's metrics (one step
late, so the host never stalls the device) and stop on a NaN or Inf; every `eval_every`
steps evaluate; every `checkpoint_every` steps and at the end, fetch this step's metrics
(NaN check first), then checkpoint. Files in the run folder: config.json (the resolved
config), provenance.json, metrics.jsonl (one JSON line per train step and per eval),
events.out.tfevents.* (the same scalars for TensorBoard), wandb/ and wandb_id.txt (the
same scalars for W&B, only with log.wandb set), checkpoints/, summary.json (written last,
atomically: the run is complete; one that cannot be read is moved aside and the final
checkpoint evaluated again). In a multi-process run only process 0 writes files (orbax
aside) and logs to W&B; each process loads only its rows of the batch (see
distributed.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gating import data, pretrained
from gating.training import checkpoint, elastic, router_fit, slices
from gating.training import distributed, folders
from gating.training import losses
from gating.training.metrics_file import MetricsLog
from gating.training import tensorboard
from gating.training import wandb_log
from gating.training.config import (ModelConfig, TrainConfig, compatibility, from_dict,
                                    read_config, training_settings)
from gating.layers.models import GatedEncoder, GatedLM
from gating.training.provenance import provenance
from gating.layers.state import gate_stats, set_temperature


class Lagrange(nnx.Param):
  """A Lagrange multiplier: trained by gradient ascent (its optimizer negates the update)."""


class Learner(nnx.Module):
  """What the optimizer trains: the model and the multipliers of the target Lagrangian."""

  def __init__(self, model: nnx.Module):
    self.model = model
    self.lambda1 = Lagrange(jnp.zeros((), jnp.float32))
    self.lambda2 = Lagrange(jnp.zeros((), jnp.float32))


# -- building ----------------------------------------------------------------------------------

def load_data(cfg: TrainConfig, workdir: str | None = None) -> data.Splits:
  """The run's splits; the classification form when the model is an encoder. With
  gate='slices' every row also carries its slice (`slices.assign`; an assigner stored in
  `workdir`, if it holds one, is read instead of fitted again). Under assigner
  'prefix_loss' the validation and test rows carry slice 0 until a model routes them
  (`slices.route_by_prefix_loss`; the loop and `evaluation.load_run` do)."""
  return load_data_and_assigner(cfg, workdir)[0]


def load_data_and_assigner(cfg: TrainConfig, workdir: str | None = None):
  """(load_data's splits, the assigner's store for the run folder: the k-means centroids
  of 'cluster' or the rounds of 'prefix_loss'; None for 'label' and other rules)."""
  splits = _load_rows(cfg)
  if cfg.model.gate != 'slices':
    return splits, None
  prefix_len = gate_prefix_len(cfg.model, splits.info)
  return slices.assign(splits, cfg.model, cfg.seed, prefix_len, workdir)


def slice_summary(cfg: TrainConfig, splits, assigner) -> dict[str, Any]:
  """What a gate='slices' run reports of its assignment: rows per slice, how often a
  validation or test row's slice (from its prefix) is its whole sequence's, and for
  prefix_loss the steps after which its rounds ran (the stored ones: a run extended past
  its schedule ran those of the old schedule before it and of the new one after)."""
  E = slices.slice_count(cfg.model)
  return {'assigner': slices.assigner_of(cfg.model), 'num_slices': E,
          **({'rounds_at_steps': [int(s) for s in assigner['round_steps']]}
             if slices.is_prefix_loss(cfg.model) else {}),
          'train_rows_per_slice': slices.counts(splits.train, E),
          'validation_prefix_agreement': slices.agreement(splits.validation),
          'test_prefix_agreement': slices.agreement(splits.test)}


def gate_prefix_len(model_cfg: ModelConfig, info: data.DataInfo) -> int:
  """P, the tokens an LM's gate reads: model.prefix_len, or the data's prompt length."""
  return model_cfg.prefix_len or info.prompt_len


def _load_rows(cfg: TrainConfig) -> data.Splits:
  d = cfg.data
  if d.kind == 'synthetic':
    splits = data.synthetic(
        num_tasks=d.num_tasks, input_len=d.input_len, num_digits=d.num_digits,
        num_recall_tasks=d.num_recall_tasks, num_induction_tasks=d.num_induction_tasks,
        num_train=d.num_train, num_validation=d.num_validation, num_test=d.num_test,
        seed=d.seed, task_seed=d.task_seed, num_terms=d.num_terms)
  else:
    splits = data.text(d.sources, seq_len=d.seq_len, seed=d.seed,
                       max_bytes_per_domain=d.max_bytes_per_domain, tokenizer=d.tokenizer)
  data.check_tokens(splits)
  return data.classification(splits) if cfg.model.kind == 'encoder' else splits


def build_model(cfg: ModelConfig, info: data.DataInfo, *, rngs: nnx.Rngs) -> nnx.Module:
  """GatedLM or GatedEncoder from a ModelConfig and the data's vocabulary and length."""
  common = dict(
      num_layers=cfg.num_layers, features=cfg.features, num_heads=cfg.num_heads,
      head_dim=cfg.head_dim, max_length=info.seq_len, positions=cfg.positions,
      mlp_features=cfg.mlp_features,
      dropout_rate=cfg.dropout_rate, gate=cfg.gate, active_heads=cfg.active_heads,
      mlp_groups=cfg.mlp_groups, active_groups=cfg.active_groups, group_router=cfg.group_router,
      path=cfg.path, noise=cfg.noise, noise_scale=cfg.noise_scale,
      scaled_weights=cfg.scaled_weights, temperature=cfg.temperature,
      gate_options=dict(cfg.gate_options),
      router=cfg.router, router_hidden_features=cfg.router_hidden_features,
      router_init_logit=cfg.router_init_logit, shared_heads=cfg.shared_heads,
      shared_groups=cfg.shared_groups, num_kv_heads=cfg.num_kv_heads, unit=cfg.unit,
      norm=cfg.norm, norm_eps=cfg.norm_eps, mlp=cfg.mlp, mlp_bias=cfg.mlp_bias,
      use_bias=cfg.qkv_bias, out_bias=cfg.out_bias, qk_norm=cfg.qk_norm,
      rotary_base=cfg.rotary_base,
      **({} if cfg.rotary_scaling is None else
         {'rotary_scaling': json.loads(cfg.rotary_scaling)}),
      dtype=jnp.dtype(cfg.dtype), rngs=rngs)
  if cfg.kind == 'encoder':
    return GatedEncoder(info.vocab_size, num_classes=len(info.label_names), **common)
  prefix_len = gate_prefix_len(cfg, info)
  if not prefix_len:
    raise ValueError('model.prefix_len: this data has no prompt; set the gate prefix P')
  if prefix_len >= info.seq_len:
    raise ValueError(f'model.prefix_len: P={prefix_len} leaves nothing to score in sequences '
                     f'of length {info.seq_len}')
  return GatedLM(info.vocab_size, prefix_len=prefix_len, tie_embeddings=cfg.tie_embeddings,
                 **common)


def _label(path, _) -> str:
  names = [str(getattr(p, 'key', getattr(p, 'name', p))) for p in path]
  if names and names[0] in ('lambda1', 'lambda2'):
    return 'lagrange'
  return 'router' if 'router' in names else 'default'


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """Clipping, then AdamW with warmup and cosine decay (router: its own rate); the
  Lagrange multipliers take plain gradient ascent on the clipped gradient (the global
  norm covers them with the model's parameters, so a clipped step shrinks their ascent by
  the same factor; CoFi clips the model alone). With loss.router_labels only the routers
  train."""
  o = cfg.optim

  def adamw(peak):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, peak, max(0, min(o.warmup_steps, cfg.steps - 1)), max(cfg.steps, 1),
        end_value=peak * o.final_learning_rate_fraction)
    return optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)

  # Router fitting (loss.router_labels): every parameter but the routers' stays frozen.
  frozen = cfg.loss.router_labels is not None
  return optax.chain(
      optax.clip_by_global_norm(o.clip_norm),
      optax.multi_transform(
          {'default': optax.set_to_zero() if frozen else adamw(o.learning_rate),
           'router': adamw(o.router_learning_rate or o.learning_rate),
           'lagrange': optax.sgd(-o.lagrange_learning_rate)},
          lambda params: jax.tree_util.tree_map_with_path(_label, params)))


def learning_rate(cfg: TrainConfig, step: int) -> float:
  o = cfg.optim
  return float(optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, max(0, min(o.warmup_steps, cfg.steps - 1)), max(cfg.steps, 1),
      end_value=o.learning_rate * o.final_learning_rate_fraction)(step))


def create(cfg: TrainConfig, info: data.DataInfo):
  """(graphdef, state) of (Learner, nnx.Optimizer), freshly initialized from cfg.seed."""
  learner = Learner(build_model(cfg.model, info, rngs=nnx.Rngs(cfg.seed)))
  optimizer = nnx.Optimizer(learner, make_optimizer(cfg), wrt=nnx.Param)
  return nnx.split((learner, optimizer))


# -- the steps ---------------------------------------------------------------------------------

class Outputs(NamedTuple):
  """What a model gives for one batch (see model_outputs)."""
  logits: jax.Array
  ce: jax.Array
  correct: jax.Array
  weight: jax.Array
  gate_weights_BxNxH: jax.Array
  group_weights_BxNxG: jax.Array | None    # the MLP channel groups' gates (None: no groups)


def model_outputs(model, batch, *, deterministic, rngs=None, path=None, active_heads=None,
                  active_groups=None) -> Outputs:
  """Outputs(logits, ce, correct, weight, gate weights, group weights) of one batch.

  LM: logits [B, L, V] and next-token cross-entropy at every position, weighted by scored
  & next-is-target. Encoder: class logits [B, C] and one loss per sequence (shapes [B]).
  `active_groups` overrides the MLP's budget Kf, as `active_heads` does K.
  """
  kw = dict(valid_BxL=batch['valid'], deterministic=deterministic, rngs=rngs, path=path,
            active_heads=active_heads, active_groups=active_groups)
  if 'slice' in batch:    # gate='slices': each sequence's slice (slices.assign)
    kw['slice_B'] = batch['slice']
  if isinstance(model, GatedEncoder):
    out = model(batch['tokens'], **kw)
    ce_B, correct_B = losses.classification_losses(out.class_logits_BxC, batch['label'])
    return Outputs(out.class_logits_BxC, ce_B, correct_B, loss_weights(model, batch),
                   out.gate_weights_BxNxH, out.group_weights_BxNxG)
  out = model(batch['tokens'], **kw)
  ce_BxL, correct_BxL = losses.next_token_losses(out.logits_BxLxV, batch['tokens'])
  return Outputs(out.logits_BxLxV, ce_BxL, correct_BxL, loss_weights(model, batch),
                 out.gate_weights_BxNxH, out.group_weights_BxNxG)


def loss_weights(model, batch):
  """The weight of each loss of `batch` (model_outputs' weight), known without running the
  model: ones [B] for an encoder; for an LM [B, L], scored (t >= P - 1, token t + 1
  valid; `GatedLM.scored`) and token t + 1 a target. What grad_accum weighs its
  micro-batches by (`train_step`)."""
  if isinstance(model, GatedEncoder):
    return jnp.ones(batch['tokens'].shape[:1], jnp.float32)
  return losses.next_token_weights(model.scored(batch['tokens'], batch['valid']),
                                   batch['target_mask'])


def task_outputs(model, batch, **kwargs):
  """Per-position losses of one batch: (ce, correct, weight, gate_weights_BxNxH); see
  model_outputs."""
  return model_outputs(model, batch, **kwargs)[1:5]


def elastic_total_loss(learner: Learner, batch, cfg: TrainConfig, *, rngs, token_share=None):
  """The full model plus one random-subset sub-model per K of loss.elastic_ks, each
  distilled from the full pass (see gating/training/elastic.py); returns (loss, metrics).
  token_share: see total_loss."""
  model, a, m = learner.model, cfg.loss.distill_weight, cfg.model
  kfs = elastic.group_ks(cfg.loss.elastic_ks, cfg.loss.elastic_group_ks, m.num_heads,
                         m.mlp_groups, m.shared_groups)
  elastic.random_subsets(model, m.num_heads, m.mlp_groups)
  logits_full, ce, correct, weight, *_ = model_outputs(model, batch, deterministic=False,
                                                       rngs=rngs)
  stats = gate_stats(model)   # the full pass's, as its task loss and accuracy are
  share = 1.0 if token_share is None else token_share
  full = share * losses.weighted_mean(ce, weight)
  metrics, subs = {}, []
  for k, kf in zip(cfg.loss.elastic_ks, kfs):
    if k == m.num_heads and kf in (None, m.mlp_groups):
      continue          # every head and group: the full pass itself
    elastic.random_subsets(model, k, kf)
    logits_k, ce_k, *_ = model_outputs(model, batch, deterministic=False, rngs=rngs)
    task_k = share * losses.weighted_mean(ce_k, weight)
    distill_k = share * elastic.distillation(logits_k, logits_full, weight)
    subs.append((1 - a) * task_k + a * distill_k)
    name = f'K{k}' if kf is None else f'K{k}_Kf{kf}'
    metrics.update({f'elastic/task_{name}': task_k, f'elastic/distill_{name}': distill_k})
  loss = full + (sum(subs) / len(subs) if subs else 0.0)
  return loss, {'loss': loss, 'task_loss': full,
                'accuracy': share * losses.weighted_mean(correct.astype(jnp.float32), weight),
                'active_heads': losses.active_heads_per_layer(stats), **metrics}


def total_loss(learner: Learner, batch, cfg: TrainConfig, *, target, rngs, active_heads,
               token_share=None):
  """Task loss plus the weighted sparsity terms; returns (loss, metrics). Elastic training
  and router fitting have their own losses (elastic.py, router_fit.py).

  token_share: with grad_accum, this micro-batch's share of the step's loss weight times
  the number of micro-batches (A w_a / W): the token means (task loss, accuracy) are
  scaled by it, so that their mean over the micro-batches is the whole batch's token
  mean, whatever the micro-batches' token counts; the sparsity terms, means over
  sequences (equally many in each micro-batch), are not. Router fitting's loss is per
  sequence and takes no share."""
  if cfg.loss.elastic_ks:
    return elastic_total_loss(learner, batch, cfg, rngs=rngs, token_share=token_share)
  if cfg.loss.router_labels:
    return router_fit.fit_loss(learner.model, batch, labels=cfg.loss.router_labels,
                               kind=cfg.loss.router_loss, outputs_fn=model_outputs)
  ce, correct, weight, _ = task_outputs(learner.model, batch, deterministic=False, rngs=rngs,
                                        active_heads=active_heads)
  share = 1.0 if token_share is None else token_share
  task = share * losses.weighted_mean(ce, weight)
  stats = gate_stats(learner.model)
  l = cfg.loss
  s_hat = losses.expected_l0(stats)
  terms = {'l0': (l.l0_weight, s_hat), 'l1': (l.l1_weight, losses.l1(stats)),
           'load_balance': (l.load_balance_weight, losses.load_balance(stats)),
           'z_loss': (l.z_loss_weight, losses.z_loss(stats))}
  loss = task + sum(w * v for w, v in terms.values() if w)
  if l.target_fraction is not None:
    lagrangian = losses.lagrangian(s_hat, target, learner.lambda1[...], learner.lambda2[...])
    loss = loss + lagrangian
    terms['lagrangian'] = (1.0, lagrangian)
  metrics = {
      'loss': loss, 'task_loss': task,
      'accuracy': share * losses.weighted_mean(correct.astype(jnp.float32), weight),
      'expected_active_fraction': s_hat,
      'active_heads': losses.active_heads_per_layer(stats),
      'usage': jnp.stack([s['usage'] for s in losses.units(stats, 'head').values()]),
      'usage_entropy': losses.usage_entropy(stats),
      **({'active_groups': losses.active_groups_per_layer(stats),
          'group_usage': jnp.stack([s['usage'] for s in losses.units(stats, 'group').values()])}
         if learner.model.trunk.mlp_groups is not None else {}),
      **{f'reg/{name}': value for name, (_, value) in terms.items()},
  }
  return loss, metrics


def train_step(state, batch, step, *, graphdef, cfg: TrainConfig, active_heads):
  """One optimizer step on `batch` (arrays [A, B/A, ...]: A micro-batches). Pure. The
  gradient is the mean of the micro-batches' gradients, their token means weighed by
  their share of the step's tokens, so that it is the whole batch's gradient."""
  learner, optimizer = nnx.merge(graphdef, state)
  if cfg.temperature_start is not None:
    temperature = losses.temperature_at(step, cfg.temperature_start, cfg.temperature_end,
                                        cfg.temperature_steps)
    set_temperature(learner.model, temperature)
  target = (losses.target_at(step, cfg.loss.target_fraction, cfg.loss.target_warmup_steps)
            if cfg.loss.target_fraction is not None else 0.0)
  learner_def, params, rest = nnx.split(learner, nnx.Param, ...)
  step_key = jax.random.fold_in(jax.random.key(cfg.seed), step)

  def micro_loss(params, micro, index, token_share):
    micro_learner = nnx.merge(learner_def, params, rest, copy=True)
    rngs = nnx.Rngs(dropout=jax.random.fold_in(step_key, index))
    return total_loss(micro_learner, micro, cfg, target=target, rngs=rngs,
                      active_heads=active_heads, token_share=token_share)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def accumulate(grads_sum, micro_index_share):
    (_, metrics), grads = grad_fn(params, *micro_index_share)
    return jax.tree.map(jnp.add, grads_sum, grads), metrics

  accum = cfg.grad_accum
  share_A = None        # one micro-batch: its token means are the batch's
  if accum > 1:         # micro-batch a's token means weigh A w_a / W (see total_loss)
    tokens_A = jnp.stack([jnp.sum(loss_weights(learner.model, jax.tree.map(
        lambda x, a=a: x[a], batch))) for a in range(accum)])
    share_A = accum * tokens_A / jnp.maximum(jnp.sum(tokens_A), 1.0)
  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, metrics = jax.lax.scan(accumulate, zeros, (batch, jnp.arange(accum), share_A))
  grads = jax.tree.map(lambda g: g / accum, grads)
  metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
  optimizer.update(learner, grads)
  metrics.update(grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params),
                 lambda1=learner.lambda1[...], lambda2=learner.lambda2[...],
                 target=jnp.asarray(target, jnp.float32))
  if cfg.temperature_start is not None:
    metrics['temperature'] = temperature
  return nnx.state((learner, optimizer)), metrics


def jit_train_step(graphdef, cfg: TrainConfig, active_heads):
  """train_step jitted as the loop runs it: (state, batch, step) -> (state, metrics), with
  the state donated. The benchmark (experiments/bench_train.py) times this very function."""
  return jax.jit(lambda s, b, i: train_step(s, b, i, graphdef=graphdef, cfg=cfg,
                                            active_heads=active_heads),
                 donate_argnums=0)


def eval_step(state, batch, *, graphdef, path, active_heads, active_groups=None):
  """Per-sequence sums on one batch with the deterministic gate: loss, hits, count, heads
  (and channel groups) open."""
  learner, _ = nnx.merge(graphdef, state)
  out = model_outputs(learner.model, batch, deterministic=True, path=path,
                      active_heads=active_heads, active_groups=active_groups)
  ce, correct, weight = out.ce, out.correct, out.weight
  if ce.ndim == 1:
    ce, correct, weight = ce[:, None], correct[:, None], weight[:, None]
  hits = correct.astype(jnp.float32) * weight
  sums = {'loss_sum': jnp.sum(ce * weight, axis=1), 'hits': jnp.sum(hits, axis=1),
          'count': jnp.sum(weight, axis=1),
          'exact': jnp.all((hits == weight), axis=1).astype(jnp.float32),
          'open_BxNxH': (out.gate_weights_BxNxH != 0).astype(jnp.float32)}
  if out.group_weights_BxNxG is not None:
    sums['open_BxNxG'] = (out.group_weights_BxNxG != 0).astype(jnp.float32)
  return sums


# -- evaluation ---------------------------------------------------------------------------------

def evaluate(eval_fn, state, dataset, info: data.DataInfo, batch_size: int,
             max_batches: int | None, shard=lambda b: b,
             fetch=jax.device_get) -> dict[str, Any]:
  """Loss, accuracy and head usage overall and per label, over the rows in order.

  max_batches=None reads every row; max_batches=N reads N batches' worth of rows drawn
  uniformly at random with a fixed seed (`data.sample_rows`: the same rows at every
  evaluation, and the labels in proportion, where the first rows of a split may hold one
  label only; a small sample may miss a rare label, which per_label then leaves out, and
  the final evaluation reads every row). The last batch is filled up with repeats of its
  first rows (one compiled shape), whose results are dropped. shard puts a batch on the
  devices, fetch brings the outputs back (`distributed.fetch` across processes).
  """
  sums = None
  max_rows = None if max_batches is None else max_batches * batch_size
  for rows in data.eval_batches(dataset, batch_size, max_rows):
    n = len(rows['label'])
    if n < batch_size:
      rows = {k: np.concatenate([v, np.resize(v, (batch_size - n,) + v.shape[1:])])
              for k, v in rows.items()}
    out = fetch(eval_fn(state, shard(model_inputs(rows))))
    out = {k: v[:n] for k, v in out.items()}
    out['label'] = rows['label'][:n]
    sums = out if sums is None else {k: np.concatenate([sums[k], out[k]]) for k in out}
  return summarize_eval(sums, info)


def summarize_eval(sums, info: data.DataInfo) -> dict[str, Any]:
  """Per-sequence sums -> the evaluation block: token means (loss, accuracy) over the
  scored tokens, exact_match over the sequences with a scored token (one with none, such
  as a padded window holding one valid token, has nothing to match), usage over every
  sequence; overall and per label."""
  def block(select):
    count = float(sums['count'][select].sum())
    loss = float(sums['loss_sum'][select].sum()) / max(count, 1.0)
    scored = select & (sums['count'] > 0)
    return {'loss': loss, 'accuracy': float(sums['hits'][select].sum()) / max(count, 1.0),
            'exact_match': float(sums['exact'][scored].mean()) if scored.any() else 0.0,
            'bits_per_token': loss / math.log(2), 'sequences': int(select.sum()),
            'usage': sums['open_BxNxH'][select].mean(axis=0).tolist() if select.any() else None,
            **({'group_usage': sums['open_BxNxG'][select].mean(axis=0).tolist()
                if select.any() else None} if 'open_BxNxG' in sums else {})}
  everything = block(np.ones_like(sums['label'], bool))
  everything['per_label'] = {name: block(sums['label'] == i)
                             for i, name in enumerate(info.label_names)
                             if (sums['label'] == i).any()}
  return everything


def model_inputs(rows):
  """The columns of a batch of rows that the model and the loss read (with gate='slices',
  also each row's slice)."""
  slice_column = ('slice',) if 'slice' in rows else ()
  return {k: rows[k] for k in ('tokens', 'valid', 'target_mask', 'label', *slice_column)}


# -- the loop -----------------------------------------------------------------------------------

def _to_python(tree):
  return jax.tree.map(lambda x: np.asarray(x).tolist(), tree)


def _meta(cfg: TrainConfig, info: data.DataInfo, step: int) -> dict[str, Any]:
  return {'step': step, 'config': cfg.to_dict(), 'data': info.fingerprint}


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, info: data.DataInfo, where: str):
  """A checkpoint must come from the same model and data; otherwise a clear error."""
  try:
    saved_cfg = from_dict(saved['config'])
  except ValueError as e:
    raise checkpoint.CheckpointError(f'{where} holds a checkpoint whose config cannot be '
                                     f'read: {e}; nothing was deleted') from None
  mine, theirs = compatibility(cfg), compatibility(saved_cfg)
  diffs = [f'{k}: checkpoint {theirs[k]!r} vs now {mine[k]!r}'
           for k in mine if theirs[k] != mine[k]]
  if diffs:
    raise checkpoint.CheckpointError(
        f'{where} holds a checkpoint of a different model ({"; ".join(diffs)}); use '
        'another --workdir or the same config; nothing was deleted')
  theirs, mine = data.identity(saved.get('data') or {}), data.identity(info.fingerprint)
  if theirs != mine:
    keys = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    raise checkpoint.CheckpointError(
        f'{where} holds a checkpoint trained on different data (the data fingerprints '
        f'differ in {", ".join(keys)}); nothing was deleted')


def check_same_training(saved: dict[str, Any], cfg: TrainConfig, where: str) -> None:
  """Resuming the checkpoint `saved` (its meta) keeps what decides the trajectory: the
  loss and optimizer settings, batch size, gradient accumulation, seed, temperature and K
  schedules. Another value would continue another run than the one the
  checkpoint began (a new batch size even moves the data position), under a config.json
  that describes neither: a ValueError naming each field (config.training_settings;
  what may change is config.RESUMABLE_CHANGES)."""
  theirs = training_settings(from_dict(saved['config']))   # its defaults filled in
  mine = training_settings(cfg)
  diffs = [f'{k}: checkpoint {theirs.get(k)!r} vs now {mine.get(k)!r}'
           for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
  if diffs:
    raise ValueError(f'{where} was trained with other settings ({"; ".join(diffs)}); '
                     'resuming would continue another run than its checkpoints began. Use '
                     'the same settings, or another --workdir')


def check_schedule(saved: dict[str, Any], cfg: TrainConfig, where: str,
                   extend: bool = False) -> str | None:
  """Resuming keeps the schedule a run was fit to: the learning rate's warmup and cosine
  decay (and the eval and checkpoint intervals) are functions of `steps`, so resuming the
  checkpoint `saved` (its meta) with another `steps` would change the rate from the next
  step on. Fewer steps are refused; more are refused unless `extend`, and then the
  returned line says what happens to the schedule (None when nothing changes)."""
  before = from_dict(saved['config']).steps
  if before == cfg.steps:
    return None
  at = int(saved['step'])
  if cfg.steps < before:
    raise ValueError(f'{where} was trained with a schedule fit to {before} steps; '
                     f'{cfg.steps} steps would end it early, at a learning rate it was '
                     'never meant to stop at. To score an earlier checkpoint, use '
                     'experiments.eval --restore-step N; to train a shorter run, use '
                     'another --workdir')
  was = learning_rate(dataclasses.replace(cfg, steps=before), at - 1)
  now = learning_rate(cfg, at)
  change = (f'the learning-rate schedule (warmup, then cosine decay to step {before}) is '
            f'refit to {cfg.steps} steps: the rate of step {at} was {was:.3e}, step '
            f'{at + 1} runs at {now:.3e}')
  if not extend:
    raise ValueError(f'{where} was trained with a schedule fit to {before} steps (it is at '
                     f'step {at}); continuing to {cfg.steps} steps would stretch it: '
                     f'{change}. Pass --extend-schedule to do that, or use another '
                     '--workdir')
  return f'extending {where} from {before} to {cfg.steps} steps: {change}'


def mesh_and_shardings(batch_size: int, grad_accum: int):
  """A 1-D 'data' mesh over all devices: batch sharded, parameters replicated."""
  devices = jax.devices()
  micro = batch_size // grad_accum
  if micro % len(devices):
    raise ValueError(f'batch_size: the micro-batch of {micro} rows (batch_size / grad_accum) '
                     f'is not divisible by the {len(devices)} devices')
  # Auto axes: XLA propagates the batch sharding through the model (no per-op annotations).
  mesh = jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  return (NamedSharding(mesh, PartitionSpec()),
          NamedSharding(mesh, PartitionSpec(None, 'data')),
          NamedSharding(mesh, PartitionSpec('data')))


def train_batch(dataset, step: int, cfg: TrainConfig, sharding):
  """The global batch of `step` as arrays [A, B/A, ...] sharded on the batch axis; each
  process loads only the rows its devices hold (all of them in a one-process run)."""
  accum, micro = cfg.grad_accum, cfg.batch_size // cfg.grad_accum
  lo, hi = distributed.local_rows(sharding, (accum, micro), axis=1)
  positions = (np.arange(accum)[:, None] * micro + np.arange(lo, hi)[None, :]).reshape(-1)
  rows = data.batch_at(dataset, step, cfg.batch_size, cfg.seed, positions=positions)
  return {k: jax.make_array_from_process_local_data(
              sharding, v.reshape((accum, hi - lo) + v.shape[1:]), (accum, micro) + v.shape[1:])
          for k, v in model_inputs(rows).items()}


def warm_start(state, graphdef, source_dir: str):
  """Copies the parameters of another run's final checkpoint into this model: every
  parameter outside the routers must exist there with the same shape (e.g. a dense run's
  weights into a gated model of the same size); routers absent there start fresh.

  A source that lacks a non-router parameter, or holds it in another shape, is another
  model: ValueError, rather than a model that silently starts partly untrained. A missing
  or damaged source checkpoint is a checkpoint.CheckpointError."""
  for name in ('config.json', 'data_info.json'):
    if not os.path.exists(os.path.join(source_dir, name)):
      raise checkpoint.CheckpointError(f'init_from: {source_dir} is not a run folder (no '
                                       f'{name})')
  saved_cfg = read_config(os.path.join(source_dir, 'config.json'))
  with open(os.path.join(source_dir, 'data_info.json')) as f:
    saved_info = data.DataInfo(**json.load(f))
  src_def, src_state = create(saved_cfg, saved_info)
  if not os.path.isdir(os.path.join(source_dir, 'checkpoints')):
    raise checkpoint.CheckpointError(f'init_from: no checkpoint in {source_dir}/checkpoints')
  mngr = checkpoint.manager(os.path.join(source_dir, 'checkpoints'))
  try:
    loaded = checkpoint.load(mngr, src_state, where=source_dir)
  finally:
    mngr.close()
  if loaded is None:
    raise checkpoint.CheckpointError(f'init_from: no checkpoint in {source_dir}/checkpoints')
  src_state = loaded[1]
  source, _ = nnx.merge(src_def, src_state)
  learner, optimizer = nnx.merge(graphdef, state)
  src_params = dict(nnx.to_flat_state(nnx.state(source.model, nnx.Param)))
  copied, missing = 0, []
  for path, var in nnx.to_flat_state(nnx.state(learner.model, nnx.Param)):
    if path in src_params and src_params[path][...].shape == var[...].shape:
      var[...] = src_params[path][...]
      copied += 1
    elif 'router' not in map(str, path):
      there = src_params[path][...].shape if path in src_params else 'absent'
      missing.append(f"{'/'.join(map(str, path))} ({there} there, {var[...].shape} here)")
  if missing:
    raise ValueError(f'init_from={source_dir} is another model: {len(missing)} parameters '
                     f'outside the routers do not match, e.g. {missing[0]}')
  return nnx.state((learner, optimizer)), copied


def check_flops_countable() -> None:
  """A ValueError, before any training, when XLA's cost analysis on this backend gives no
  FLOP count (the study tables compare rows by training FLOPs, so a run must not end
  without one): probed on a small compiled matmul."""
  x = jax.ShapeDtypeStruct((8, 8), jnp.float32)
  cost = jax.jit(jnp.matmul).lower(x, x).compile().cost_analysis()
  if not (isinstance(cost, dict) and cost.get('flops')):
    raise ValueError(f'XLA cannot count FLOPs on this backend ({jax.default_backend()}): the '
                     'cost analysis of a compiled matmul has no "flops", so the run\'s '
                     'training FLOPs could not be reported')


def step_flops(cfg: TrainConfig, graphdef, state, batch, k, jitted=None) -> float:
  """XLA's FLOP count of the compiled train step at budget `k` on `batch` ([A, B/A, ...]):
  the cost analysis of the optimized executable, as evaluation counts its step, for the
  whole global batch on one device. XLA counts a loop's body once, so the step is compiled
  without gradient accumulation (grad_accum=1 on the whole batch: the same arithmetic, as
  one micro-batch), and the importance labels unroll their passes (importance.py). A step
  sharded over D devices is counted on an unsharded copy: the cost analysis of a sharded
  executable is that of one device's program, about 1/D of the step (a run's count then
  depended on its device count). `jitted`: the loop's own jitted step at this K
  (`jit_train_step`), used on one device without accumulation: JAX keeps the executable
  it ran, so the count costs no second trace or compile. A RuntimeError when the count is
  missing."""
  if cfg.grad_accum == 1 and jitted is not None and jax.device_count() == 1:
    whole, fn = batch, jitted   # the very step the loop ran
  else:
    unsharded = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    whole = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        (1, x.shape[0] * x.shape[1], *x.shape[2:]), x.dtype), batch)
    state = jax.tree.map(unsharded, state)
    fn = jit_train_step(graphdef, dataclasses.replace(cfg, grad_accum=1), k)
  compiled = fn.lower(state, whole, jnp.int32(0)).compile()
  cost = compiled.cost_analysis()
  if not (isinstance(cost, dict) and cost.get('flops')):
    raise RuntimeError(f'XLA gave no FLOP count for the compiled train step at K={k} '
                       f'(backend {jax.default_backend()})')
  return float(cost['flops'])


def with_trained_temperature(cfg: TrainConfig, graphdef, state, step: int):
  """The state with every gate's temperature where `step` train steps left it:
  temperature_at(step - 1) when the run anneals it (train_step sets it each step, and a
  checkpoint holds only Param and OptState, so a restored state carries the layers'
  initial temperature and would be evaluated, or trained on, at it). Unchanged when the
  run does not anneal, or at step 0."""
  if cfg.temperature_start is None or step < 1:
    return state
  learner, optimizer = nnx.merge(graphdef, state)
  set_temperature(learner.model, losses.temperature_at(    # as train_step computes it
      jnp.int32(step - 1), cfg.temperature_start, cfg.temperature_end, cfg.temperature_steps))
  return nnx.state((learner, optimizer))


def pretrained_start(state, graphdef, folder: str):
  """(state, arrays copied): the model's weights read from the Hugging Face checkpoint in
  `folder` (gating.pretrained.load_weights; routers fresh), for a new run whose
  model.pretrained names it. A checkpoint of another architecture is a ValueError."""
  learner, optimizer = nnx.merge(graphdef, state)
  pretrained.load_weights(learner.model, folder)
  copied = sum(1 for p, _ in nnx.to_flat_state(nnx.state(learner.model, nnx.Param))
               if 'router' not in map(str, p))
  return nnx.state((learner, optimizer)), copied


def training_flops(cfg: TrainConfig, graphdef, state, batch,
                   jitted: Callable[[Any], Any] | None = None) -> dict[str, Any]:
  """XLA's FLOP count of the compiled train step (`step_flops`, at every K the run trains
  with) times the steps run at that K; with init_from, the source run's total is added
  (`train_flops_with_init`), so a warm-started point reports what all of its training
  cost. `jitted(k)`: the loop's jitted step at K, if it has one (see `step_flops`)."""
  counts: dict[int, int] = {}
  for step in range(cfg.steps):
    k = losses.k_at(step, cfg.k_schedule, cfg.model.active_heads)
    counts[k] = counts.get(k, 0) + 1
  per_step = {k: step_flops(cfg, graphdef, state, batch, k, jitted and jitted(k))
              for k in counts}
  own = sum(per_step[k] * n for k, n in counts.items())
  out = {'train_flops': own, 'train_flops_per_step': {str(k): v for k, v in per_step.items()},
         'train_flops_counted_as': 'XLA cost_analysis flops of the compiled train step'}
  if cfg.init_from:
    try:
      with open(os.path.join(cfg.init_from, 'summary.json')) as f:
        source = json.load(f)
    except (OSError, ValueError):
      source = {}
    earlier = source.get('train_flops_with_init', source.get('train_flops'))
    out['train_flops_with_init'] = None if earlier is None else own + earlier
  return out


def _move_aside(path: str, why: str = 'damaged') -> str:
  """Renames the file `path` (NAME.json) to the first free NAME.<why>[.N].json (damaged,
  or earlier: the summary of a run now trained on), its bytes kept as they were; returns
  the new path."""
  stem, n = path[:-len('.json')] + f'.{why}', 0
  moved = f'{stem}.json'
  while os.path.exists(moved):
    n += 1
    moved = f'{stem}.{n}.json'
  os.replace(path, moved)
  return moved


def _finished_summary(path: str, main_process: bool) -> dict[str, Any] | None:
  """The summary.json of a run whose last step is checkpointed, or None where it cannot
  be read (cut by a kill while it was written, before it was written atomically, or
  damaged since): it is then moved aside (`_move_aside`, by the main process) and the
  final evaluation runs again from the last checkpoint."""
  try:
    with open(path) as f:
      summary = json.load(f)
    if isinstance(summary, dict):
      return summary
  except ValueError:
    pass
  if main_process:
    print(f'{path} cannot be read; moved aside to {os.path.basename(_move_aside(path))}; '
          'the final checkpoint is evaluated again', flush=True)
  return None


def _write_provenance(path: str, record: dict[str, Any]) -> None:
  """provenance.json holds the newest session's record; the records of the sessions that
  trained earlier steps are kept, oldest first, under 'earlier' (appended, never lost).
  A provenance.json that cannot be read is moved aside whole, to the first free name
  provenance.damaged[.N].json (a rename: its bytes are kept as they were), and the new
  record names it under 'damaged_earlier_record'."""
  earlier, damaged = [], None
  if os.path.exists(path):
    try:
      with open(path) as f:
        previous = json.load(f)
      if not isinstance(previous, dict) or not isinstance(previous.get('earlier', []), list):
        raise ValueError('not a provenance record')
      earlier = previous.pop('earlier', []) + [previous]
    except (OSError, ValueError):
      damaged = _move_aside(path)
  if damaged:
    record = {**record, 'damaged_earlier_record': os.path.basename(damaged)}
  folders.write_json(path, {**record, 'earlier': earlier})


def train(cfg: TrainConfig, workdir: str, *, progress: bool = True,
          stop_after: int | None = None, restore_step: int | None = None,
          extend_schedule: bool = False) -> dict[str, Any] | None:
  """Trains (or resumes) the run in `workdir`; returns the final summary.

  The data and the model are built before anything is written, so bad data leaves no
  folder behind (nor does log.wandb without wandb installed); a workdir that cannot be a
  folder (a file's path, or a path under a file) is a ValueError before anything else is
  done (`folders.check_output_folder`). A finished
  run (its last step checkpointed and summary.json written) is left as it is: its summary
  comes back with 'already_finished': True.

  stop_after: checkpoint at this step and return None (the run resumes from there later,
  exactly as if it had not stopped).
  restore_step: resume from this checkpoint instead of the latest (e.g. when the latest is
  corrupt); the later steps are moved aside into checkpoints_quarantine/ (a rename).
  extend_schedule: resume a run with more `steps` than it was trained for (refused
  otherwise: `check_schedule`), refitting its learning-rate schedule to the new length.
  """
  from tqdm.auto import tqdm

  main_process = jax.process_index() == 0
  folders.check_output_folder(workdir, 'workdir')
  if cfg.log.wandb:
    wandb_log.require()
  check_flops_countable()
  splits, assigner = load_data_and_assigner(cfg, workdir)
  info = splits.info
  replicated, batch_sharding, eval_sharding = mesh_and_shardings(cfg.batch_size,
                                                                cfg.grad_accum)
  graphdef, state = create(cfg, info)
  state = distributed.replicate(state, replicated)  # the restore target's placement
  checkpoints = os.path.join(workdir, 'checkpoints')
  if restore_step is not None and not os.path.isdir(checkpoints):
    raise checkpoint.CheckpointError(f'--restore-step {restore_step}: {workdir} holds no '
                                     'checkpoints')
  warm = None
  if cfg.init_from and not os.path.isdir(checkpoints):
    # A new run: read the source before any folder is made, so a bad one leaves none.
    warm = warm_start(state, graphdef, cfg.init_from)
  elif cfg.model.pretrained and not os.path.isdir(checkpoints):
    warm = pretrained_start(state, graphdef, cfg.model.pretrained)

  os.makedirs(workdir, exist_ok=True)
  mngr = checkpoint.manager(checkpoints, cfg.keep_checkpoints)
  log = MetricsLog(os.path.join(workdir, 'metrics.jsonl'))
  start = 0
  extended = []

  def check(meta):
    check_compatible(meta, cfg, info, workdir)
    check_same_training(meta, cfg, workdir)
    extended.append(check_schedule(meta, cfg, workdir, extend_schedule))
  try:
    loaded = checkpoint.load(mngr, state, step=restore_step, where=workdir, check=check)
  except BaseException:
    mngr.close()
    raise
  if loaded is not None and restore_step is not None:
    later = [s for s in mngr.all_steps() if s > restore_step]
    mngr.close()
    moved = checkpoint.quarantine(checkpoints, later) if main_process else None
    if moved:
      print(f'moved checkpoint steps {sorted(later)} aside into {moved} (nothing deleted)',
            flush=True)
    mngr = checkpoint.manager(checkpoints, cfg.keep_checkpoints)
  summary_path = os.path.join(workdir, 'summary.json')
  finished = (_finished_summary(summary_path, main_process) if loaded is not None
              and loaded[0] >= cfg.steps and os.path.exists(summary_path) else None)
  if finished is not None:
    mngr.close()
    print(f'{workdir} is a finished run (step {loaded[0]} of {cfg.steps}); its files are '
          'left as they are', flush=True)
    return {**finished, 'already_finished': True}
  if loaded is not None:
    start, state, _ = loaded
    state = with_trained_temperature(cfg, graphdef, state, start)
    if main_process:
      log.truncate_after(start)
      print(f'resuming {workdir} from step {start}', flush=True)
      if os.path.exists(summary_path):   # of the run before it was extended, or restored
        print(f'summary.json (of the run that ended before) moved aside to '
              f'{os.path.basename(_move_aside(summary_path, "earlier"))}', flush=True)
      if extended[-1]:
        print(extended[-1], flush=True)
  else:
    if cfg.init_from or cfg.model.pretrained:
      state, copied = warm or (warm_start(state, graphdef, cfg.init_from) if cfg.init_from
                               else pretrained_start(state, graphdef, cfg.model.pretrained))
      print(f'warm start: {copied} parameter arrays from '
            f'{cfg.init_from or cfg.model.pretrained}', flush=True)
    if main_process:
      log.truncate_after(-1)
  # Event files beside metrics.jsonl; steps after the checkpoint are purged on resume.
  board = tensorboard.ScalarLog(workdir, purge_step=start + 1) if main_process else None
  # With log.wandb, the same scalars to W&B (offline unless WANDB_MODE says otherwise).
  w_and_b = (wandb_log.WandbLog(cfg.log.wandb, workdir, config=cfg.to_dict())
             if main_process and cfg.log.wandb else None)
  if main_process:
    # atomic, the same bytes as cfg.to_json() (its keys come sorted from it)
    folders.write_json(os.path.join(workdir, 'config.json'), json.loads(cfg.to_json()))
    folders.write_json(os.path.join(workdir, 'data_info.json'), dataclasses.asdict(info))
    if assigner is not None and not os.path.exists(os.path.join(workdir, slices.STORE)):
      slices.save(workdir, assigner)
    _write_provenance(os.path.join(workdir, 'provenance.json'),
                      {**provenance(), 'data': info.fingerprint, 'from_step': start,
                       **({'schedule_extended': extended[-1]}
                          if loaded is not None and extended[-1] else {})})
  state = distributed.replicate(state, replicated)
  prefix_rounds = slices.is_prefix_loss(cfg.model)
  if prefix_rounds:   # SmallTalk: the assignment in force at `start`, and the rounds to come
    score_slices = slices.prefix_scorer(graphdef, slices.slice_count(cfg.model))
    prefix_len = gate_prefix_len(cfg.model, info)
    splits = slices.at_step(splits, assigner, start)
    round_at = set(slices.round_steps(cfg.steps, slices.rounds_of(cfg.model)))

  steps_fn = {}

  def step_fn(k):
    if k not in steps_fn:
      steps_fn[k] = jit_train_step(graphdef, cfg, k)
    return steps_fn[k]

  final_k = cfg.model.active_heads
  eval_path = cfg.model.effective_eval_path
  eval_fn = jax.jit(lambda s, b: eval_step(s, b, graphdef=graphdef, path=eval_path,
                                           active_heads=final_k))
  shard_eval = lambda b: distributed.global_batch(eval_sharding, b)

  def run_eval(step, split='validation', max_batches=cfg.eval_batches, final=False):
    dataset = getattr(splits, split)
    result = evaluate(eval_fn, state, dataset, info, cfg.batch_size, max_batches, shard_eval,
                      distributed.fetch)
    if not math.isfinite(result['loss']):
      raise FloatingPointError(f'the {split} loss is {result["loss"]} at step {step}; '
                               'stopping (nothing of this evaluation was written)')
    if main_process:
      record = {'step': step, 'kind': 'eval', 'split': split, 'path': eval_path, **result,
                **({'final': True} if final else {})}
      log.write(record)
      board.write(record)
      if w_and_b:
        w_and_b.write(record)
    return result

  tokens_per_step = cfg.batch_size * info.seq_len
  pending = None  # (step, metrics on device, dispatch time) of the previous step

  def flush(pending):
    step, metrics, t_dispatch, k = pending
    metrics = _to_python(distributed.fetch(metrics))
    if not (math.isfinite(metrics['loss']) and math.isfinite(metrics['grad_norm'])):
      last = mngr.latest_step()
      raise FloatingPointError(
          f'loss is {metrics["loss"]} (gradient norm {metrics["grad_norm"]}) at step {step}; '
          f'stopping. The last good checkpoint (step {last}) is kept in {mngr.directory}')
    if main_process:
      record = {'step': step, 'kind': 'train', **metrics, 'K': k,
                'lr': learning_rate(cfg, step - 1),
                'tokens_per_s': tokens_per_step / max(time.time() - t_dispatch, 1e-9),
                'time': time.time()}
      log.write(record)
      board.write(record)
      if w_and_b:
        w_and_b.write(record)
    return metrics

  bar = tqdm(total=cfg.steps, initial=start, disable=not (progress and main_process),
             desc=os.path.basename(os.path.normpath(workdir)), dynamic_ncols=True)
  last_metrics = None
  last_step = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
  for step in range(start + 1, last_step + 1):
    k = losses.k_at(step - 1, cfg.k_schedule, final_k)
    if prefix_rounds and step - 1 in round_at:   # reassign after step - 1 steps
      splits, slice_N = slices.reassign_training_rows(splits, score_slices, state, prefix_len,
                                                      cfg.batch_size,
                                                      slices.balance_of(cfg.model))
      assigner = slices.add_round(assigner, step - 1, slice_N)
      if main_process:
        slices.save(workdir, assigner)
    batch = train_batch(splits.train, step - 1, cfg, batch_sharding)
    t_dispatch = time.time()
    state, metrics = step_fn(k)(state, batch, jnp.int32(step - 1))
    if pending is not None:
      last_metrics = flush(pending)
    pending = (step, metrics, t_dispatch, k)
    evaluate_now = step % cfg.eval_interval == 0 or step == cfg.steps
    save_now = step % cfg.checkpoint_interval == 0 or step in (cfg.steps, last_step)
    if evaluate_now or save_now:
      last_metrics, pending = flush(pending), None
      if evaluate_now:
        if prefix_rounds:
          splits = slices.route_by_prefix_loss(splits, score_slices, state, prefix_len,
                                               cfg.batch_size)
        result = run_eval(step)
        bar.set_postfix(val_loss=f'{result["loss"]:.3f}', val_acc=f'{result["accuracy"]:.3f}')
      if save_now:
        checkpoint.save(mngr, step, state, _meta(cfg, info, step))
        if board:
          board.flush()
    if last_metrics is not None:
      bar.set_postfix(loss=f'{last_metrics["loss"]:.3f}', refresh=False)
    bar.update(1)
  if pending is not None:
    flush(pending)
  if cfg.steps == 0 and start == 0:   # a conversion (model.pretrained): its step-0 weights
    checkpoint.save(mngr, 0, state, _meta(cfg, info, 0))
  bar.close()
  if last_step < cfg.steps:
    mngr.close()
    if board:
      board.close()
    if w_and_b:
      w_and_b.close()
    return None

  if prefix_rounds:
    splits = slices.route_by_prefix_loss(splits, score_slices, state, prefix_len,
                                         cfg.batch_size, whole=True)
  summary = {'steps': cfg.steps, 'tokens_seen': cfg.steps * tokens_per_step,
             **training_flops(cfg, graphdef, state, train_batch(splits.train, 0, cfg,
                                                                batch_sharding), step_fn),
             'validation': run_eval(cfg.steps, 'validation', None, final=True),
             'test': run_eval(cfg.steps, 'test', None, final=True),
             **({'slices': slice_summary(cfg, splits, assigner)}
                if cfg.model.gate == 'slices' else {})}
  if prefix_rounds:   # the rounds' scoring passes (those run), beside the train steps' FLOPs
    summary['assignment_flops'] = len(assigner['round_steps']) * slices.round_flops(
        score_slices, state, len(splits.train), prefix_len, cfg.batch_size)
    base = summary.get('train_flops_with_init') or summary['train_flops']
    summary['train_flops_with_assignment'] = base + summary['assignment_flops']
  if main_process:
    board.close()
    if w_and_b:
      w_and_b.close()
    folders.write_json(summary_path, summary)   # atomic: written last, it marks the run
                                                # finished, so never half written
  mngr.close()
  return summary
