"""Slice assigners: each sequence's slice e in [0, E) for gate='slices' (selection.py).

Specialization built by the data (c-BTM, Gururangan et al. 2023; DEMix; SmallTalk LM): the
assignment is fixed before training, each slice's weights train only on its sequences,
and the model runs the slice it is given (`slice_B`, the same in every layer). The
assigner is the rule's option `assigner` (model.gate_options=assigner=NAME):

  label    slice = the row's label (the synthetic task, the text domain; DEMix's routing by
           domain): the oracle, at train and test time. Needs exactly E labels.
  cluster  balanced k-means (c-BTM) with E clusters on a cheap document feature, fitted
           once on the training split:
             f(x) = l2-normalize( log(1 + c(x)) * idf ),
           c(x) the counts of the sequence's hashed token n-grams (n = 1, 2, 3; NUM_BUCKETS
           buckets) over its valid tokens, idf_j = log((1 + N) / (1 + df_j)) + 1 over the N
           training rows. Training rows take their cluster of the balanced assignment;
           validation and test rows the nearest centroid of their prefix's feature (the
           first P tokens: no label, no later token). Each such row also keeps the cluster
           its whole sequence would get (`slice_whole`), so that the prefix routing's
           agreement is reported (`agreement`).

Balanced k-means: Lloyd's iterations from E distinct rows drawn with the seed, where the
assignment step is balanced (each cluster takes at most ceil(N / E) rows): the (row,
centroid) pairs are taken in order of cosine similarity, highest first, and a row joins
the first centroid that still has room; then each centroid is the normalized mean of its
rows. Deterministic given the data and the seed. The fitted idf and centroids are written
to the run folder (`slices.npz`, with the data's fingerprint), and resume and evaluation
read them from there instead of fitting again; stored centroids of other data are refused.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from gating.layers import selection

NUM_BUCKETS = 4096
NGRAMS = (1, 2, 3)
KMEANS_ITERATIONS = 20
STORE = 'slices.npz'


def slice_count(model_cfg) -> int:
  """E of a gate='slices' model config: (H - S) / (K - S) (under unit='kv_group' counted
  in KV groups, the same number). A ValueError names a remainder or E < 2."""
  k, s = model_cfg.active_heads, model_cfg.shared_heads
  if not isinstance(k, int):
    raise ValueError(f"gate='slices' needs one budget for every layer: model.active_heads "
                     f'must be an int, got {k!r}')
  return selection.num_slices(model_cfg.num_heads - s, k - s)


def assigner_of(model_cfg) -> str:
  return str(dict(model_cfg.gate_options).get('assigner', 'label'))


def features(tokens_NxL: np.ndarray, valid_NxL: np.ndarray, idf_J: np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """(f_NxJ, idf_J): the l2-normalized tf-idf of hashed token n-grams (module docstring)
  of each row's valid tokens; idf is computed from these rows unless given."""
  tokens_NxL = np.asarray(tokens_NxL, np.int64)
  valid_NxL = np.asarray(valid_NxL, bool)
  N, L = tokens_NxL.shape
  counts_NxJ = np.zeros((N, NUM_BUCKETS), np.float64)
  for n in NGRAMS:
    if L < n:
      continue
    h_NxT = np.full((N, L - n + 1), n * 0x9E3779B1, np.int64)
    ok_NxT = np.ones((N, L - n + 1), bool)
    for i in range(n):
      h_NxT = (h_NxT * 1_000_003 + tokens_NxL[:, i:L - n + 1 + i]) % (1 << 31)
      ok_NxT &= valid_NxL[:, i:L - n + 1 + i]
    rows_NxT = np.broadcast_to(np.arange(N)[:, None], h_NxT.shape)
    np.add.at(counts_NxJ, (rows_NxT[ok_NxT], h_NxT[ok_NxT] % NUM_BUCKETS), 1.0)
  if idf_J is None:
    df_J = (counts_NxJ > 0).sum(axis=0)
    idf_J = np.log((1.0 + N) / (1.0 + df_J)) + 1.0
  f_NxJ = np.log1p(counts_NxJ) * idf_J[None, :]
  norm_Nx1 = np.linalg.norm(f_NxJ, axis=1, keepdims=True)
  return f_NxJ / np.maximum(norm_Nx1, 1e-12), idf_J


