"""Elastic training: random K-subsets per sequence, the full pass untouched by them,
in-place distillation, and the config's checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.training import config, elastic
from gating.training.metrics_file import read_metrics
from tests.training.test_train import TINY

V, L, D, H = 24, 12, 32, 4


def lm(**kw):
  return gating.GatedLM(vocab_size=V, num_layers=2, features=D, num_heads=H, max_length=L,
                        prefix_len=3, rngs=nnx.Rngs(0), **kw)


def tokens(b=16):
  return jax.random.randint(jax.random.key(0), (b, L), 0, V)


def test_sub_models_use_different_random_subsets_per_sequence():
  model = elastic.random_subsets(lm(gate='dense'), 2)
  out = model(tokens(), deterministic=False, rngs=nnx.Rngs(dropout=1))
  open_BxNxH = np.asarray(out.gate_weights_BxNxH != 0)
  assert (open_BxNxH.sum(axis=2) == 2).all()                  # exactly K per sequence
  np.testing.assert_array_equal(np.unique(out.gate_weights_BxNxH), [0.0, 1.0])
  subsets = {tuple(np.flatnonzero(row)) for row in open_BxNxH[:, 0]}
  assert len(subsets) > 3                                     # they differ per sequence
  again = model(tokens(), deterministic=False, rngs=nnx.Rngs(dropout=2))
  assert (np.asarray(again.gate_weights_BxNxH != 0) != open_BxNxH).any()   # and per step


def test_sub_models_draw_random_group_subsets_too():
  model = elastic.random_subsets(lm(gate='dense', mlp_groups=8), 2, 4)
  out = model(tokens(), deterministic=False, rngs=nnx.Rngs(dropout=1))
  open_BxNxH = np.asarray(out.gate_weights_BxNxH != 0)
  open_BxNxG = np.asarray(out.group_weights_BxNxG != 0)
  assert (open_BxNxH.sum(axis=2) == 2).all() and (open_BxNxG.sum(axis=2) == 4).all()
  np.testing.assert_array_equal(np.unique(out.group_weights_BxNxG), [0.0, 1.0])
  assert len({tuple(np.flatnonzero(row)) for row in open_BxNxG[:, 1]}) > 3
  # Without Kf the groups stay as the model has them (dense: all open).
  heads_only = elastic.random_subsets(lm(gate='dense', mlp_groups=8), 2)
  out = heads_only(tokens(), deterministic=False, rngs=nnx.Rngs(dropout=1))
  assert (np.asarray(out.group_weights_BxNxG) == 1).all()


def test_group_ks_default_to_the_heads_fraction():
  assert elastic.group_ks((1, 2, 4), (), 4, 8) == (2, 4, 8)
  assert elastic.group_ks((1, 2), (), 4, None) == (None, None)
  assert elastic.group_ks((1, 2), (3, 5), 4, 8) == (3, 5)
  with pytest.raises(ValueError, match=r'K G / H is not whole for K=\[1, 3\]'):
    elastic.group_ks((1, 2, 3), (), 4, 2)


def test_the_full_pass_is_the_dense_model_unchanged():
  dense = lm(gate='dense')
  want = dense(tokens(), deterministic=True).logits_BxLxV
  full = elastic.random_subsets(nnx.clone(dense), H)
  got = full(tokens(), deterministic=False, rngs=nnx.Rngs(dropout=3)).logits_BxLxV
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_distillation_is_zero_for_the_teacher_and_teaches_only_the_student():
  teacher = jax.random.normal(jax.random.key(0), (2, 5, 7))
  weight = jnp.ones((2, 5))
  assert float(elastic.distillation(teacher, teacher, weight)) == pytest.approx(0.0, abs=1e-6)
  student = jax.random.normal(jax.random.key(1), (2, 5, 7))
  g_student, g_teacher = jax.grad(elastic.distillation, argnums=(0, 1))(student, teacher, weight)
  assert np.abs(np.asarray(g_student)).sum() > 0 and np.abs(np.asarray(g_teacher)).sum() == 0


@pytest.mark.slow
def test_a_short_elastic_run_trains_every_width(trained_run):
  cfg = dataclasses.replace(
      TINY, steps=12, eval_every=12, checkpoint_every=12,
      model=dataclasses.replace(TINY.model, gate='dense', active_heads=None, noise=None,
                                eval_path='masked'),
      loss=dataclasses.replace(TINY.loss, elastic_ks=(1, 2), distill_weight=0.5))
  lines = [r for r in read_metrics(str(trained_run(cfg) / 'metrics.jsonl'))
           if r['kind'] == 'train']
  assert {'elastic/task_K1', 'elastic/distill_K2'} <= set(lines[-1])
  # active_heads is the full pass's, as task_loss is (it was the last sub-model's, K = 2)
  heads = TINY.model.num_heads
  assert all(r['active_heads'] == [heads] * TINY.model.num_layers for r in lines)
  # Each step's K = 1 sub-model is a random head per sequence: compare means of 4 steps,
  # with a margin, not one noisy pair.
  first, last = (np.mean([r['elastic/task_K1'] for r in part]) for part in (lines[:4], lines[-4:]))
  assert last < first - 0.1, (first, last)
  assert all(np.isfinite(r['loss']) for r in lines)


@pytest.mark.slow
def test_a_short_elastic_run_with_mlp_groups_trains_every_width(trained_run):
  cfg = dataclasses.replace(
      TINY, steps=8, eval_every=8, checkpoint_every=8,
      model=dataclasses.replace(TINY.model, gate='dense', active_heads=None, noise=None,
                                eval_path='masked', mlp_groups=4),
      loss=dataclasses.replace(TINY.loss, elastic_ks=(1, 2), elastic_group_ks=(1, 2)))
  lines = [r for r in read_metrics(str(trained_run(cfg) / 'metrics.jsonl'))
           if r['kind'] == 'train']
  assert {'elastic/task_K1_Kf1', 'elastic/distill_K2_Kf2'} <= set(lines[-1])
  first, last = (np.mean([r['elastic/task_K1_Kf1'] for r in part])
                 for part in (lines[:3], lines[-3:]))
  assert last < first - 0.1, (first, last)


@pytest.mark.parametrize('overrides, match', [
    (['model.mlp_groups=4', 'model.active_groups=none', 'model.gate=dense',
      'model.active_heads=none', 'loss.elastic_ks=1,2'], r'K G / H is not whole for K=\[1\]'),
    (['model.mlp_groups=8', 'model.active_groups=none', 'model.gate=dense',
      'model.active_heads=none', 'loss.elastic_ks=1,2', 'loss.elastic_group_ks=2'],
     'loss.elastic_group_ks has 1 entries for 2 elastic_ks'),
    (['model.mlp_groups=8', 'model.active_groups=none', 'model.gate=dense',
      'model.active_heads=none', 'loss.elastic_ks=2', 'loss.elastic_group_ks=9'],
     r'Kf=9 must be an int in \(0, mlp_groups=8\]'),
    (['loss.elastic_ks=2', 'loss.elastic_group_ks=2'], 'needs model.mlp_groups'),
    (['loss.elastic_group_ks=2'], 'loss.elastic_group_ks: needs loss.elastic_ks'),
    (['loss.elastic_ks=0,2'], r'K=0 must be an int in \(0, num_heads=8\]'),
    (['loss.elastic_ks=2,9'], r'K=9 must be'),
    (['loss.elastic_ks=2,2'], 'repeats a K'),
    (['loss.elastic_ks=2', 'loss.l0_weight=0.1'], 'turn the sparsity terms off'),
    (['loss.elastic_ks=2', 'model.shared_heads=1', 'model.active_heads=2',
      'loss.elastic_ks=1'], r'K=1 must be an int in \(1,'),
    (['loss.distill_weight=1.5'], r'loss.distill_weight: must be in \[0, 1\]'),
    (['loss.elastic_ks=2', 'model.mlp_groups=8', 'model.active_groups=3',
      'model.shared_groups=2'], r'Kf = K G / H = \[2\] must exceed the 2 shared groups'),
])
def test_bad_elastic_settings_are_refused(overrides, match):
  with pytest.raises(ValueError, match=match):
    config.override(config.TrainConfig(), overrides)


def test_elastic_training_has_no_k_schedule():
  with pytest.raises(ValueError, match='loss.elastic_ks: elastic training has no k_schedule'):
    config.TrainConfig(k_schedule=((8, 10), (4, 20)), loss=config.LossConfig(elastic_ks=(2,)))
