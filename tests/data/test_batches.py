import dataclasses

import datasets
import numpy as np
import pytest

from gating import data
from gating.data import batches
from tests.data.helpers import SMALL


def indexed(n, length=3):
  return datasets.Dataset.from_dict(
      {'tokens': np.arange(n * length, dtype=np.int32).reshape(n, length),
       'label': np.arange(n)}).cast(datasets.Features({
           'tokens': datasets.List(datasets.Value('int32'), length=length),
           'label': datasets.Value('int64')})).with_format('numpy')


def test_batch_at_epochs_wrap_and_cover():
  ds = indexed(10)
  seen = np.concatenate([data.batch_at(ds, s, 3, seed=5)['label'] for s in range(10)])
  epochs = seen.reshape(3, 10)                     # 30 rows: exactly 3 epochs
  for epoch in epochs:
    assert sorted(epoch) == list(range(10))        # every row once per epoch
  assert not (epochs[0] == epochs[1]).all()        # a fresh permutation each epoch
  wrap = data.batch_at(ds, 3, 3, seed=5)['label']  # positions 9..11: epoch 0 into epoch 1
  np.testing.assert_array_equal(wrap, [epochs[0][9], epochs[1][0], epochs[1][1]])
  batch = data.batch_at(ds, 4, 3, seed=5)
  np.testing.assert_array_equal(batch['tokens'], np.asarray(ds['tokens'])[batch['label']])
  assert batch['tokens'].dtype == np.int32
  other = np.concatenate([data.batch_at(ds, s, 3, seed=6)['label'] for s in range(4)])
  assert not (other == seen[:12]).all()


def test_batch_at_positions_load_only_those_rows():
  """A process of a multi-process run loads its own rows of the batch, across a wrap."""
  ds = indexed(10)
  full = data.batch_at(ds, 3, 4, seed=5)           # positions 12..15: epoch 1
  part = data.batch_at(ds, 3, 4, seed=5, positions=np.array([3, 1]))
  np.testing.assert_array_equal(part['label'], full['label'][[3, 1]])
  np.testing.assert_array_equal(part['tokens'], full['tokens'][[3, 1]])
  wrap = data.batch_at(ds, 2, 4, seed=5, positions=np.array([1, 2]))  # positions 9, 10
  np.testing.assert_array_equal(wrap['label'], data.batch_at(ds, 2, 4, seed=5)['label'][1:3])


def test_batch_at_resumes(small):
  """The batch at step s from a fresh rebuild equals the one reached by iterating."""
  iterated = [data.batch_at(small.train, s, 32, seed=7) for s in range(25)]  # > 1 epoch
  batches._COLUMNS.clear()
  batches._permutation.cache_clear()
  fresh = data.synthetic(**SMALL, seed=1).train
  for s in (0, 18, 24):
    batch = data.batch_at(fresh, s, 32, seed=7)
    for k in batch:
      np.testing.assert_array_equal(batch[k], iterated[s][k])


def test_eval_batches_in_order(small):
  batches = list(data.eval_batches(small.validation, 25))
  assert [len(b['label']) for b in batches] == [25, 25, 10]
  np.testing.assert_array_equal(np.concatenate([b['tokens'] for b in batches]),
                                np.asarray(small.validation['tokens']))


def test_sampled_rows_cover_a_split_ordered_by_label():
  # a split sorted by label, like the text splits (one domain after another)
  label_N = np.repeat([0, 1, 2], [700, 270, 430])
  keep = data.sample_rows(len(label_N), 256)
  assert len(np.unique(keep)) == 256 and np.all(np.diff(keep) > 0)
  counts = np.bincount(label_N[keep], minlength=3)
  np.testing.assert_allclose(counts / 256, [0.5, 0.193, 0.307], atol=0.08)
  np.testing.assert_array_equal(keep, data.sample_rows(len(label_N), 256))  # fixed seed
  np.testing.assert_array_equal(data.sample_rows(10, 50), np.arange(10))
  np.testing.assert_array_equal(data.sample_rows(10, None), np.arange(10))
  with pytest.raises(ValueError, match='max_rows=0 must be at least 1'):
    data.sample_rows(10, 0)


def test_eval_batches_of_a_sample_read_every_label():
  """max_rows reads a fixed random sample in order, not the split's first rows (which,
  in a split ordered by label, hold the first label only)."""
  ds = indexed(100)                      # label = row index: rows 0..99 in order
  batches_ = list(data.eval_batches(ds, 16, max_rows=40))
  assert [len(b['label']) for b in batches_] == [16, 16, 8]
  label_R = np.concatenate([b['label'] for b in batches_])
  np.testing.assert_array_equal(label_R, data.sample_rows(100, 40))
  assert label_R.max() >= 60             # not rows 0..39
  np.testing.assert_array_equal(np.concatenate([b['tokens'] for b in batches_]),
                                np.asarray(ds['tokens'])[label_R])
  whole = list(data.eval_batches(ds, 64, max_rows=500))    # more than the split: all
  np.testing.assert_array_equal(np.concatenate([b['label'] for b in whole]), np.arange(100))


def test_batch_at_errors():
  ds = indexed(4)
  with pytest.raises(ValueError, match='batch_size=5 is larger than the dataset'):
    data.batch_at(ds, 0, 5, 0)
  with pytest.raises(ValueError, match='empty'):
    data.batch_at(ds.select([]), 0, 1, 0)
  with pytest.raises(ValueError, match='step'):
    data.batch_at(ds, -1, 2, 0)
  with pytest.raises(ValueError, match='batch_size'):
    data.batch_at(ds, 0, 0, 0)
  ragged = datasets.Dataset.from_dict({'tokens': [[1], [2, 3]]})
  with pytest.raises(ValueError, match="column 'tokens' has variable-length"):
    data.batch_at(ragged, 0, 1, 0)


# --- text --------------------------------------------------------------------------------


def test_token_ids_outside_the_vocabulary_are_refused_when_the_data_loads(small):
  data.check_tokens(small)                                    # the benchmark itself is fine
  V = small.info.vocab_size
  narrow = small._replace(info=dataclasses.replace(small.info, vocab_size=V - 1))
  with pytest.raises(ValueError, match=rf'the train split holds token ids in \[0, {V - 1}\], '
                                       rf'outside the vocabulary \[0, {V - 1}\)'):
    data.check_tokens(narrow)
