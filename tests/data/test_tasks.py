import json

import datasets
import numpy as np
import pytest

from gating import data
from gating.data import tasks
from tests.data.helpers import SMALL, columns, rows_of


# --- synthetic ---------------------------------------------------------------------------

def test_synthetic_columns_dtypes_shapes(small):
  info = small.info
  T = SMALL['num_tasks'] + SMALL['num_recall_tasks'] + SMALL['num_induction_tasks']
  assert len(info.label_names) == T and info.vocab_size == SMALL['num_digits'] + 2 + T
  assert info.prompt_len == SMALL['input_len'] + 2
  assert info.seq_len == info.prompt_len + SMALL['input_len']
  for split, n in zip(small[:3], (600, 60, 90)):
    assert isinstance(split, datasets.Dataset) and split.format['type'] == 'numpy'
    assert set(split.column_names) == {'tokens', 'valid', 'target_mask', 'label'}
    assert split.features['tokens'].feature.dtype == 'int32'
    batch = columns(split)
    assert len(batch['label']) == n
    assert batch['tokens'].dtype == np.int32 and batch['tokens'].shape == (n, info.seq_len)
    assert batch['valid'].dtype == bool and batch['target_mask'].dtype == bool
    assert batch['label'].dtype == np.int64 and batch['label'].shape == (n,)
    assert batch['tokens'].min() >= 0 and batch['tokens'].max() < info.vocab_size
    assert (batch['tokens'][~batch['valid']] == info.pad_id).all()
    assert np.bincount(batch['label'], minlength=T).min() >= n // T   # balanced


