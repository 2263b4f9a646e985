import json
import os
import shutil

import datasets
import numpy as np
import pytest

from gating import data
from gating.data import corpus
from tests.data.helpers import columns


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
    # The split ends with its document's doc_id, unless that token would sit alone
    # (without a target) in a last window, and was left out.
    assert stream[-1] == data.BYTE_DOC_ID or len(stream) % 32 == 0
    assert (stream[:-1] != data.BYTE_DOC_ID).all()
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
  # The same file in another folder: the same splits and the same data identity (its
  # document order was seeded by the path, so a moved run's data was refused as other data)
  os.makedirs(tmp_path / 'moved')
  moved = str(shutil.copy(path, tmp_path / 'moved' / 'a.jsonl'))
  there = data.text([moved], seq_len=48, seed=2, cache_dir=str(tmp_path / 'c'))
  for split, other_split in zip(s[:3], there[:3]):
    np.testing.assert_array_equal(columns(split)['tokens'], columns(other_split)['tokens'])
  assert data.identity(there.info.fingerprint) == data.identity(s.info.fingerprint)


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
    assert batch['target_mask'].any(axis=1).all()
    for t, v, label in zip(batch['tokens'], batch['valid'], batch['label']):
      assert set(data.decode_bytes(t[v])) == {'ab'[label]}
  bad = jsonl(tmp_path / 'c.jsonl', [{'body': 'x'}] * 5)
  with pytest.raises(ValueError, match="no column text_field='text'"):
    data.text([bad], seq_len=16, cache_dir=str(tmp_path / 'c'))
  with pytest.raises(ValueError, match='has 2 non-empty documents'):
    data.text([jsonl(tmp_path / 'd.jsonl', [{'text': 'x'}] * 2)], seq_len=16,
              cache_dir=str(tmp_path / 'c'))


@pytest.mark.parametrize('chars', [46, 47, 48, 95, 96])
def test_pack_never_emits_a_window_without_a_target(chars):
  # 47 bytes + doc_id fill one window of 48 exactly; 48 + doc_id used to leave a second
  # window holding only the doc_id, with nothing to predict.
  tokens, valid, target, label = corpus._pack([('d', 'a' * chars)], corpus._tokenizer('bytes'),
                                              48, 3)
  assert target.any(axis=1).all()
  assert len(tokens) == len(label) == -(-chars // 48) and set(label) == {3}
  assert data.decode_bytes(tokens[valid]) == 'a' * chars


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
  monkeypatch.setattr(corpus, 'SHAKESPEARE', str(tmp_path / 'nope' / 'tinyshakespeare.txt'))
  with pytest.raises(FileNotFoundError, match='nope/tinyshakespeare.txt, which does not exist'):
    data.text(['shakespeare'], seq_len=16)


def test_builtin_shakespeare_path_resolves_from_the_package():
  """The built-in source is ../shared/data/tinyshakespeare.txt beside the repository,
  wherever the module sits inside gating/ (it moved one folder deeper with the layout)."""
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  want = os.path.join(repo, '..', 'shared', 'data', 'tinyshakespeare.txt')
  assert os.path.normpath(data.SHAKESPEARE) == os.path.normpath(want)


def test_gating_import_does_not_import_data():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ('import sys, gating; '
          'assert "datasets" not in sys.modules and "gating.data" not in sys.modules')
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  subprocess.run([sys.executable, '-c', code], check=True, env={**os.environ, 'PYTHONPATH': repo})
