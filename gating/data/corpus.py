"""The text corpus: sources (the running Python's standard library, pydoc's
documentation, tinyshakespeare, any file or hub dataset), a byte tokenizer, splits by
document, and packing into windows that never mix domains.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import sysconfig
import urllib.parse
from collections.abc import Sequence
from typing import NamedTuple

import datasets
import numpy as np

from gating.data.rows import DataInfo, Splits, _check_seed, _rows


BUILTIN_SOURCES = ('python', 'pydoc', 'shakespeare')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAKESPEARE = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare.txt')
STDLIB_EXCLUDED = frozenset({'site-packages', 'dist-packages', 'test', 'tests', 'idle_test',
                             'pydoc_data', '__pycache__'})
BYTE_DOC_ID = 256    # byte tokenizer: ends every document
BYTE_PAD_ID = 257
BYTE_VOCAB = 258
_FORMATS = {'.json': 'json', '.jsonl': 'json', '.parquet': 'parquet', '.csv': 'csv'}


def encode_bytes(text: str) -> np.ndarray:
  """The byte tokenizer: the UTF-8 bytes of `text` as int32 ids in [0, 256)."""
  return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32)


def decode_bytes(tokens) -> str:
  """Inverse of `encode_bytes`; ids >= 256 (document end, padding) are left out."""
  tokens = np.asarray(tokens)
  return tokens[tokens < 256].astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class _Tokenizer(NamedTuple):
  encode: object             # list[str] -> list[np.ndarray]
  doc_id: int | None         # appended after every document
  pad_id: int
  vocab_size: int
  name: str


def _local_tokenizer(folder: str) -> _Tokenizer:
  """A checkpoint folder's own tokenizer: its tokenizer.json, read with the `tokenizers`
  package; the document end is its eos_token_id (config.json or generation_config.json),
  padding its pad_token_id or else the eos; the vocabulary is the model's (config.json's
  vocab_size, which may exceed the tokenizer's)."""
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f'tokenizer={folder!r} needs the `tokenizers` package, which is not '
                     'installed') from e
  tok = tokenizers.Tokenizer.from_file(os.path.join(folder, 'tokenizer.json'))
  config = {}
  for name in ('config.json', 'generation_config.json'):
    path = os.path.join(folder, name)
    if os.path.exists(path):
      with open(path) as f:
        config = {**json.load(f), **config}
  eos = config.get('eos_token_id')
  eos = eos[0] if isinstance(eos, list) else eos
  pad = config.get('pad_token_id', eos)
  if pad is None:
    raise ValueError(f'tokenizer={folder!r}: config.json names no eos_token_id or '
                     'pad_token_id to end documents and pad with')
  vocab = max(config.get('vocab_size', 0), tok.get_vocab_size())
  encode = lambda texts: [np.asarray(e.ids, np.int32) for e in
                          tok.encode_batch(list(texts), add_special_tokens=False)]
  return _Tokenizer(encode, eos, pad, vocab, f'local:{os.path.basename(os.path.normpath(folder))}')


def _tokenizer(name: str) -> _Tokenizer:
  if name == 'bytes':
    return _Tokenizer(lambda texts: [encode_bytes(t) for t in texts], BYTE_DOC_ID,
                      BYTE_PAD_ID, BYTE_VOCAB, 'bytes')
  if os.path.isfile(os.path.join(name, 'tokenizer.json')):
    return _local_tokenizer(name)
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"tokenizer={name!r} needs the `transformers` package, which is not "
                     "installed; install it or use tokenizer='bytes'") from e
  tok = transformers.AutoTokenizer.from_pretrained(name)
  doc_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
  pad_id = tok.pad_token_id if tok.pad_token_id is not None else doc_id
  if pad_id is None:
    raise ValueError(f'tokenizer={name!r} has no pad, eos or sep token to pad with')
  encode = lambda texts: [np.asarray(ids, np.int32) for ids in
                          tok(list(texts), add_special_tokens=False)['input_ids']]
  return _Tokenizer(encode, doc_id, pad_id, len(tok), f'hf:{name}:{tok.__class__.__name__}')


