"""The headroom oracle, validated end to end on models whose answer is known by
construction: heads that differ by label (the oracle must find each label's head and a
positive headroom), and interchangeable heads (it must find none)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gating import data
from gating.data import rows as data_rows
from gating.study import evaluation, headroom
from gating.training import loop as train
from gating.training.config import DataConfig, ModelConfig, TrainConfig

H, D, V = 4, 8, 8          # 4 heads of width 2; tokens 0-3 name the task, 4-7 answer
SCALE = 2.0                # after the final LayerNorm an open head's answer logit is 4


def constructed_run(specialised: bool, length: int = 24, per_task: int = 6):
  """A 1-layer GatedLM (top-1 of 4 heads) whose every weight is 0 except: head h's value
  bias [1, 0] and output rows e_h - e_{H+h} (so an open head h adds that direction to the
  residual, whatever the input), LayerNorm scales 1, and an untied output layer that maps
  direction h to answer token 4 + h. Sequences of task t are [t, a, a, ..., a].

  specialised: task t's answer is 4 + t, so only head t helps it (the others hurt).
  Otherwise every head writes direction 0 and every task's answer is token 4: the heads
  are interchangeable."""
  cfg = TrainConfig(model=ModelConfig(num_layers=1, features=D, num_heads=H, head_dim=2,
                                      prefix_len=1, tie_embeddings=False, gate='topk',
                                      active_heads=1),
                    data=DataConfig(num_tasks=H), steps=1)
  tokens, labels = [], []
  for t in range(H):
    answer = 4 + t if specialised else 4
    tokens += [[t] + [answer] * (length - 1)] * per_task
    labels += [t] * per_task
  tokens = np.asarray(tokens, np.int32)
  valid = np.ones_like(tokens, bool)
  split = data_rows._rows(tokens, valid, valid, np.asarray(labels))   # pylint: disable=protected-access
  info = data.DataInfo(vocab_size=V, seq_len=length, prompt_len=1, pad_id=0,
                       label_names=tuple(f'task{t}' for t in range(H)), fingerprint={})
  splits = data.Splits(split, split, split, info)
  graphdef, state = train.create(cfg, info)
  learner, optimizer = nnx.merge(graphdef, state)
  model = learner.model
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] != 'scale' and 'router' not in map(str, path):
      var[...] = jnp.zeros_like(var[...])
  attn = model.blocks[0].attention
  out = np.zeros((H, 2, D), np.float32)
  unembed = np.zeros((D, V), np.float32)
  for h in range(H):
    direction = h if specialised else 0
    out[h, 0, direction], out[h, 0, H + direction] = 1.0, -1.0
    unembed[direction, 4 + direction] = SCALE
  attn.value.bias[...] = jnp.zeros((H, 2)).at[:, 0].set(1.0)
  attn.out.kernel[...] = jnp.asarray(out)
  model.unembed.kernel[...] = jnp.asarray(unembed)
  graphdef, state = nnx.split((learner, optimizer))
  return evaluation.Run('constructed', cfg, splits, graphdef, state, 1)


def loss(right: bool) -> float:
  """The cross-entropy at one position with one head open: its answer's logit is 4."""
  logit = 2 * SCALE          # LayerNorm of e_h - e_{H+h} over D = 8 is 2 (e_h - e_{H+h})
  return float(np.log(np.exp(logit) + V - 1) - (logit if right else 0.0))


def test_the_oracle_finds_each_labels_head_when_heads_differ_by_label():
  report = headroom.headroom(constructed_run(specialised=True), ks=[1], split='test',
                             max_sequences=None)
  (layer,) = report['layers']
  assert layer['by_label_subsets'] == {f'task{t}': [t] for t in range(H)}
  good, bad = loss(True), loss(False)
  assert layer['by_label'] == pytest.approx(good, abs=1e-4)
  assert layer['oracle'] == pytest.approx(good, abs=1e-4)         # every sequence its head
  assert layer['static'] == pytest.approx((good + 3 * bad) / 4, abs=1e-4)
  assert layer['headroom'] == pytest.approx(3 * (bad - good) / 4, abs=1e-4)
  low, high = layer['headroom_ci95']
  assert 0 < low <= layer['headroom'] <= high
  assert layer['oracle_in_sample'] == pytest.approx(good, abs=1e-4)
  assert layer['by_label_closes'] > 0 and 'warning' not in layer
  assert layer['choice_positions'] == {'min': 12, 'median': 12.0}


def test_the_oracle_finds_nothing_when_heads_are_interchangeable():
  report = headroom.headroom(constructed_run(specialised=False), ks=[1], split='test',
                             max_sequences=None)
  (layer,) = report['layers']
  assert layer['static'] == pytest.approx(loss(True), abs=1e-4)
  assert layer['headroom'] == pytest.approx(0.0, abs=1e-6)
  assert layer['by_label'] == pytest.approx(layer['static'], abs=1e-6)
  assert layer['headroom_ci95'] == [pytest.approx(0.0, abs=1e-6)] * 2


def test_forcing_two_different_subsets_changes_the_loss():
  """On task 0's sequences, forcing head 0 gives the right answer's loss, head 1 the wrong
  one's: the forced subset really changes the computation."""
  run = constructed_run(specialised=True)
  learner, _ = nnx.merge(run.graphdef, run.state)
  graphdef, state = nnx.split(learner.model)
  rows, _ = headroom._rows(run.splits.test, None)    # pylint: disable=protected-access
  name = headroom.attention_layers(learner.model)[0][0]
  task0 = np.asarray(rows['label']) == 0
  on_task0 = []
  for head in (0, 1):
    ce_BxL, weight_BxL, _ = headroom._forward(      # pylint: disable=protected-access
        graphdef, state, rows, name, headroom._open(H, (head,)), 1)   # pylint: disable=protected-access
    on_task0.append(np.asarray(ce_BxL)[task0].sum() / np.asarray(weight_BxL)[task0].sum())
  assert on_task0 == [pytest.approx(loss(True), abs=1e-4), pytest.approx(loss(False), abs=1e-4)]


def test_short_sequences_carry_a_warning():
  report = headroom.headroom(constructed_run(specialised=True, length=6), ks=[1],
                             split='test', max_sequences=None)
  (layer,) = report['layers']
  assert layer['choice_positions']['median'] == 3
  assert 'median of 3 choice positions' in layer['warning']
