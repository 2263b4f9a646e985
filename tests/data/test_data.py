import json
import os

import datasets
import numpy as np
import pytest

from gating import data

SMALL = dict(num_tasks=4, input_len=8, num_digits=6, num_recall_tasks=2,
             num_induction_tasks=3, num_train=600, num_validation=60, num_test=90)


@pytest.fixture(scope='module')
def small():
  return data.synthetic(**SMALL, seed=1)


def columns(dataset):
  """Every row of a split, in order, as numpy arrays in the stored dtypes."""
  return next(data.eval_batches(dataset, len(dataset)))


def rows_of(dataset):
  return {row.tobytes() for row in columns(dataset)['tokens']}


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


# --- batch_at ----------------------------------------------------------------------------

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


def test_batch_at_resumes(small):
  """The batch at step s from a fresh rebuild equals the one reached by iterating."""
  iterated = [data.batch_at(small.train, s, 32, seed=7) for s in range(25)]  # > 1 epoch
  data._COLUMNS.clear()
  data._permutation.cache_clear()
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

def write(path, content):
  path.write_text(content, encoding='utf-8')
  return str(path)


def decoded(dataset, label=None):
  """The text of each window (bytes tokenizer), optionally of one domain."""
  batch = columns(dataset)
  keep = np.ones(len(batch['label']), bool) if label is None else batch['label'] == label
  return [data.decode_bytes(t[v]) for t, v in zip(batch['tokens'][keep], batch['valid'][keep])]


def domain_stream(dataset, label):
  """The token stream of one domain of a split, padding removed, document tokens kept."""
  batch = columns(dataset)
  keep = batch['label'] == label
  return np.concatenate([t[v] for t, v in zip(batch['tokens'][keep], batch['valid'][keep])])


def test_byte_tokenizer_round_trip():
  text = 'héllo, wörld → 東京 🎉\n\tend'
  ids = data.encode_bytes(text)
  assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(text.encode())
  assert data.decode_bytes(ids) == text
  assert data.decode_bytes(np.append(ids, [data.BYTE_DOC_ID, data.BYTE_PAD_ID])) == text


def test_text_plain_file_contiguous_split_round_trips(tmp_path):
  lines = [f'line {i}: ünïcode {"x" * (i % 7)}\n' for i in range(400)]
  path = write(tmp_path / 'a.txt', ''.join(lines))
  s = data.text([path], seq_len=32, cache_dir=str(tmp_path / 'cache'))
  info = s.info
  assert info.vocab_size == 258 and info.pad_id == data.BYTE_PAD_ID and info.prompt_len == 1
  assert info.label_names == (path,)
  pieces = []
  for split in s[:3]:
    stream = domain_stream(split, 0)
    assert stream[-1] == data.BYTE_DOC_ID and (stream[:-1] != data.BYTE_DOC_ID).all()
    pieces.append(data.decode_bytes(stream))
    batch = columns(split)
    pos = np.arange(32)
    assert (batch['target_mask'] == batch['valid'] & (pos >= 1)).all()
    assert batch['valid'][:-1].all()               # only the last window is padded
  # Train, validation and test are consecutive ranges of the file, cut at line ends.
  assert ''.join(pieces) == ''.join(lines)
  assert all(p.endswith('\n') for p in pieces)
  assert 0.85 < len(pieces[0]) / len(''.join(lines)) < 0.95


def jsonl(path, docs):
  path.write_text(''.join(json.dumps(d) + '\n' for d in docs), encoding='utf-8')
  return str(path)


def test_text_documents_disjoint_between_splits(tmp_path):
  path = jsonl(tmp_path / 'a.jsonl', [{'text': f'<{i}>' + 'a' * (50 + i)} for i in range(60)])
  s = data.text([path], seq_len=48, seed=2, cache_dir=str(tmp_path / 'c'))
  ids = []
  for split in s[:3]:
    text = data.decode_bytes(domain_stream(split, 0))
    ids.append([int(t.split('>')[0]) for t in text.split('<')[1:]])
  assert all(ids) and sorted(sum(ids, [])) == list(range(60))   # each doc in one split
  other = data.text([path], seq_len=48, seed=3, cache_dir=str(tmp_path / 'c'))
  assert data.decode_bytes(domain_stream(other.test, 0)) != data.decode_bytes(
      domain_stream(s.test, 0))


def test_text_windows_never_mix_domains(tmp_path):
  path_a = jsonl(tmp_path / 'a.jsonl', [{'text': 'a' * (20 + 7 * i)} for i in range(30)])
  path_b = str(tmp_path / 'b.parquet')
  datasets.Dataset.from_list([{'text': 'b' * (10 + 5 * i)} for i in range(40)]).to_parquet(
      path_b)
  s = data.text([path_a, path_b], seq_len=48, cache_dir=str(tmp_path / 'c'))
  assert s.info.label_names == (path_a, path_b)
  for split in s[:3]:
    batch = columns(split)
    assert set(np.unique(batch['label'])) == {0, 1}
    for t, v, label in zip(batch['tokens'], batch['valid'], batch['label']):
      assert set(data.decode_bytes(t[v])) == {'ab'[label]}
  bad = jsonl(tmp_path / 'c.jsonl', [{'body': 'x'}] * 5)
  with pytest.raises(ValueError, match="no column text_field='text'"):
    data.text([bad], seq_len=16, cache_dir=str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='has 2 non-empty documents'):
    data.text([jsonl(tmp_path / 'd.jsonl', [{'text': 'x'}] * 2)], seq_len=16,
              cache_dir=str(tmp_path / 'c'))