class _Domain(NamedTuple):
  """One source's text: documents (name, text) and how it was read."""
  name: str
  documents: list[tuple[str, str]]
  contiguous: bool        # one document, split by character ranges instead of documents
  meta: dict


def _offline() -> str | None:
  """Why the hub cannot be reached, or None when it seems reachable."""
  for var in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
    if os.environ.get(var, '').upper() in ('1', 'ON', 'YES', 'TRUE'):
      return f'{var} is set'
  if datasets.config.HF_HUB_OFFLINE:
    return 'datasets.config.HF_HUB_OFFLINE is set'
  if any(os.environ.get(var) for var in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY')):
    return None       # behind a proxy: let the hub client try
  endpoint = urllib.parse.urlparse(datasets.config.HF_ENDPOINT)
  host = endpoint.hostname or 'huggingface.co'
  port = endpoint.port or (443 if endpoint.scheme != 'http' else 80)
  try:
    socket.create_connection((host, port), timeout=5).close()
  except OSError as e:
    return f'cannot reach {host}:{port} ({e})'
  return None


def _order(names: Sequence[str], source: str, seed: int) -> np.ndarray:
  """A seeded order of documents, the same for a source whatever the other sources are."""
  key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], 'little')
  return np.random.default_rng([seed, key]).permutation(len(names))


def _capped(sizes: Sequence[int], cap: int | None) -> int:
  """How many documents (in order) to keep: stop once the kept ones reach `cap` bytes."""
  if cap is None:
    return len(sizes)
  total = np.cumsum(sizes)
  return int(min(len(sizes), np.searchsorted(total, cap) + 1))


def _stdlib_domain(seed: int, cap: int | None) -> _Domain:
  """The running Python's standard-library *.py files (no tests, site-packages, pydoc_data).

  Files are taken in a seeded order until `cap` bytes; files that are not UTF-8 are skipped.
  """
  root = sysconfig.get_paths()['stdlib']
  paths = []
  for folder, subfolders, files in os.walk(root):
    subfolders[:] = sorted(d for d in subfolders if d not in STDLIB_EXCLUDED)
    paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith('.py')]
  names = [os.path.relpath(p, root) for p in paths]
  if not paths:
    raise ValueError(f"source 'python': no *.py files under {root}")
  documents, size = [], 0
  for i in _order(names, 'python', seed):
    if cap is not None and size >= cap:
      break
    with open(paths[i], 'rb') as f:
      raw = f.read()
    try:
      documents.append((names[i], raw.decode('utf-8')))
      size += len(raw)
    except UnicodeDecodeError:
      continue
  return _Domain('python', documents, False, {'path': root, 'files_available': len(paths)})


def _pydoc_domain(seed: int, cap: int | None) -> _Domain:
  """pydoc_data.topics.topics: the language reference's topics (English prose), one per doc."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  names = sorted(topics.topics)
  order = _order(names, 'pydoc', seed)
  texts = [topics.topics[names[i]] for i in order]
  keep = _capped([len(t.encode('utf-8')) for t in texts], cap)
  return _Domain('pydoc', [(names[i], t) for i, t in zip(order[:keep], texts[:keep])], False,
                 {'path': topics.__file__})


def _file_domain(source: str, path: str, *, seed, cap, text_field, cache_dir) -> _Domain:
  """A local file through datasets.load_dataset: plain text is one document, split by
  contiguous ranges; JSON lines, JSON, CSV and parquet rows are documents (text_field)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'source {source!r}: no file at {path}')
  if os.path.getsize(path) == 0:
    raise ValueError(f'source {source!r}: {path} is empty')
  builder = _FORMATS.get(os.path.splitext(path)[1].lower(), 'text')
  kwargs = {'sample_by': 'document'} if builder == 'text' else {}
  table = datasets.load_dataset(builder, data_files=path, split='train', cache_dir=cache_dir,
                                **kwargs)
  if text_field not in table.column_names:
    raise ValueError(f'source {source!r}: {path} has no column text_field={text_field!r} '
                     f'(columns: {table.column_names})')
  texts = [t for t in table[text_field] if t]
  if builder == 'text':
    text = ''.join(texts)
    if cap is not None and len(text.encode('utf-8')) > cap:
      raw = text.encode('utf-8')[:cap]
      cut = raw.rfind(b'\n')
      text = raw[:cut + 1 if cut > 0 else cap].decode('utf-8', errors='ignore')
    documents, contiguous = [(os.path.basename(path), text)], True
  else:
    names = [f'{os.path.basename(path)}:{i}' for i in range(len(texts))]
    # ordered by the file's name, not its path: a moved file keeps its splits and identity
    order = _order(names, os.path.basename(path), seed)
    keep = _capped([len(texts[i].encode('utf-8')) for i in order], cap)
    documents, contiguous = [(names[i], texts[i]) for i in order[:keep]], False
  return _Domain(source, documents, contiguous, {'path': os.path.abspath(path),
                                                 'format': builder})


