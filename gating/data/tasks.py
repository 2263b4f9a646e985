"""The synthetic multi-task benchmark: the default data, no download.

Deterministic from a seed: permutation tasks, key-value recall and induction (see
`synthetic`'s docstring). Meant to be capacity-limited so that gate rules differ; measured,
it limits how fast few heads learn rather than what they can hold (docs/tuning.md).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys

import datasets
import numpy as np

from gating.data.rows import DataInfo, Splits, _check_seed, _features, _rows, _sha256_rows


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
  # num_terms > 1: the other terms' permutations; task t outputs the sum mod num_digits of
  # x[permutations_TxI[t]] and x[more_terms_JxTxI[j, t]] for every j (J = num_terms - 1)
  more_terms_JxTxI: np.ndarray

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

  @property
  def num_terms(self) -> int:
    return 1 + len(self.more_terms_JxTxI)

  def names(self) -> tuple[str, ...]:
    kind = 'permute' if self.num_terms == 1 else f'sum{self.num_terms}'
    return (tuple(f'{kind}_{t}' for t in range(self.num_tasks))
            + tuple(f'recall_{r}' for r in range(self.num_recall_tasks))
            + tuple(f'induction_{r}' for r in range(self.num_induction_tasks)))


def _make_tasks(*, num_tasks, input_len, num_digits, num_recall_tasks, num_induction_tasks,
                recall_pairs, seq_len, task_seed, num_terms=1) -> _Tasks:
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
  if not isinstance(num_terms, int) or not 1 <= num_terms <= input_len:
    raise ValueError(f'num_terms must be an int in [1, input_len={input_len}] (the terms of '
                     f'one answer sit at distinct positions), got {num_terms!r}')
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
  more_JxTxI = _more_terms(perms_TxI, num_terms - 1, rng)
  tasks = _Tasks(num_tasks, input_len, num_digits, num_recall_tasks, num_induction_tasks,
                 pairs if num_recall_tasks else 0, 0, perms_TxI, more_JxTxI)
  natural = input_len + 2 + max(tasks.output_len(t) for t in range(tasks.total_tasks))
  if seq_len is None:
    seq_len = natural
  elif not isinstance(seq_len, int) or seq_len < natural:
    raise ValueError(f'seq_len={seq_len!r} is shorter than the sequences need: task token + '
                     f'input_len={input_len} + separator + longest output = {natural}')
  return dataclasses.replace(tasks, seq_len=seq_len)


MAX_TERM_DRAWS = 1_000_000   # about 10 s of draws on a 2-core CPU


def _more_terms(perms_TxI: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
  """count more permutations per task, each placing every answer's terms at positions
  distinct from the terms before it (perm[i] differs from every earlier term's perm[i]):
  drawn by rejection, after the first terms, so num_terms = 1 draws what it always drew.
  A ValueError when MAX_TERM_DRAWS draws find none: the share of permutations that fit
  falls about e-fold with each term, so num_terms near input_len would draw for hours
  (input_len = num_terms = 9 took 16 s, 12 did not end)."""
  T, n = perms_TxI.shape
  terms = [perms_TxI]
  for c in range(count):
    term_TxI = np.empty_like(perms_TxI)
    for t in range(T):
      for _ in range(MAX_TERM_DRAWS):
        p = rng.permutation(n)
        if all((p != earlier[t]).all() for earlier in terms):
          term_TxI[t] = p
          break
      else:
        raise ValueError(f'num_terms={count + 1} with input_len={n}: no placement of term '
                         f'{c + 2} apart from the earlier terms in {MAX_TERM_DRAWS:,} random '
                         f'draws (task {t}); use fewer terms')
    terms.append(term_TxI)
  return np.array(terms[1:], np.int64).reshape(count, T, n)


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
  for term_TxI in tasks.more_terms_JxTxI:
    y_NxI[perm] = (y_NxI[perm] + np.take_along_axis(x_NxI[perm], term_TxI[label_N[perm]],
                                                    axis=1)) % V

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
              seed: int = 0, task_seed: int = 0, num_terms: int = 1) -> Splits:
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
      with its own position pattern, were meant to make the benchmark capacity-limited.
      Measured (docs/tuning.md, capacity rounds), they are not at D = 64, 8 heads of 4:
      given 12000 steps, one head per layer solves 64 of them as well as eight; the head
      count changes how fast they are learned (one head slower than eight, two faster),
      not whether.
    sum{c}_t (t < num_tasks, instead of permute_t when num_terms = c > 1): y_j = (x[pi_t(j)]
      + x[pi'_t(j)] + ...) mod num_digits over c fixed permutations of task t, the c terms
      of every answer at distinct positions (m = n). An answer needs c input positions at
      once, so a layer with fewer heads than terms has to fetch several positions with one
      head.
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
    num_terms: input digits summed into each answer digit of the permutation tasks (1:
      permute_t, the permutation itself).

  No test or validation sequence appears in train: train rows equal to one of theirs are
  dropped, so len(train) can be below num_train when the sequence space is tiny (at the
  defaults the space is > 10**10 sequences per task and nothing is dropped).
  """
  tasks = _make_tasks(num_tasks=num_tasks, input_len=input_len, num_digits=num_digits,
                      num_recall_tasks=num_recall_tasks,
                      num_induction_tasks=num_induction_tasks, recall_pairs=recall_pairs,
                      seq_len=seq_len, task_seed=task_seed, num_terms=num_terms)
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
      'sha256': _sha256_rows(tasks.permutations_TxI, *tasks.more_terms_JxTxI, train[0],
                             validation[0], test[0]),
      **_terms_fingerprint(tasks),
  }
  return Splits(_rows(*train), _rows(*validation), _rows(*test), _synthetic_info(tasks,
                                                                                 fingerprint))


def _terms_fingerprint(tasks: _Tasks) -> dict:
  """The extra terms, for num_terms > 1 only: a one-term data set keeps the fingerprint it
  always had, so runs made before num_terms existed still resume."""
  if tasks.num_terms == 1:
    return {}
  return {'num_terms': tasks.num_terms, 'more_terms': tasks.more_terms_JxTxI.tolist()}


def _synthetic_info(tasks: _Tasks, fingerprint: dict) -> DataInfo:
  return DataInfo(vocab_size=tasks.sep_id + 1 + tasks.total_tasks, seq_len=tasks.seq_len,
                  prompt_len=tasks.prompt_len, pad_id=tasks.pad_id, label_names=tasks.names(),
                  fingerprint=fingerprint)


def synthetic_stream(*, num_tasks: int = 16, input_len: int = 12, num_digits: int = 10,
                     num_recall_tasks: int = 2, num_induction_tasks: int = 2,
                     recall_pairs: int | None = None, seq_len: int | None = None,
                     seed: int = 0, task_seed: int = 0, chunk_size: int = 4096,
                     num_terms: int = 1) -> tuple[datasets.IterableDataset, DataInfo]:
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
                      seq_len=seq_len, task_seed=task_seed, num_terms=num_terms)
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
      'sha256': _sha256_rows(tasks.permutations_TxI, *tasks.more_terms_JxTxI),
      **_terms_fingerprint(tasks)}
  return stream.with_format('numpy'), _synthetic_info(tasks, fingerprint)
