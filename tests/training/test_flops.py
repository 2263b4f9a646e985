"""Training FLOPs are XLA's count of the compiled train step, checked against a count made
by hand from the model's shapes (not against the code's own formula)."""

import dataclasses
import json

import jax
import pytest

from gating import data
from gating.training import loop as train
from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

D, F, H = 64, 256, 4
DENSE = TrainConfig(
    model=ModelConfig(num_layers=1, features=D, num_heads=H, mlp_features=F, gate='dense',
                      active_heads=None, eval_path='masked'),
    data=DataConfig(num_tasks=4, input_len=15, num_digits=10, num_recall_tasks=0,
                    num_induction_tasks=0, num_train=256, num_validation=16, num_test=16),
    optim=OptimConfig(warmup_steps=1), steps=3, batch_size=16, eval_batches=1)


def matmul_flops(cfg, seq_len, vocab):
  """A train step's matrix products, by hand (a multiply-add is 2 FLOPs): per token and
  layer the Q, K, V and output projections (4 D^2), the MLP (2 D F) and attention's two
  products over L keys (2 L D); the tied output layer (D V) once; the backward pass
  computes two products for every forward one (the inputs' and the weights' gradients),
  so a step is 3 forward passes."""
  per_token = cfg.model.num_layers * (2 * (4 * D * D + 2 * D * F) + 4 * seq_len * D) + 2 * D * vocab
  return 3 * cfg.batch_size * seq_len * per_token


@pytest.mark.slow
def test_the_train_steps_flops_are_the_models_matmuls_plus_a_few_percent(trained_run):
  summary = json.load(open(trained_run(DENSE) / 'summary.json'))
  info = train.load_data(DENSE).info
  by_hand = matmul_flops(DENSE, info.seq_len, info.vocab_size)
  (per_step,) = summary['train_flops_per_step'].values()
  # XLA also counts the elementwise work (LayerNorm, GELU, softmax, AdamW): a few percent
  # on this model, never less than the products themselves.
  assert by_hand <= per_step <= 1.1 * by_hand
  assert by_hand * DENSE.steps <= summary['train_flops'] <= 1.1 * by_hand * DENSE.steps
  assert summary['train_flops_counted_as'] == 'XLA cost_analysis flops of the compiled train step'
  # Twice the layers: twice the per-layer products (the output layer once).
  two = dataclasses.replace(DENSE, model=dataclasses.replace(DENSE.model, num_layers=2))
  splits = train.load_data(two)
  graphdef, state = train.create(two, info)
  rows = data.batch_at(splits.train, 0, two.batch_size, 0)
  batch = {k: v[None] for k, v in train.model_inputs(rows).items()}   # one micro-batch
  by_hand_two = matmul_flops(two, info.seq_len, info.vocab_size)
  assert by_hand_two <= train.step_flops(two, graphdef, state, batch, None) <= 1.1 * by_hand_two


def test_a_backend_that_cannot_count_is_refused_before_training(tmp_path, monkeypatch):
  class NoCount:
    def __init__(self, compiled):
      self.compiled = compiled

    def cost_analysis(self):
      return {}
  real = jax.stages.Lowered.compile
  monkeypatch.setattr(jax.stages.Lowered, 'compile', lambda self, *a, **k: NoCount(real(self)))
  with pytest.raises(ValueError, match='XLA cannot count FLOPs on this backend'):
    train.train(DENSE, str(tmp_path / 'run'), progress=False)
  assert not (tmp_path / 'run').exists()