def _hub_domain(source: str, *, seed, cap, text_field, hub_split) -> _Domain:
  """'hub:NAME' or 'hub:NAME:CONFIG', streamed from the Hugging Face hub until `cap` bytes."""
  why = _offline()
  if why:
    raise ConnectionError(f'source {source!r} needs the Hugging Face hub, but this machine is '
                          f'offline ({why}); use a local file or a built-in source instead')
  name, _, config = source[len('hub:'):].partition(':')
  stream = datasets.load_dataset(name, config or None, split=hub_split, streaming=True)
  texts, size = [], 0
  for row in stream:
    if text_field not in row:
      raise ValueError(f'source {source!r} has no column text_field={text_field!r} '
                       f'(columns: {list(row)})')
    if row[text_field]:
      texts.append(row[text_field])
      size += len(row[text_field].encode('utf-8'))
    if cap is not None and size >= cap:
      break
  names = [f'{name}:{i}' for i in range(len(texts))]
  order = _order(names, source, seed)
  return _Domain(source, [(names[i], texts[i]) for i in order], False,
                 {'hub': name, 'config': config or None, 'split': hub_split})


def _read(source: str, *, seed, cap, text_field, hub_split, cache_dir) -> _Domain:
  if not isinstance(source, str) or not source:
    raise ValueError(f'sources: each must be a non-empty string, got {source!r}')
  if source == 'python':
    return _stdlib_domain(seed, cap)
  if source == 'pydoc':
    return _pydoc_domain(seed, cap)
  if source == 'shakespeare':
    path = os.path.abspath(SHAKESPEARE)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"source 'shakespeare' reads {path}, which does not exist; "
                              'pass the path of a copy of tinyshakespeare.txt instead')
    return _file_domain(source, path, seed=seed, cap=cap, text_field='text',
                        cache_dir=cache_dir)
  if source.startswith('hub:'):
    return _hub_domain(source, seed=seed, cap=cap, text_field=text_field, hub_split=hub_split)
  path = os.path.expanduser(source)
  looks_like_path = os.sep in source or os.path.splitext(source)[1] != ''
  if not os.path.exists(path) and not looks_like_path:
    raise ValueError(f'sources: {source!r} is not a built-in source {BUILTIN_SOURCES}, not '
                     "'hub:NAME', and not an existing file")
  return _file_domain(source, path, seed=seed, cap=cap, text_field=text_field,
                      cache_dir=cache_dir)


def _split_domain(domain: _Domain, validation_fraction: float, test_fraction: float):
  """(train, validation, test) lists of (name, text), made before any packing.

  One document (a plain text file): contiguous character ranges, train first, then
  validation, then test, each cut just after a line end. Several documents: whole
  documents in their seeded order, test first, then validation, until each holds its
  fraction of the bytes (at least one document each); train takes the rest.
  """
  if sum(len(t) for _, t in domain.documents) == 0:
    raise ValueError(f'source {domain.name!r}: no text')
  if domain.contiguous:
    (name, text), = domain.documents
    raw = text.encode('utf-8')

    def cut(fraction):
      at = int(len(raw) * fraction)
      line_end = raw.find(b'\n', at)
      return line_end + 1 if line_end >= 0 else at
    a = cut(1 - validation_fraction - test_fraction)
    b = max(cut(1 - test_fraction), a)
    pieces = [raw[:a], raw[a:b], raw[b:]]
    if not all(p.strip() for p in pieces):
      raise ValueError(f'source {domain.name!r} is too short to split into train, validation '
                       f'and test ({len(raw)} bytes)')
    return tuple([(f'{name}[{s}]', p.decode('utf-8', errors='ignore'))] for s, p in
                 zip(('train', 'validation', 'test'), pieces))
  docs = [d for d in domain.documents if d[1]]
  if len(docs) < 3:
    raise ValueError(f'source {domain.name!r} has {len(docs)} non-empty documents; '
                     'train, validation and test need at least 3')
  sizes = np.array([len(t.encode('utf-8')) for _, t in docs])
  total = sizes.sum()
  n_test = min(max(1, _capped(sizes, test_fraction * total)), len(docs) - 2)
  rest = sizes[n_test:]
  n_val = min(max(1, _capped(rest, validation_fraction * total)), len(docs) - n_test - 1)
  return docs[n_test + n_val:], docs[n_test:n_test + n_val], docs[:n_test]


