"""Datasets pipelines: a synthetic multi-task benchmark and a multi-domain text corpus.

  rows.py     the row format every split shares (DataInfo, Splits) and `classification`
  tasks.py    `synthetic`, the default data: no download, deterministic from a seed, and
              made to be capacity-limited so that gate rules differ (see its docstring)
  corpus.py   `text`: real text from the running Python's standard library, pydoc's
              documentation, tinyshakespeare or any file, packed into byte-level windows
              that never mix domains
  batches.py  `batch_at`, the resumable training pipeline (the batch is a pure function
              of (dataset, step, batch_size, seed), so the data position of a checkpoint
              is just its step), and `eval_batches` (all rows in order, or a fixed random
              sample of them: `sample_rows`)

Every split is a map-style `datasets.Dataset` in numpy format whose rows all have the
same length L and the columns 'tokens', 'valid', 'target_mask' and 'label' (rows.py).
`classification` turns either kind into rows for GatedEncoder.

This package imports `datasets`; `import gating` does not import it.
"""

from gating.data.batches import batch_at, eval_batches, sample_rows
from gating.data.corpus import (BUILTIN_SOURCES, BYTE_DOC_ID, BYTE_PAD_ID, BYTE_VOCAB,
                                SHAKESPEARE, decode_bytes, encode_bytes, text)
from gating.data.rows import DataInfo, Splits, check_tokens, classification, identity
from gating.data.tasks import synthetic, synthetic_stream

__all__ = [
    'BUILTIN_SOURCES', 'BYTE_DOC_ID', 'BYTE_PAD_ID', 'BYTE_VOCAB', 'DataInfo', 'SHAKESPEARE',
    'Splits', 'batch_at', 'check_tokens', 'classification', 'decode_bytes', 'encode_bytes', 'eval_batches',
    'identity', 'sample_rows',
    'synthetic', 'synthetic_stream', 'text',
]
