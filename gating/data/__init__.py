"""Datasets pipelines: a synthetic multi-task benchmark and a multi-domain text corpus.

Every split is a map-style `datasets.Dataset` in numpy format whose rows all have the
same length L and these columns:

  'tokens'      int32 [L]  token ids in [0, vocab_size); pad_id where not valid
  'valid'       bool  [L]  False on padding
  'target_mask' bool  [L]  token t is a prediction target (predicted from position t-1)
  'label'       int64 []   task id (synthetic) or domain id (text), indexing label_names

(datasets' numpy formatter widens integer columns to int64 when a row is read by
index; `batch_at` and `eval_batches` return the stored dtypes: tokens int32.)

`synthetic` is the default data: no download, deterministic from a seed, and made to be
capacity-limited so that gate rules differ (see its docstring). `text` packs real text
from the running Python's standard library, pydoc's documentation, tinyshakespeare or any
file into byte-level windows that never mix domains. `batch_at` is the resumable training
pipeline: the batch is a pure function of (dataset, step, batch_size, seed), so the data
position of a checkpoint is just its step. `classification` turns either into rows for
GatedEncoder.

This module imports `datasets`; `import gating` does not import it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import os
import socket
import sys
import sysconfig
import urllib.parse
import weakref
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model and a loss need to know about the rows of a `Splits`."""
  vocab_size: int            # tokens are in [0, vocab_size)
  seq_len: int               # L, every row has exactly this length
  prompt_len: int            # tokens before the first possible target in every row
  pad_id: int
  label_names: tuple[str, ...]   # task names (synthetic) or domain names (text)
  fingerprint: dict          # what identifies the data (settings, sources, sha256, versions)


class Splits(NamedTuple):
  train: datasets.Dataset       # map-style, numpy format
  validation: datasets.Dataset  # for tuning
  test: datasets.Dataset        # for reported numbers
  info: DataInfo


def _features(seq_len: int) -> datasets.Features:
  return datasets.Features({
      'tokens': datasets.List(datasets.Value('int32'), length=seq_len),
      'valid': datasets.List(datasets.Value('bool'), length=seq_len),
      'target_mask': datasets.List(datasets.Value('bool'), length=seq_len),
      'label': datasets.Value('int64'),
  })


def _rows(tokens_NxL, valid_NxL, target_NxL, label_N) -> datasets.Dataset:
  """A numpy-format Dataset of fixed-length rows (Arrow fixed-size lists, no Python loop)."""
  N, L = tokens_NxL.shape
  fixed = lambda x, dtype: pa.FixedSizeListArray.from_arrays(
      np.ascontiguousarray(x, dtype).reshape(-1), L)
  return datasets.Dataset.from_dict(
      {'tokens': fixed(tokens_NxL, np.int32), 'valid': fixed(valid_NxL, bool),
       'target_mask': fixed(target_NxL, bool), 'label': np.asarray(label_N, np.int64)},
      features=_features(L)).with_format('numpy')


def _check_seed(name: str, value) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f'{name} must be an int >= 0, got {value!r}')