def _pack(documents, tokenizer: _Tokenizer, seq_len: int, label: int):
  """Concatenates one domain's documents (each ended by doc_id) into windows of seq_len.

  The last window is padded with pad_id (valid False). target_mask: every valid token
  but the first of a window (nothing in the window predicts it). A last window that would
  hold a single token (often just the final doc_id) has no target, so it is left out.
  """
  ids = tokenizer.encode([t for _, t in documents])
  end = [] if tokenizer.doc_id is None else [np.array([tokenizer.doc_id], np.int32)]
  stream = np.concatenate([part for doc in ids for part in [doc, *end]])
  if len(stream) > seq_len and len(stream) % seq_len == 1:
    stream = stream[:-1]
  N = -(-len(stream) // seq_len)
  tokens_NxL = np.full((N * seq_len,), tokenizer.pad_id, np.int32)
  tokens_NxL[:len(stream)] = stream
  valid_NxL = (np.arange(N * seq_len) < len(stream)).reshape(N, seq_len)
  target_NxL = valid_NxL & (np.arange(seq_len) >= 1)[None, :]
  return tokens_NxL.reshape(N, seq_len), valid_NxL, target_NxL, np.full((N,), label)


def _sha256_documents(documents) -> str:
  h = hashlib.sha256()
  for name, text in documents:
    for part in (name.encode('utf-8'), text.encode('utf-8')):
      h.update(len(part).to_bytes(8, 'little'))
      h.update(part)
  return h.hexdigest()


def text(sources: Sequence[str], *, seq_len: int, seed: int = 0,
         max_bytes_per_domain: int | None = 1_200_000, validation_fraction: float = 0.05,
         test_fraction: float = 0.05, tokenizer: str = 'bytes', text_field: str = 'text',
         hub_split: str = 'train', cache_dir: str | None = None) -> Splits:
  """A multi-domain text corpus packed into windows of seq_len tokens; each source a domain.

  Sources (each one domain; label = its index in `sources`, label_names = the sources):
    'python'       the running Python's standard library *.py files, read at run time
                   (code; tests, site-packages and pydoc_data left out; ~11 MB on 3.11).
    'pydoc'        pydoc_data.topics.topics, the language reference's topics (prose, ~0.5 MB).
    'shakespeare'  <repo>/../shared/data/tinyshakespeare.txt (1.1 MB), when present.
    a file path    plain text (one document), .jsonl/.json/.csv/.parquet (one document per
                   row, column text_field), read with datasets.load_dataset.
    'hub:NAME[:CONFIG]'  a Hugging Face hub dataset (split hub_split, column text_field),
                   streamed until the cap; an offline machine gets a ConnectionError.

  Text is split into train / validation / test BEFORE packing, so no text is in two
  splits: a source with several documents (files, topics, rows) by whole documents in a
  seeded order; a single plain-text file (tinyshakespeare) by contiguous character
  ranges, train first, then validation, then test, each cut after a line end. Then each
  split of each domain is tokenized, every document ended by a document token, and cut
  into consecutive windows of seq_len: a window never mixes domains (it may span two
  documents of one domain). The last window of a domain's split is padded.

  Byte tokenizer (the default): ids 0..255 are UTF-8 bytes, 256 ends a document, 257 is
  padding; vocab_size 258. tokenizer='NAME' loads transformers.AutoTokenizer NAME instead
  (needs transformers). target_mask is every valid token but a window's first, so
  prompt_len = 1.

  Args:
    sources: the domains, e.g. BUILTIN_SOURCES = ('python', 'pydoc', 'shakespeare').
    seq_len: L, tokens per window (>= 2).
    seed: the document order that decides which documents the cap keeps and which split
      each document goes to (not the training order; keep it fixed across training seeds).
    max_bytes_per_domain: take at most about this many bytes of each source (whole
      documents in the seeded order until the cap is reached; a single text file is cut at
      a line end). The default, 1.2 MB, keeps tinyshakespeare whole and cuts the ~11 MB
      stdlib to a comparable size, so no domain dominates. None: no cap.
    validation_fraction, test_fraction: each split's share of a domain's bytes.
    tokenizer: 'bytes' or a transformers tokenizer name.
    text_field: the text column of JSON, CSV, parquet and hub sources.
    hub_split: the split read from a hub dataset.
    cache_dir: datasets' cache folder for load_dataset (default: its usual cache).

  info.fingerprint holds, per domain, the sha256 of exactly the text used (document names
  and contents, after the cap), its bytes and documents, plus the Python version,
  tokenizer and settings: the stdlib and pydoc differ between Python versions.
  """
  if isinstance(sources, str) or not isinstance(sources, Sequence) or not sources:
    raise ValueError(f'sources must be a non-empty sequence of names, got {sources!r}')
  if len(set(sources)) != len(sources):
    raise ValueError(f'sources has duplicates: {list(sources)}')
  if not isinstance(seq_len, int) or seq_len < 2:
    raise ValueError(f'seq_len must be an int >= 2 (a window needs a target after its first '
                     f'token), got {seq_len!r}')
  _check_seed('seed', seed)
  if max_bytes_per_domain is not None and (not isinstance(max_bytes_per_domain, int)
                                           or max_bytes_per_domain < 1):
    raise ValueError(f'max_bytes_per_domain must be None or an int >= 1, got '
                     f'{max_bytes_per_domain!r}')
  for name, value in (('validation_fraction', validation_fraction),
                      ('test_fraction', test_fraction)):
    if not 0 < value < 1:
      raise ValueError(f'{name} must be in (0, 1), got {value!r}')
  if validation_fraction + test_fraction >= 1:
    raise ValueError('validation_fraction + test_fraction must be < 1, got '
                     f'{validation_fraction} + {test_fraction}')
  tok = _tokenizer(tokenizer)
  parts = {'train': [], 'validation': [], 'test': []}
  domains = {}
  for label, source in enumerate(sources):
    domain = _read(source, seed=seed, cap=max_bytes_per_domain, text_field=text_field,
                   hub_split=hub_split, cache_dir=cache_dir)
    splits = _split_domain(domain, validation_fraction, test_fraction)
    for split, documents in zip(parts, splits):
      parts[split].append(_pack(documents, tok, seq_len, label))
    domains[source] = {
        **domain.meta, 'sha256': _sha256_documents(domain.documents),
        'bytes': sum(len(t.encode('utf-8')) for _, t in domain.documents),
        'documents': len(domain.documents),
        'split_documents': [len(s) for s in splits],
        'split_windows': [len(parts[s][-1][0]) for s in parts]}
  fingerprint = {
      'kind': 'text', 'sources': list(sources), 'domains': domains, 'seq_len': seq_len,
      'seed': seed, 'max_bytes_per_domain': max_bytes_per_domain,
      'validation_fraction': validation_fraction, 'test_fraction': test_fraction,
      'tokenizer': tok.name, 'text_field': text_field, 'python': sys.version.split()[0]}
  info = DataInfo(vocab_size=tok.vocab_size, seq_len=seq_len, prompt_len=1, pad_id=tok.pad_id,
                  label_names=tuple(sources), fingerprint=fingerprint)
  train, validation, test = (_rows(*(np.concatenate(c) for c in zip(*parts[s])))
                             for s in parts)
  return Splits(train, validation, test, info)