def balanced_assign(sim_NxE: np.ndarray) -> np.ndarray:
  """cluster_N: each row to a centroid, at most ceil(N / E) rows per centroid, the (row,
  centroid) pairs taken in order of similarity (highest first; ties by row, then
  centroid)."""
  N, E = sim_NxE.shape
  capacity = -(-N // E)
  order = np.lexsort((np.tile(np.arange(E), N), np.repeat(np.arange(N), E),
                      -sim_NxE.reshape(-1)))
  cluster_N = np.full(N, -1, np.int64)
  room_E = np.full(E, capacity)
  left = N
  for flat in order:
    row, e = divmod(int(flat), E)
    if cluster_N[row] < 0 and room_E[e] > 0:
      cluster_N[row] = e
      room_E[e] -= 1
      left -= 1
      if not left:
        break
  return cluster_N


def balanced_kmeans(f_NxJ: np.ndarray, num_clusters: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(centroids_ExJ, cluster_N) of balanced k-means on l2-normalized rows (module
  docstring). A ValueError when there are fewer rows than clusters."""
  N = f_NxJ.shape[0]
  if N < num_clusters:
    raise ValueError(f'{num_clusters} slices need at least {num_clusters} training rows to '
                     f'cluster; the training split has {N}')
  rng = np.random.default_rng([0x511CE, seed])
  centroids_ExJ = f_NxJ[rng.choice(N, num_clusters, replace=False)]
  cluster_N = None
  for _ in range(KMEANS_ITERATIONS):
    new_N = balanced_assign(f_NxJ @ centroids_ExJ.T)
    if cluster_N is not None and np.array_equal(new_N, cluster_N):
      break
    cluster_N = new_N
    for e in range(num_clusters):
      mean_J = f_NxJ[cluster_N == e].mean(axis=0)
      centroids_ExJ[e] = mean_J / max(np.linalg.norm(mean_J), 1e-12)
  return centroids_ExJ, cluster_N


def nearest(f_NxJ: np.ndarray, centroids_ExJ: np.ndarray) -> np.ndarray:
  """cluster_N: the centroid of highest cosine similarity (rows and centroids are unit)."""
  return np.argmax(f_NxJ @ centroids_ExJ.T, axis=1)


def prefix_valid(valid_NxL: np.ndarray, prefix_len: int) -> np.ndarray:
  """valid_NxL restricted to the first P positions."""
  valid_NxL = np.asarray(valid_NxL, bool)
  return valid_NxL & (np.arange(valid_NxL.shape[1]) < prefix_len)[None, :]


def _fingerprint(info) -> str:
  text = json.dumps({k: v for k, v in sorted(info.fingerprint.items())
                     if k not in ('path', 'python', 'numpy', 'files_available')},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def fit_cluster(splits, num_clusters: int, seed: int) -> dict[str, np.ndarray]:
  """The cluster assigner fitted on the training split: {'idf', 'centroids', 'data'}."""
  cols = splits.train.with_format('numpy')[:]
  f_NxJ, idf_J = features(cols['tokens'], cols['valid'])
  centroids_ExJ, _ = balanced_kmeans(f_NxJ, num_clusters, seed)
  return {'idf': idf_J, 'centroids': centroids_ExJ,
          'data': np.asarray(_fingerprint(splits.info))}


def load_or_fit(splits, num_clusters: int, seed: int, workdir: str | None):
  """The run's stored cluster assigner (workdir/slices.npz) or a new fit. Stored centroids
  of other data, or of another slice count, are a ValueError."""
  path = None if workdir is None else os.path.join(workdir, STORE)
  if path is None or not os.path.exists(path):
    return fit_cluster(splits, num_clusters, seed), False
  with np.load(path) as stored:
    fitted = {k: stored[k] for k in ('idf', 'centroids', 'data')}
  if str(fitted['data']) != _fingerprint(splits.info):
    raise ValueError(f"{path}: the cluster assigner's centroids were fitted on other data "
                     f"(data {str(fitted['data'])}, this run's {_fingerprint(splits.info)}); "
                     'they do not match the run\'s data')
  if fitted['centroids'].shape != (num_clusters, NUM_BUCKETS):
    raise ValueError(f'{path}: {fitted["centroids"].shape[0]} stored centroids; the model '
                     f'has {num_clusters} slices')
  return fitted, True


def save(workdir: str, fitted: dict[str, np.ndarray]) -> None:
  np.savez(os.path.join(workdir, STORE), **fitted)


def assign(splits, model_cfg, seed: int, prefix_len: int, workdir: str | None = None):
  """(splits with int32 columns 'slice' (what the model runs) and 'slice_whole' (the
  whole sequence's assignment), the fitted cluster assigner or None). A ValueError, before
  anything is written, for an assignment the data cannot give (module docstring)."""
  E = slice_count(model_cfg)
  assigner = assigner_of(model_cfg)
  names = splits.info.label_names
  if len(splits.train) < E:
    raise ValueError(f'{E} slices need at least {E} training rows; the training split has '
                     f'{len(splits.train)}')
  fitted = None
  if assigner == 'label':
    if len(names) != E:
      raise ValueError(f"assigner 'label' gives each label its slice: the data has "
                       f'{len(names)} label(s) {list(names)}, the model {E} slices; choose '
                       f'active_heads and shared_heads so that (H - S) / (K - S) = {len(names)}')
    per_split = {}
    for name in ('train', 'validation', 'test'):
      label_N = np.asarray(getattr(splits, name).with_format('numpy')['label'], np.int32)
      per_split[name] = (label_N, label_N)
  else:
    fitted, _ = load_or_fit(splits, E, seed, workdir)
    per_split = {}
    for name in ('train', 'validation', 'test'):
      cols = getattr(splits, name).with_format('numpy')[:]
      f_NxJ = features(cols['tokens'], cols['valid'], fitted['idf'])[0]
      if name == 'train':     # the balanced assignment the centroids were fitted with
        balanced_N = balanced_assign(f_NxJ @ fitted['centroids'].T)
        per_split[name] = (balanced_N, balanced_N)
        continue
      whole_N = nearest(f_NxJ, fitted['centroids'])
      prefix_N = nearest(features(cols['tokens'], prefix_valid(cols['valid'], prefix_len),
                                  fitted['idf'])[0], fitted['centroids'])
      per_split[name] = (prefix_N, whole_N)
  out = []
  for name in ('train', 'validation', 'test'):
    dataset = getattr(splits, name)
    for column in ('slice', 'slice_whole'):
      if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    run_N, whole_N = per_split[name]
    dataset = dataset.add_column('slice', run_N.astype(np.int32).tolist())
    dataset = dataset.add_column('slice_whole', whole_N.astype(np.int32).tolist())
    out.append(dataset.with_format('numpy'))
  return type(splits)(*out, splits.info), fitted


def agreement(dataset) -> float:
  """The fraction of rows whose slice (from the prefix) is the whole sequence's."""
  cols = dataset.with_format('numpy')[:]
  return float(np.mean(cols['slice'] == cols['slice_whole'])) if len(dataset) else 1.0


def counts(dataset, num_slices: int) -> list[int]:
  """Rows per slice."""
  return np.bincount(dataset.with_format('numpy')['slice'], minlength=num_slices).tolist()