def _sha256_rows(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


# ---------------------------------------------------------------------------------------
# Synthetic multi-task benchmark.

@dataclasses.dataclass(frozen=True)
class _Tasks:
  """The fixed task definitions (from task_seed) and the row layout they imply."""
  num_tasks: int
  input_len: int
  num_digits: int
  num_recall_tasks: int
  num_induction_tasks: int
  recall_pairs: int
  seq_len: int
  permutations_TxI: np.ndarray   # permutation task t outputs x[permutations_TxI[t]]

  @property
  def pad_id(self) -> int:
    return self.num_digits

  @property
  def sep_id(self) -> int:
    return self.num_digits + 1

  @property
  def total_tasks(self) -> int:
    return self.num_tasks + self.num_recall_tasks + self.num_induction_tasks

  @property
  def prompt_len(self) -> int:
    return self.input_len + 2

  @property
  def recall_queries(self) -> int:
    return self.input_len - 2 * self.recall_pairs

  def output_len(self, task: int) -> int:
    if task < self.num_tasks:
      return self.input_len
    if task < self.num_tasks + self.num_recall_tasks:
      return self.recall_queries
    return task - self.num_tasks - self.num_recall_tasks + 1

  def names(self) -> tuple[str, ...]:
    return (tuple(f'permute_{t}' for t in range(self.num_tasks))
            + tuple(f'recall_{r}' for r in range(self.num_recall_tasks))
            + tuple(f'induction_{r}' for r in range(self.num_induction_tasks)))


def _make_tasks(*, num_tasks, input_len, num_digits, num_recall_tasks, num_induction_tasks,
                recall_pairs, seq_len, task_seed) -> _Tasks:
  """Validates the knobs (errors name the argument) and draws the permutations."""
  for name, value in (('num_tasks', num_tasks), ('num_recall_tasks', num_recall_tasks),
                      ('num_induction_tasks', num_induction_tasks)):
    if not isinstance(value, int) or value < 0:
      raise ValueError(f'{name} must be an int >= 0, got {value!r}')
  if num_tasks + num_recall_tasks + num_induction_tasks == 0:
    raise ValueError('num_tasks + num_recall_tasks + num_induction_tasks must be >= 1')
  if not isinstance(input_len, int) or input_len < 2:
    raise ValueError(f'input_len must be an int >= 2, got {input_len!r}')
  if not isinstance(num_digits, int) or num_digits < 2:
    raise ValueError(f'num_digits must be an int >= 2, got {num_digits!r}')
  _check_seed('task_seed', task_seed)
  if num_tasks > math.factorial(input_len) - 1:
    raise ValueError(f'num_tasks={num_tasks}: there are only {math.factorial(input_len) - 1} '
                     f'non-identity permutations of input_len={input_len} positions')
  pairs = (input_len - 1) // 2 if recall_pairs is None else recall_pairs
  if num_recall_tasks:
    if not isinstance(pairs, int) or not 1 <= pairs <= (input_len - 1) // 2:
      raise ValueError(f'recall_pairs must be in [1, (input_len-1)//2 = {(input_len - 1) // 2}]'
                       f', got {recall_pairs!r}')
    if input_len - 2 * pairs > pairs:
      raise ValueError(f'recall_pairs={pairs} leaves {input_len - 2 * pairs} query slots in '
                       f'input_len={input_len}, more than there are keys; raise recall_pairs')
    if pairs > num_digits:
      raise ValueError(f'recall_pairs={pairs} distinct keys need num_digits >= {pairs}, '
                       f'got {num_digits}')
    if num_recall_tasks > pairs:
      raise ValueError(f'num_recall_tasks={num_recall_tasks} needs distinct offsets < '
                       f'recall_pairs={pairs}')
  if num_induction_tasks and input_len < num_induction_tasks + 2:
    raise ValueError(f'input_len={input_len} is too short for num_induction_tasks='
                     f'{num_induction_tasks}: induction_{num_induction_tasks - 1} needs '
                     f'input_len >= {num_induction_tasks + 2}')
  rng = np.random.default_rng([0x7A5C, task_seed])
  identity = tuple(range(input_len))
  seen, perms = {identity}, []
  while len(perms) < num_tasks:
    p = tuple(int(i) for i in rng.permutation(input_len))
    if p not in seen:
      seen.add(p)
      perms.append(p)
  perms_TxI = np.array(perms, np.int64).reshape(num_tasks, input_len)
  tasks = _Tasks(num_tasks, input_len, num_digits, num_recall_tasks, num_induction_tasks,
                 pairs if num_recall_tasks else 0, 0, perms_TxI)
  natural = input_len + 2 + max(tasks.output_len(t) for t in range(tasks.total_tasks))
  if seq_len is None:
    seq_len = natural
  elif not isinstance(seq_len, int) or seq_len < natural:
    raise ValueError(f'seq_len={seq_len!r} is shorter than the sequences need: task token + '
                     f'input_len={input_len} + separator + longest output = {natural}')
  return dataclasses.replace(tasks, seq_len=seq_len)


def _generate(tasks: _Tasks, num_rows: int, rng: np.random.Generator):
  """num_rows sequences with tasks balanced (each task num_rows/T rows, in random order).

  Returns tokens_NxL, valid_NxL, target_NxL, label_N (see `synthetic` for the layout);
  here N = num_rows, I = input_len, T = tasks, R / M = recall / induction rows, P = pairs,
  Q = queries.
  """
  T, n, V, L = tasks.total_tasks, tasks.input_len, tasks.num_digits, tasks.seq_len
  label_N = rng.permutation(np.arange(num_rows) % T)
  x_NxI = rng.integers(0, V, (num_rows, n))      # every task starts from random digits
  y_NxI = np.zeros((num_rows, n), np.int64)      # outputs, left-aligned
  out_len_T = np.array([tasks.output_len(t) for t in range(T)])

  perm = label_N < tasks.num_tasks
  y_NxI[perm] = np.take_along_axis(x_NxI[perm], tasks.permutations_TxI[label_N[perm]], axis=1)

  recall = (label_N >= tasks.num_tasks) & (label_N < tasks.num_tasks + tasks.num_recall_tasks)
  if recall.any():
    R, p, q = int(recall.sum()), tasks.recall_pairs, tasks.recall_queries
    keys_RxP = np.argsort(rng.random((R, V)), axis=1)[:, :p]          # distinct keys
    values_RxP = rng.integers(0, V, (R, p))
    asked_RxQ = np.argsort(rng.random((R, p)), axis=1)[:, :q]        # distinct pairs asked
    offset_R = label_N[recall] - tasks.num_tasks
    x_RxI = np.empty((R, n), np.int64)
    x_RxI[:, 0:2 * p:2], x_RxI[:, 1:2 * p:2] = keys_RxP, values_RxP
    x_RxI[:, 2 * p:] = np.take_along_axis(keys_RxP, asked_RxQ, axis=1)
    answer_RxQ = np.take_along_axis(values_RxP, (asked_RxQ + offset_R[:, None]) % p, axis=1)
    x_NxI[recall] = x_RxI
    y_NxI[np.ix_(np.flatnonzero(recall), np.arange(q))] = answer_RxQ

  induction = label_N >= tasks.num_tasks + tasks.num_recall_tasks
  if induction.any():
    M = int(induction.sum())
    r_M = label_N[induction] - tasks.num_tasks - tasks.num_recall_tasks   # copy r+1 tokens
    x_MxI = x_NxI[induction]
    i_M = (rng.random(M) * (n - 2 - r_M)).astype(np.int64)    # uniform in [0, n-3-r]
    query_M = x_MxI[np.arange(M), i_M]
    # The query's most recent earlier occurrence must be i: later copies become other digits.
    later_MxI = (np.arange(n)[None, :] > i_M[:, None]) & (x_MxI == query_M[:, None])
    other_MxI = (query_M[:, None] + rng.integers(1, V, (M, n))) % V
    x_MxI = np.where(later_MxI, other_MxI, x_MxI)
    x_MxI[:, n - 1] = query_M
    follow_MxI = np.take_along_axis(x_MxI, np.minimum(i_M[:, None] + 1 + np.arange(n), n - 1),
                                    axis=1)
    x_NxI[induction] = x_MxI
    y_NxI[induction] = np.where(np.arange(n)[None, :] <= r_M[:, None], follow_MxI, 0)

  tokens_NxL = np.full((num_rows, L), tasks.pad_id, np.int32)
  tokens_NxL[:, 0] = tasks.sep_id + 1 + label_N
  tokens_NxL[:, 1:n + 1] = x_NxI
  tokens_NxL[:, n + 1] = tasks.sep_id
  end_N = tasks.prompt_len + out_len_T[label_N]
  pos_L = np.arange(L)
  valid_NxL = pos_L[None, :] < end_N[:, None]
  target_NxL = valid_NxL & (pos_L[None, :] >= tasks.prompt_len)
  out_NxL = np.zeros((num_rows, L), np.int64)
  width = min(n, L - tasks.prompt_len)    # the longest output
  out_NxL[:, tasks.prompt_len:tasks.prompt_len + width] = y_NxI[:, :width]
  tokens_NxL = np.where(target_NxL, out_NxL, tokens_NxL).astype(np.int32)
  return tokens_NxL, valid_NxL, target_NxL, label_N


def _row_keys(tokens_NxL) -> list[bytes]:
  return [row.tobytes() for row in np.ascontiguousarray(tokens_NxL)]


def synthetic(*, num_tasks: int = 16, input_len: int = 12, num_digits: int = 10,
              num_recall_tasks: int = 2, num_induction_tasks: int = 2,
              recall_pairs: int | None = None, seq_len: int | None = None,
              num_train: int = 100_000, num_validation: int = 2_000, num_test: int = 4_000,
              seed: int = 0, task_seed: int = 0) -> Splits:
  """The built-in synthetic multi-task benchmark (no download; deterministic).

  Each row is `[task token, x_0 .. x_{n-1}, SEP, y_0 .. y_{m-1}, PAD ...]` with n =
  input_len digits in [0, num_digits); the output y (m tokens, m depending on the task)
  is the target: target_mask is True exactly on y, prompt_len = n + 2 for every row, and
  rows shorter than L are padded with pad_id (valid False). Token ids: digits
  0..num_digits-1, pad_id = num_digits, SEP = num_digits + 1, the task token of task t =
  num_digits + 2 + t; vocab_size = num_digits + 2 + T. `label` is the task id t.

  Tasks (ids in this order; info.label_names holds their names):
    permute_t (t < num_tasks): y = x[pi_t], with pi_t a fixed random non-identity
      permutation of the n positions, different for every task (m = n). Many tasks, each
      with its own position pattern, make the benchmark capacity-limited: a model with
      few heads cannot hold every pattern, so dense attention beats static pruning.
    recall_r (r < num_recall_tasks): key-value lookup. x = k_0 v_0 k_1 v_1 ... k_{p-1}
      v_{p-1} q_0 .. q_{m-1} with p = recall_pairs distinct keys, any values, and m = n - 2p
      queries, each a key of a different pair; y_j = the value of pair (i_j + r) mod p,
      where pair i_j holds the key q_j (recall_0 is plain recall).
    induction_r (r < num_induction_tasks): x_{n-1} (the query) also occurs at position i
      <= n-3-r, and nowhere after i before the end; y = x_{i+1} .. x_{i+r+1}, the r+1
      tokens that followed its most recent earlier occurrence (m = r+1). Digits after i
      that equalled the query are redrawn, so the answer is unambiguous.

  Args:
    num_tasks: number of permutation tasks.
    input_len: n, the digits of every input (also the number of recall/induction slots).
    num_digits: the digit vocabulary size.
    num_recall_tasks, num_induction_tasks: how many recall / induction tasks (0 for none).
    recall_pairs: key-value pairs p of the recall inputs; default (n-1)//2.
    seq_len: L, pad every row to this length; default the longest row, n + 2 + max m.
    num_train, num_validation, num_test: rows per split; tasks are balanced in each.
    seed: draws the sequences (each split from its own stream).
    task_seed: draws the task definitions (the permutations), shared by all splits.

  No test or validation sequence appears in train: train rows equal to one of theirs are
  dropped, so len(train) can be below num_train when the sequence space is tiny (at the
  defaults the space is > 10**10 sequences per task and nothing is dropped).
  """
  tasks = _make_tasks(num_tasks=num_tasks, input_len=input_len, num_digits=num_digits,
                      num_recall_tasks=num_recall_tasks,
                      num_induction_tasks=num_induction_tasks, recall_pairs=recall_pairs,
                      seq_len=seq_len, task_seed=task_seed)
  for name, value in (('num_train', num_train), ('num_validation', num_validation),
                      ('num_test', num_test)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be an int >= 1, got {value!r}')
  _check_seed('seed', seed)
  train, validation, test = (
      _generate(tasks, size, np.random.default_rng([0x5E9, seed, stream]))
      for stream, size in ((0, num_train), (1, num_validation), (2, num_test)))
  held_out = set(_row_keys(validation[0])) | set(_row_keys(test[0]))
  keep_N = np.array([key not in held_out for key in _row_keys(train[0])], bool)
  train = tuple(a[keep_N] for a in train)
  if not len(train[0]):
    raise ValueError('every train sequence also occurs in validation or test: the sequence '
                     'space is too small; raise input_len or num_digits')
  fingerprint = {
      'kind': 'synthetic', 'generator': 1, 'num_tasks': num_tasks, 'input_len': input_len,
      'num_digits': num_digits, 'num_recall_tasks': num_recall_tasks,
      'num_induction_tasks': num_induction_tasks, 'recall_pairs': tasks.recall_pairs,
      'seq_len': tasks.seq_len, 'num_train': num_train, 'num_validation': num_validation,
      'num_test': num_test, 'seed': seed, 'task_seed': task_seed,
      'permutations': tasks.permutations_TxI.tolist(),
      'train_dropped_as_held_out': int((~keep_N).sum()), 'numpy': np.__version__,
      'python': sys.version.split()[0],
      'sha256': _sha256_rows(tasks.permutations_TxI, train[0], validation[0], test[0]),
  }
  return Splits(_rows(*train), _rows(*validation), _rows(*test), _synthetic_info(tasks,
                                                                                 fingerprint))


def _synthetic_info(tasks: _Tasks, fingerprint: dict) -> DataInfo:
  return DataInfo(vocab_size=tasks.sep_id + 1 + tasks.total_tasks, seq_len=tasks.seq_len,
                  prompt_len=tasks.prompt_len, pad_id=tasks.pad_id, label_names=tasks.names(),
                  fingerprint=fingerprint)


def synthetic_stream(*, num_tasks: int = 16, input_len: int = 12, num_digits: int = 10,
                     num_recall_tasks: int = 2, num_induction_tasks: int = 2,
                     recall_pairs: int | None = None, seq_len: int | None = None,
                     seed: int = 0, task_seed: int = 0, chunk_size: int = 4096,
                     ) -> tuple[datasets.IterableDataset, DataInfo]:
  """The synthetic benchmark as an infinite `datasets.IterableDataset` (numpy format).

  Same tasks, layout and knobs as `synthetic` (same task_seed, same tasks). Rows come in
  chunks of chunk_size, chunk c drawn from (seed, c) on streams of their own, so the
  stream never repeats the sized splits' draws; it is not deduplicated against them (at
  the defaults a collision with a 4,000-row test split is below 1e-6 per row).
  For training that resumes exactly, prefer `synthetic` with `batch_at`.
  """
  tasks = _make_tasks(num_tasks=num_tasks, input_len=input_len, num_digits=num_digits,
                      num_recall_tasks=num_recall_tasks,
                      num_induction_tasks=num_induction_tasks, recall_pairs=recall_pairs,
                      seq_len=seq_len, task_seed=task_seed)
  _check_seed('seed', seed)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f'chunk_size must be an int >= 1, got {chunk_size!r}')

  def rows(tasks, seed, chunk_size):
    for chunk in itertools.count():
      columns = _generate(tasks, chunk_size, np.random.default_rng([0x5E9, seed, 3, chunk]))
      for tokens, valid, target, label in zip(*columns):
        yield {'tokens': tokens, 'valid': valid, 'target_mask': target, 'label': label}

  stream = datasets.IterableDataset.from_generator(
      rows, features=_features(tasks.seq_len),
      gen_kwargs={'tasks': tasks, 'seed': seed, 'chunk_size': chunk_size})
  fingerprint = {
      'kind': 'synthetic_stream', 'generator': 1, 'num_tasks': num_tasks,
      'input_len': input_len, 'num_digits': num_digits, 'num_recall_tasks': num_recall_tasks,
      'num_induction_tasks': num_induction_tasks, 'recall_pairs': tasks.recall_pairs,
      'seq_len': tasks.seq_len, 'seed': seed, 'task_seed': task_seed,
      'chunk_size': chunk_size, 'permutations': tasks.permutations_TxI.tolist(),
      'numpy': np.__version__, 'python': sys.version.split()[0],
      'sha256': _sha256_rows(tasks.permutations_TxI)}
  return stream.with_format('numpy'), _synthetic_info(tasks, fingerprint)


# ---------------------------------------------------------------------------------------
# Text: sources, byte tokenizer, splits by document, packing within a domain.

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


def _tokenizer(name: str) -> _Tokenizer:
  if name == 'bytes':
    return _Tokenizer(lambda texts: [encode_bytes(t) for t in texts], BYTE_DOC_ID,
                      BYTE_PAD_ID, BYTE_VOCAB, 'bytes')
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
    order = _order(names, source, seed)
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
  but the first of a window (nothing in the window predicts it).
  """
  ids = tokenizer.encode([t for _, t in documents])
  end = [] if tokenizer.doc_id is None else [np.array([tokenizer.doc_id], np.int32)]
  stream = np.concatenate([part for doc in ids for part in [doc, *end]])
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


# ---------------------------------------------------------------------------------------
# Classification form for GatedEncoder.

def classification(splits: Splits) -> Splits:
  """Rows (tokens, valid, label) for GatedEncoder; no token is an LM target.

  Text: the same windows; label = the domain (which source the window comes from).
  Synthetic: only the permutation tasks' rows, with the task token removed (L becomes
  L-1: x, SEP, y, padding); label = which permutation produced y from x, so the encoder
  must infer it from the sequence (label_names = the permutation tasks'). Recall and
  induction rows are left out: their output length alone would give their label away.
  In both, target_mask is all False and info.prompt_len = info.seq_len.
  """
  kind = splits.info.fingerprint.get('kind')
  info = splits.info
  if kind == 'text':
    def transform(dataset):
      return dataset.map(lambda m: {'target_mask': np.zeros_like(m)},
                         input_columns='target_mask', batched=True, batch_size=10_000,
                         features=dataset.features)
    L, names = info.seq_len, info.label_names
  elif kind == 'synthetic':
    T = info.fingerprint['num_tasks']
    if T < 2:
      raise ValueError(f'classification needs num_tasks >= 2 permutation tasks, got {T}')
    L, names = info.seq_len - 1, info.label_names[:T]

    def transform(dataset):
      kept = dataset.filter(lambda label: label < T, input_columns='label', batched=True,
                            batch_size=10_000)
      return kept.map(
          lambda b: {'tokens': b['tokens'][:, 1:], 'valid': b['valid'][:, 1:],
                     'target_mask': np.zeros_like(b['target_mask'][:, 1:]),
                     'label': b['label']}, batched=True, batch_size=10_000,
          features=_features(L))
  else:
    raise ValueError(f'classification takes the Splits of `synthetic` or `text`, got kind '
                     f'{kind!r}')
  info = dataclasses.replace(info, seq_len=L, prompt_len=L, label_names=names,
                             fingerprint={**info.fingerprint, 'form': 'classification'})
  return Splits(*(transform(d).with_format('numpy') for d in splits[:3]), info)


# ---------------------------------------------------------------------------------------
# Batches: the resumable pipeline.

_COLUMNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _columns(dataset: datasets.Dataset) -> dict[str, np.ndarray]:
  """The dataset's columns as numpy arrays in their stored dtypes, cached per dataset.

  Read once through Arrow (fixed-size lists become [N, L] arrays, mostly without a
  copy); indexing these is ~30x faster than an indexed read of the dataset.
  """
  cached = _COLUMNS.get(dataset)
  if cached is None:
    table = dataset.with_format('arrow')[:]
    cached = {}
    for name in table.column_names:
      column = table.column(name).combine_chunks()
      if pa.types.is_fixed_size_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False)
        array = values.reshape(len(column), column.type.list_size)
      elif pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        raise ValueError(f'batch_at needs fixed-length columns; column {name!r} has '
                         f'variable-length type {column.type}')
      else:
        array = column.to_numpy(zero_copy_only=False)
      array.setflags(write=False)
      cached[name] = array
    _COLUMNS[dataset] = cached
  return cached


@functools.lru_cache(maxsize=8)
def _permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
  perm = np.random.default_rng([0xBA7C, seed, epoch]).permutation(num_rows)
  perm.setflags(write=False)
  return perm


def _check_dataset(dataset, batch_size) -> int:
  if not isinstance(dataset, datasets.Dataset):
    raise ValueError(f'dataset must be a map-style datasets.Dataset, got {type(dataset)}')
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f'batch_size must be an int >= 1, got {batch_size!r}')
  if len(dataset) == 0:
    raise ValueError('dataset is empty: no rows to batch')
  return len(dataset)


def batch_at(dataset: datasets.Dataset, step: int, batch_size: int,
             seed: int) -> dict[str, np.ndarray]:
  """The training batch at `step`: a pure function of (dataset, step, batch_size, seed).

  Rows are visited epoch by epoch, each epoch in its own permutation drawn from (seed,
  epoch); step s takes positions [s*B, (s+1)*B) of the concatenated epochs, so a batch
  may end one epoch and start the next, and every row is seen once per epoch. A resumed
  run needs only the step. Returns {column: array [B, ...]} in the stored dtypes
  (tokens int32 [B, L], valid and target_mask bool [B, L], label int64 [B]).
  """
  N = _check_dataset(dataset, batch_size)
  if batch_size > N:
    raise ValueError(f'batch_size={batch_size} is larger than the dataset ({N} rows)')
  if not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f'step must be an int >= 0, got {step!r}')
  _check_seed('seed', seed)
  position_B = int(step) * int(batch_size) + np.arange(batch_size, dtype=np.int64)
  epoch_B, row_B = np.divmod(position_B, N)
  index_B = np.empty(batch_size, np.int64)
  for epoch in np.unique(epoch_B):    # one epoch, or two at a wrap
    here = epoch_B == epoch
    index_B[here] = _permutation(N, int(seed), int(epoch))[row_B[here]]
  return {name: array[index_B] for name, array in _columns(dataset).items()}


def eval_batches(dataset: datasets.Dataset,
                 batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """The dataset in order, in batches of batch_size; the last one may be smaller."""
  N = _check_dataset(dataset, batch_size)
  columns = _columns(dataset)
  for start in range(0, N, batch_size):
    yield {name: array[start:start + batch_size] for name, array in columns.items()}