def test_synthetic_layout(small):
  info, n = small.info, SMALL['input_len']
  batch = columns(small.train)
  tokens, valid, target, label = batch['tokens'], batch['valid'], batch['target_mask'], \
      batch['label']
  sep = SMALL['num_digits'] + 1
  assert (tokens[:, 0] == sep + 1 + label).all()       # the task token
  assert (tokens[:, 1:n + 1] < SMALL['num_digits']).all()
  assert (tokens[:, n + 1] == sep).all()
  pos = np.arange(info.seq_len)
  assert (target == valid & (pos >= info.prompt_len)).all()
  assert valid[:, :info.prompt_len].all()
  out_len = target.sum(1)
  assert (valid.sum(1) == info.prompt_len + out_len).all()      # valid is a prefix
  expected = [n] * 4 + [n - 2 * ((n - 1) // 2)] * 2 + [1, 2, 3]
  assert (out_len == np.array(expected)[label]).all()


def test_synthetic_task_logic(small):
  """Recompute every output with plain Python from its input."""
  info, n = small.info, SMALL['input_len']
  perms = info.fingerprint['permutations']
  batch = columns(small.train)
  for tokens, target, label in zip(batch['tokens'], batch['target_mask'], batch['label']):
    x, y = [int(v) for v in tokens[1:n + 1]], [int(v) for v in tokens[target]]
    name = info.label_names[label]
    kind, r = name.split('_')[0], int(name.split('_')[1])
    if kind == 'permute':
      assert y == [x[i] for i in perms[r]]
    elif kind == 'recall':
      p = (n - 1) // 2
      keys, values, queries = x[0:2 * p:2], x[1:2 * p:2], x[2 * p:]
      assert len(set(keys)) == p and len(set(queries)) == len(queries)
      assert y == [values[(keys.index(q) + r) % p] for q in queries]
    else:
      query, context = x[-1], x[:-1]
      last = max(i for i, v in enumerate(context) if v == query)
      assert last + r + 1 <= n - 2
      assert y == context[last + 1:last + r + 2]


def test_synthetic_deterministic_and_task_seed():
  a, b = data.synthetic(**SMALL, seed=3), data.synthetic(**SMALL, seed=3)
  assert a.info == b.info
  for x, y in zip(a[:3], b[:3]):
    for k, v in columns(x).items():
      np.testing.assert_array_equal(v, columns(y)[k])
  c = data.synthetic(**SMALL, seed=4)
  assert c.info.fingerprint['sha256'] != a.info.fingerprint['sha256']
  json.dumps(a.info.fingerprint)                        # serializable for the run folder
  assert c.info.fingerprint['permutations'] == a.info.fingerprint['permutations']
  d = data.synthetic(**SMALL, seed=3, task_seed=1)
  assert d.info.fingerprint['permutations'] != a.info.fingerprint['permutations']
  perms = a.info.fingerprint['permutations']
  assert len({tuple(p) for p in perms}) == len(perms)
  assert all(p != sorted(p) for p in perms)          # no identity (copy) task


def test_sum_tasks_add_their_terms_at_distinct_positions():
  """num_terms = 3: every answer digit is the sum mod V of three input digits, at three
  distinct positions; the first term is the one-term benchmark's permutation, and the
  one-term fingerprint is what it was before num_terms existed."""
  one, three = data.synthetic(**SMALL), data.synthetic(**SMALL, num_terms=3)
  info, n, V = three.info, SMALL['input_len'], SMALL['num_digits']
  assert 'num_terms' not in one.info.fingerprint and 'more_terms' not in one.info.fingerprint
  assert info.fingerprint['num_terms'] == 3
  assert info.fingerprint['permutations'] == one.info.fingerprint['permutations']
  terms = [info.fingerprint['permutations'], *info.fingerprint['more_terms']]
  assert info.label_names[:SMALL['num_tasks']] == tuple(
      f'sum3_{t}' for t in range(SMALL['num_tasks']))
  for t in range(SMALL['num_tasks']):
    for j in range(n):
      assert len({term[t][j] for term in terms}) == 3
  batch = columns(three.train)
  summed = 0
  for tokens, target, label in zip(batch['tokens'], batch['target_mask'], batch['label']):
    if label < SMALL['num_tasks']:
      x, y = [int(v) for v in tokens[1:n + 1]], [int(v) for v in tokens[target]]
      assert y == [sum(x[term[label][j]] for term in terms) % V for j in range(n)]
      summed += 1
  assert summed >= 100
  # the same tasks in the stream
  task_knobs = {k: v for k, v in SMALL.items()
                if k not in ('num_train', 'num_validation', 'num_test')}
  _, stream_info = data.synthetic_stream(**task_knobs, num_terms=3)
  assert stream_info.fingerprint['more_terms'] == info.fingerprint['more_terms']


@pytest.mark.parametrize('num_terms', [0, 9, 1.5])
def test_bad_num_terms_is_refused(num_terms):
  with pytest.raises(ValueError, match=r'num_terms must be an int in \[1, input_len=8\]'):
    data.synthetic(**SMALL, num_terms=num_terms)


def test_terms_that_cannot_be_placed_are_refused_not_drawn_for_hours(monkeypatch):
  """num_terms near input_len drew each last term by rejection without end (12 of 12
  did not finish); the draws are capped, with an error naming num_terms."""
  monkeypatch.setattr(tasks, 'MAX_TERM_DRAWS', 50)
  with pytest.raises(ValueError, match=r'num_terms=8 with input_len=8: no placement of term '
                                       r'\d+ apart from the earlier terms in 50 random draws'):
    data.synthetic(**dict(SMALL, num_tasks=1, num_recall_tasks=0, num_induction_tasks=0),
                   num_terms=8)


def test_a_seed_numpy_would_fold_into_another_is_refused():
  """numpy seeds [key, 2**32, 0] as [key, 0, 1, 0]: seed 2**32's training rows were seed
  0's validation rows."""
  with pytest.raises(ValueError, match=r'seed must be < 2\*\*32, got 4294967296'):
    data.synthetic(**SMALL, seed=2**32)


def test_synthetic_splits_disjoint(small):
  assert not rows_of(small.train) & (rows_of(small.validation) | rows_of(small.test))
  # A tiny space (4 possible sequences) collides: train drops what validation/test hold.
  tiny = data.synthetic(num_tasks=1, input_len=2, num_digits=2, num_recall_tasks=0,
                        num_induction_tasks=0, num_train=50, num_validation=3, num_test=3)
  held_out = rows_of(tiny.validation) | rows_of(tiny.test)
  assert not rows_of(tiny.train) & held_out
  assert len(tiny.train) + tiny.info.fingerprint['train_dropped_as_held_out'] == 50
  assert len(tiny.train) < 50


def test_synthetic_seq_len_pads():
  s = data.synthetic(**SMALL, seq_len=40)
  batch = columns(s.test)
  assert s.info.seq_len == 40 and batch['tokens'].shape[1] == 40
  assert not batch['valid'][:, 18:].any()


@pytest.mark.parametrize('kwargs, match', [
    (dict(seq_len=10), 'seq_len=10 is shorter'),
    (dict(num_tasks=-1), 'num_tasks'),
    (dict(num_tasks=0, num_recall_tasks=0, num_induction_tasks=0), 'must be >= 1'),
    (dict(input_len=1), 'input_len'),
    (dict(input_len=3, num_tasks=6), 'non-identity permutations'),
    (dict(num_digits=1), 'num_digits'),
    (dict(recall_pairs=4), 'recall_pairs'),
    (dict(recall_pairs=1), 'query slots'),
    (dict(num_induction_tasks=7), 'too short for num_induction_tasks'),
    (dict(num_train=0), 'num_train'),
    (dict(seed=-1), 'seed'),
])
def test_synthetic_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    data.synthetic(**{**SMALL, **kwargs})


def test_synthetic_stream_matches_tasks(small):
  knobs = {k: v for k, v in SMALL.items() if k not in ('num_train', 'num_validation',
                                                        'num_test')}
  stream, info = data.synthetic_stream(**knobs, seed=1, chunk_size=16)
  assert isinstance(stream, datasets.IterableDataset)
  assert info.fingerprint['permutations'] == small.info.fingerprint['permutations']
  assert info.seq_len == small.info.seq_len and info.vocab_size == small.info.vocab_size
  rows = [row for _, row in zip(range(40), stream)]          # crosses chunk boundaries
  assert all(np.asarray(r['tokens']).shape == (info.seq_len,) for r in rows)
  again = [row for _, row in zip(range(40), stream)]
  np.testing.assert_array_equal([r['tokens'] for r in rows], [r['tokens'] for r in again])


def test_classification_synthetic(small):
  cls = data.classification(small)
  assert cls.info.seq_len == small.info.seq_len - 1 == cls.info.prompt_len
  assert cls.info.label_names == small.info.label_names[:SMALL['num_tasks']]
  full, batch = columns(small.test), columns(cls.test)
  keep = full['label'] < SMALL['num_tasks']
  np.testing.assert_array_equal(batch['tokens'], full['tokens'][keep, 1:])
  np.testing.assert_array_equal(batch['valid'], full['valid'][keep, 1:])
  np.testing.assert_array_equal(batch['label'], full['label'][keep])
  assert not batch['target_mask'].any() and batch['tokens'].dtype == np.int32