def test_text_hash_recorded_and_changes(tmp_path):
  path = tmp_path / 'a.txt'
  write(path, 'first line\n' * 300)
  cache = str(tmp_path / 'cache')
  sha = lambda: data.text([str(path)], seq_len=16, cache_dir=cache).info.fingerprint[
      'domains'][str(path)]['sha256']
  before = sha()
  assert len(before) == 64 and sha() == before
  json.dumps(data.text([str(path)], seq_len=16, cache_dir=cache).info.fingerprint)
  write(path, 'first line\n' * 299 + 'first lime\n')
  assert sha() != before


def test_text_builtin_sources_and_balance():
  s = data.text(['pydoc', 'python'], seq_len=64, max_bytes_per_domain=60_000)
  fp = s.info.fingerprint
  assert s.info.label_names == ('pydoc', 'python') and fp['python']
  for name in ('pydoc', 'python'):
    assert len(fp['domains'][name]['sha256']) == 64
    assert 60_000 <= fp['domains'][name]['bytes'] < 60_000 + 300_000   # whole docs to cap
  labels = columns(s.train)['label']
  assert set(np.unique(labels)) == {0, 1}
  again = data.text(['pydoc', 'python'], seq_len=64, max_bytes_per_domain=60_000)
  assert again.info == s.info
  np.testing.assert_array_equal(columns(again.test)['tokens'], columns(s.test)['tokens'])
  cls = data.classification(s)
  np.testing.assert_array_equal(columns(cls.test)['label'], columns(s.test)['label'])
  assert not columns(cls.test)['target_mask'].any()


def test_text_shakespeare(tinyshakespeare_path, tmp_path):
  s = data.text([tinyshakespeare_path], seq_len=128, cache_dir=str(tmp_path))
  with open(tinyshakespeare_path, encoding='utf-8') as f:
    content = f.read()
  assert ''.join(data.decode_bytes(domain_stream(split, 0)) for split in s[:3]) == content
  assert s.info.fingerprint['domains'][tinyshakespeare_path]['bytes'] == len(content.encode())


@pytest.mark.parametrize('sources, kwargs, error, match', [
    (['pyton'], {}, ValueError, "'pyton' is not a built-in source"),
    (['missing.txt'], {}, FileNotFoundError, 'no file at'),
    (['EMPTY'], {}, ValueError, 'is empty'),
    (['SHORT'], {}, ValueError, 'too short to split'),
    (['SHORT'], dict(seq_len=1), ValueError, 'seq_len must be an int >= 2'),
    ([], {}, ValueError, 'sources must be a non-empty'),
    (['pydoc', 'pydoc'], {}, ValueError, 'duplicates'),
    (['pydoc'], dict(validation_fraction=0.6, test_fraction=0.5), ValueError, 'must be < 1'),
    (['pydoc'], dict(max_bytes_per_domain=0), ValueError, 'max_bytes_per_domain'),
])
def test_text_errors(tmp_path, sources, kwargs, error, match):
  files = {'EMPTY': write(tmp_path / 'empty.txt', ''), 'SHORT': write(tmp_path / 's.txt', 'hi')}
  sources = [files.get(s, s) for s in sources]
  with pytest.raises(error, match=match):
    data.text(sources, **{'seq_len': 16, 'cache_dir': str(tmp_path / 'c'), **kwargs})


def test_text_offline_hub(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(ConnectionError, match="'hub:wikitext' needs the Hugging Face hub, but "
                                            'this machine is offline'):
    data.text(['hub:wikitext'], seq_len=16)


def test_text_hf_tokenizer_needs_transformers():
  try:
    import transformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    pytest.skip('transformers is installed')
  except ImportError:
    pass
  with pytest.raises(ValueError, match='needs the `transformers` package'):
    data.text(['pydoc'], seq_len=16, tokenizer='gpt2')


def test_shakespeare_source_missing(monkeypatch, tmp_path):
  monkeypatch.setattr(data, 'SHAKESPEARE', str(tmp_path / 'nope' / 'tinyshakespeare.txt'))
  with pytest.raises(FileNotFoundError, match='nope/tinyshakespeare.txt, which does not exist'):
    data.text(['shakespeare'], seq_len=16)


def test_gating_import_does_not_import_data():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ('import sys, gating; '
          'assert "datasets" not in sys.modules and "gating.data" not in sys.modules')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONPATH': repo})
