"""The row format that every split shares, and the classification form for GatedEncoder.

Every split is a map-style `datasets.Dataset` in numpy format whose rows all have the
same length L and these columns:

  'tokens'      int32 [L]  token ids in [0, vocab_size); pad_id where not valid
  'valid'       bool  [L]  False on padding
  'target_mask' bool  [L]  token t is a prediction target (predicted from position t-1)
  'label'       int64 []   task id (synthetic) or domain id (text), indexing label_names

(datasets' numpy formatter widens integer columns to int64 when a row is read by
index; `batch_at` and `eval_batches` return the stored dtypes: tokens int32.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import NamedTuple

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model and a loss need to know about the rows of a `Splits`."""
  vocab_size: int            # tokens are in [0, vocab_size)
  seq_len: int               # L, every row has exactly this length
  prompt_len: int            # tokens before the first possible target in every row
  pad_id: int
  label_names: tuple[str, ...]   # task names (synthetic) or domain names (text)
  fingerprint: dict          # what identifies the data (settings, sources, sha256, versions)


# Fingerprint keys that say where the data was read from and with which tool versions,
# not what it is: the sha256 of the content decides identity.
_NOT_IDENTITY = ('path', 'python', 'numpy', 'files_available')


def identity(fingerprint: dict) -> dict:
  """What identifies the data of a fingerprint: its content and settings, without the
  paths its files were read from or the tool versions that read them (so a run folder
  can be evaluated or resumed after it, or its data, moved). A text fingerprint's
  domains are listed in label order, not keyed by source name (a file source's name
  is its path)."""
  def strip(value):
    if isinstance(value, dict):
      return {k: strip(v) for k, v in value.items() if k not in _NOT_IDENTITY}
    if isinstance(value, (list, tuple)):
      return [strip(v) for v in value]
    return value
  out = strip(json.loads(json.dumps(fingerprint)))
  if isinstance(out.get('domains'), dict) and isinstance(out.get('sources'), list):
    out['domains'] = [out['domains'][s] for s in out.pop('sources') if s in out['domains']]
  return out


class Splits(NamedTuple):
  train: datasets.Dataset       # map-style, numpy format
  validation: datasets.Dataset  # for tuning
  test: datasets.Dataset        # for reported numbers
  info: DataInfo


def check_tokens(splits: Splits) -> None:
  """A ValueError naming the split unless every token id is in [0, info.vocab_size): an id
  outside it would index past the embedding table, which under jit gives NaN logits
  instead of an error (nnx.Embed's jnp.take fills out-of-range rows with NaN)."""
  V = splits.info.vocab_size
  for name, dataset in zip(('train', 'validation', 'test'), splits[:3]):
    if len(dataset) == 0:
      continue
    column = dataset.with_format('arrow')[:].column('tokens').combine_chunks().flatten()
    low, high = (v.as_py() for v in pa.compute.min_max(column).values())
    if low < 0 or high >= V:
      raise ValueError(f'the {name} split holds token ids in [{low}, {high}], outside the '
                       f'vocabulary [0, {V}) of its DataInfo (a tokenizer and vocab_size '
                       'that do not match?)')


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
  """A data seed is an int in [0, 2**32): numpy splits a larger one into 32-bit words, so
  [key, 2**32, stream] seeds as [key, 0, 1, stream], another seed's draws."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise ValueError(f'{name} must be an int >= 0, got {value!r}')
  if value >= 2**32:
    raise ValueError(f'{name} must be < 2**32, got {value!r} (numpy would draw another '
                     "seed's rows)")


def _sha256_rows(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


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
