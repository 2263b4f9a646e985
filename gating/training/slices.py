"""Slice assigners: each sequence's slice e in [0, E) for gate='slices' (selection.py).

Specialization built by the data (c-BTM, Gururangan et al. 2023; DEMix; SmallTalk LM): the
assignment is fixed before training, each slice's weights train only on its sequences,
and the model runs the slice it is given (`slice_B`, the same in every layer). The
assigner is the rule's option `assigner` (model.gate_options=assigner=NAME):

  label    slice = the row's label (the synthetic task, the text domain; DEMix's routing by
           domain): the oracle, at train and test time. Needs exactly E labels.
  prefix_loss  SmallTalk LM's assignment, refined during training (`rounds` times; see
           its section below), from balanced random slices or (option start=cluster)
           from the cluster assigner's balanced k-means; needs the model, so validation
           and test rows are routed when the run evaluates.
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
assignment step is balanced (each cluster takes at most ceil(b N / E) rows, b the rule's
option `balance`, 1 by default: equal clusters, floor(N / E) or ceil(N / E) rows; b = E
is plain k-means): the (row, centroid) pairs are taken in order of cosine similarity,
highest first, and a row joins the first centroid that still has room; then each
centroid is the normalized mean of its rows (a centroid that no row chose keeps its
place). Deterministic given the data and the seed. The fitted idf and centroids are
written to the run folder (`slices.npz`, with the data's fingerprint), and resume and
evaluation read them from there instead of fitting again; stored centroids of other data
are refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import numpy as np

from gating import data
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


def balance_of(model_cfg) -> float:
  """b, the rule's option `balance`: a slice takes at most ceil(b N / E) of the N training
  rows in the cluster and prefix_loss assignments (1: equal slices; E: no limit)."""
  return float(dict(model_cfg.gate_options).get('balance', 1.0))


def start_of(model_cfg) -> str:
  """The prefix_loss assigner's first assignment (the rule's option `start`): 'random'
  (balanced random slices) or 'cluster' (balanced k-means on the training rows)."""
  return str(dict(model_cfg.gate_options).get('start', 'random'))


def rounds_of(model_cfg) -> int:
  """The prefix_loss assigner's reassignment rounds (the rule's option `rounds`)."""
  return int(dict(model_cfg.gate_options).get('rounds', 2))


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


def balanced_assign(sim_NxE: np.ndarray, balance: float = 1.0) -> np.ndarray:
  """cluster_N: each row to a centroid, at most C = ceil(balance N / E) rows per centroid,
  the (row, centroid) pairs taken in order of similarity (highest first; ties by row, then
  centroid). balance >= 1; balance >= E puts each row at its most similar centroid. When
  the caps leave less than one row of room per centroid (E C - N < E; always at balance
  1), only the N - E (C - 1) centroids that fill first take a C-th row, so that no
  centroid is left short: at balance 1 the sizes are floor(N / E) and ceil(N / E)."""
  N, E = sim_NxE.shape
  capacity = min(N, math.ceil(balance * N / E - 1e-9))
  full_left = N - E * (capacity - 1) if E * capacity - N < E else E
  order = np.lexsort((np.tile(np.arange(E), N), np.repeat(np.arange(N), E),
                      -sim_NxE.reshape(-1)))
  cluster_N = np.full(N, -1, np.int64)
  room_E = np.full(E, capacity)
  left = N
  for flat in order:
    row, e = divmod(int(flat), E)
    if cluster_N[row] < 0 and room_E[e] > 0 and (room_E[e] > 1 or full_left > 0):
      cluster_N[row] = e
      room_E[e] -= 1
      if room_E[e] == 0:
        full_left -= 1
      left -= 1
      if not left:
        break
  return cluster_N


def balanced_kmeans(f_NxJ: np.ndarray, num_clusters: int, seed: int, balance: float = 1.0
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
    new_N = balanced_assign(f_NxJ @ centroids_ExJ.T, balance)
    if cluster_N is not None and np.array_equal(new_N, cluster_N):
      break
    cluster_N = new_N
    for e in range(num_clusters):
      if not (cluster_N == e).any():    # no row chose it (possible when balance > 1): kept
        continue
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


def route_by_prefix(tokens_NxL: np.ndarray, valid_NxL: np.ndarray,
                    fitted: dict[str, np.ndarray], prefix_len: int) -> np.ndarray:
  """cluster_N of the fitted cluster assigner from the first P tokens alone: the
  nearest centroid of the prefix's feature."""
  f_NxJ = features(tokens_NxL, prefix_valid(valid_NxL, prefix_len), fitted['idf'])[0]
  return nearest(f_NxJ, fitted['centroids'])


def _fingerprint(info) -> str:
  """A short hash of what identifies the data (`data.identity`: not where it was read
  from, so a moved run or data folder keeps its assigner)."""
  text = json.dumps(data.identity(info.fingerprint), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_store(path: str, keys: tuple[str, ...], what: str, info,
                made: str = 'made') -> dict[str, np.ndarray]:
  """The arrays `keys` of a stored assigner; a ValueError when the file holds another
  assigner's arrays or was made on other data."""
  with np.load(path) as stored:
    if not set(keys) <= set(stored.files):
      raise ValueError(f"{path} holds another assigner's slices, not {what}")
    store = {k: stored[k] for k in keys}
  if str(store['data']) != _fingerprint(info):
    raise ValueError(f'{path}: the {what} were {made} on other data (data '
                     f"{str(store['data'])}, this run's {_fingerprint(info)}); they do not "
                     "match the run's data")
  return store


def fit_cluster(splits, num_clusters: int, seed: int, balance: float = 1.0
                ) -> dict[str, np.ndarray]:
  """The cluster assigner fitted on the training split: {'idf', 'centroids', 'data'}."""
  cols = splits.train.with_format('numpy')[:]
  f_NxJ, idf_J = features(cols['tokens'], cols['valid'])
  centroids_ExJ, _ = balanced_kmeans(f_NxJ, num_clusters, seed, balance)
  return {'idf': idf_J, 'centroids': centroids_ExJ,
          'data': np.asarray(_fingerprint(splits.info))}


def load_or_fit(splits, num_clusters: int, seed: int, workdir: str | None,
                balance: float = 1.0):
  """The run's stored cluster assigner (workdir/slices.npz) or a new fit. Stored centroids
  of other data, or of another slice count, are a ValueError."""
  path = None if workdir is None else os.path.join(workdir, STORE)
  if path is None or not os.path.exists(path):
    return fit_cluster(splits, num_clusters, seed, balance), False
  fitted = _read_store(path, ('idf', 'centroids', 'data'),
                       "cluster assigner's centroids", splits.info, 'fitted')
  if fitted['centroids'].shape != (num_clusters, NUM_BUCKETS):
    raise ValueError(f'{path}: {fitted["centroids"].shape[0]} stored centroids; the model '
                     f'has {num_clusters} slices')
  return fitted, True


def save(workdir: str, fitted: dict[str, np.ndarray]) -> None:
  """Writes slices.npz whole or not at all (a temporary file, then a rename)."""
  path = os.path.join(workdir, STORE)
  with open(path + '.tmp', 'wb') as f:
    np.savez(f, **fitted)
  os.replace(path + '.tmp', path)


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
  if assigner == 'prefix_loss':   # validation and test are routed with the model, later
    slice_N, fitted = initial_prefix_loss(splits, E, seed, workdir, start_of(model_cfg),
                                          balance_of(model_cfg))
    zeros = lambda name: np.zeros(len(getattr(splits, name)), np.int64)
    per_split = {'train': (slice_N, slice_N), 'validation': (zeros('validation'),) * 2,
                 'test': (zeros('test'),) * 2}
  elif assigner == 'label':
    if len(names) != E:
      raise ValueError(f"assigner 'label' gives each label its slice: the data has "
                       f'{len(names)} label(s) {list(names)}, the model {E} slices; choose '
                       f'active_heads and shared_heads so that (H - S) / (K - S) = {len(names)}')
    per_split = {}
    for name in ('train', 'validation', 'test'):
      label_N = np.asarray(getattr(splits, name).with_format('numpy')['label'], np.int32)
      per_split[name] = (label_N, label_N)
  else:
    fitted, _ = load_or_fit(splits, E, seed, workdir, balance_of(model_cfg))
    per_split = {}
    for name in ('train', 'validation', 'test'):
      cols = getattr(splits, name).with_format('numpy')[:]
      f_NxJ = features(cols['tokens'], cols['valid'], fitted['idf'])[0]
      if name == 'train':     # the balanced assignment the centroids were fitted with
        balanced_N = balanced_assign(f_NxJ @ fitted['centroids'].T, balance_of(model_cfg))
        per_split[name] = (balanced_N, balanced_N)
        continue
      whole_N = nearest(f_NxJ, fitted['centroids'])
      prefix_N = route_by_prefix(cols['tokens'], cols['valid'], fitted, prefix_len)
      per_split[name] = (prefix_N, whole_N)
  out = [_with_slices(getattr(splits, name), *per_split[name])
         for name in ('train', 'validation', 'test')]
  return type(splits)(*out, splits.info), fitted


def _with_column(dataset, name: str, values: np.ndarray):
  """The dataset with the int32 column `name` set to `values` (replaced if present)."""
  if name in dataset.column_names:
    dataset = dataset.remove_columns(name)
  return dataset.add_column(name, np.asarray(values, np.int32).tolist()).with_format('numpy')


def _with_slices(dataset, slice_N: np.ndarray, whole_N: np.ndarray):
  """The dataset with its 'slice' (what the model runs) and 'slice_whole' columns."""
  return _with_column(_with_column(dataset, 'slice', slice_N), 'slice_whole', whole_N)


def agreement(dataset) -> float:
  """The fraction of rows whose slice (from the prefix) is the whole sequence's."""
  cols = dataset.with_format('numpy')[:]
  return float(np.mean(cols['slice'] == cols['slice_whole'])) if len(dataset) else 1.0


def counts(dataset, num_slices: int) -> list[int]:
  """Rows per slice."""
  return np.bincount(dataset.with_format('numpy')['slice'], minlength=num_slices).tolist()


# -- prefix_loss (SmallTalk LM, 2025) ---------------------------------------------------
#
# The training rows start in balanced random slices (or, with start=cluster, in the balanced
# k-means clusters of the cluster assigner, fitted with the same seed and balance: c-BTM's
# assignment as SmallTalk's starting point); after `rounds` evenly spaced points of
# the run (`round_steps`) each training row moves to the slice whose weights give its
# prefix (the first P tokens) the lowest mean next-token loss, under the same balance as
# k-means (`balanced_assign` on -loss: at most ceil(b N / E) rows a slice, so one slice
# that learns fastest cannot take every row). Validation and test rows are routed by the
# same rule without the balance: the slice of lowest loss on their prefix (E passes of
# the model over P tokens), and `slice_whole` is the slice of lowest loss over the whole
# sequence. The rounds' assignments are stored in slices.npz, so a resumed run trains on
# the assignment of its step.


def is_prefix_loss(model_cfg) -> bool:
  return model_cfg.gate == 'slices' and assigner_of(model_cfg) == 'prefix_loss'


def round_steps(steps: int, rounds: int) -> list[int]:
  """The steps after which the training rows are reassigned: r * steps // (rounds + 1) for
  r = 1..rounds (distinct, in (0, steps))."""
  return sorted({r * steps // (rounds + 1) for r in range(1, rounds + 1)} - {0, steps})


def balanced_random(num_rows: int, num_slices: int, seed: int) -> np.ndarray:
  """slice_N: row i of a seeded permutation goes to slice i mod E (sizes differ by <= 1)."""
  order = np.random.default_rng([0x5A11, seed]).permutation(num_rows)
  slice_N = np.empty(num_rows, np.int64)
  slice_N[order] = np.arange(num_rows) % num_slices
  return slice_N


def prefix_scorer(graphdef, num_slices: int):
  """A jitted (state, tokens_BxT, valid_BxT) -> loss_BxE: each sequence's mean next-token
  cross-entropy over its T tokens when it runs slice e, for every e (the model run E
  times; token t predicts token t + 1 where both are valid)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gating.training import losses  # pylint: disable=import-outside-toplevel

  @jax.jit
  def score(state, tokens_BxT, valid_BxT):
    learner, _ = nnx.merge(graphdef, state)
    B = tokens_BxT.shape[0]
    pair_BxT = jnp.concatenate([valid_BxT[:, :-1] & valid_BxT[:, 1:],
                                jnp.zeros((B, 1), bool)], axis=1).astype(jnp.float32)
    out = []
    for e in range(num_slices):
      logits = learner.model(tokens_BxT, valid_BxL=valid_BxT, deterministic=True,
                             slice_B=jnp.full((B,), e, jnp.int32)).logits_BxLxV
      ce_BxT, _ = losses.next_token_losses(logits, tokens_BxT)
      out.append((ce_BxT * pair_BxT).sum(axis=1) / jnp.maximum(pair_BxT.sum(axis=1), 1.0))
    return jnp.stack(out, axis=1)
  return score


def round_flops(score, state, num_rows: int, prefix_len: int, batch_size: int) -> float:
  """XLA's FLOP count of one reassignment round: the compiled scorer on a [B, P] batch
  times the batches that cover the training split."""
  import jax  # pylint: disable=import-outside-toplevel
  rows = jax.ShapeDtypeStruct((batch_size, prefix_len), np.int32)
  valid = jax.ShapeDtypeStruct((batch_size, prefix_len), np.bool_)
  cost = score.lower(state, rows, valid).compile().cost_analysis()
  return float(cost['flops']) * -(-num_rows // batch_size)


def losses_by_slice(score, state, dataset, length: int, batch_size: int) -> np.ndarray:
  """loss_NxE of `prefix_scorer` over every row of `dataset`, reading its first `length`
  tokens (the last batch filled up with repeats, one compiled shape)."""
  out = []
  for rows in data.eval_batches(dataset, batch_size):
    n = len(rows['tokens'])
    tokens, valid = rows['tokens'][:, :length], rows['valid'][:, :length]
    if n < batch_size:
      tokens, valid = (np.resize(a, (batch_size,) + a.shape[1:]) for a in (tokens, valid))
    out.append(np.asarray(score(state, tokens, valid))[:n])
  return np.concatenate(out)


def reassign_training_rows(splits, score, state, prefix_len: int, batch_size: int,
                           balance: float = 1.0):
  """(splits with the training rows moved to their balanced lowest-prefix-loss slices (at
  most ceil(balance N / E) rows a slice), the new slice_N)."""
  loss_NxE = losses_by_slice(score, state, splits.train, prefix_len, batch_size)
  slice_N = balanced_assign(-loss_NxE, balance)
  return splits._replace(train=_with_slices(splits.train, slice_N, slice_N)), slice_N


def route_by_prefix_loss(splits, score, state, prefix_len: int, batch_size: int,
                         whole: bool = False):
  """splits whose validation and test rows run the slice of lowest loss on their prefix;
  with `whole`, `slice_whole` is the slice of lowest loss over the whole sequence (for the
  agreement), else it is left as it was."""
  routed = {}
  for name in ('validation', 'test'):
    dataset = getattr(splits, name)
    prefix_N = np.argmin(losses_by_slice(score, state, dataset, prefix_len, batch_size), 1)
    dataset = _with_column(dataset, 'slice', prefix_N)
    if whole:
      length = splits.info.seq_len
      whole_N = np.argmin(losses_by_slice(score, state, dataset, length, batch_size), 1)
      dataset = _with_column(dataset, 'slice_whole', whole_N)
    routed[name] = dataset
  return splits._replace(**routed)


def initial_prefix_loss(splits, num_slices: int, seed: int, workdir: str | None,
                        start: str = 'random', balance: float = 1.0):
  """(train slice_N at the start, the store {'data', 'round_steps', 'train_slices'}): the
  run's stored rounds when `workdir` holds them (other data refused), else round 0: the
  balanced random assignment, or with start='cluster' the balanced k-means assignment of
  the training rows (`fit_cluster`, at most ceil(balance N / E) rows a slice)."""
  path = None if workdir is None else os.path.join(workdir, STORE)
  if path is not None and os.path.exists(path):
    store = _read_store(path, ('data', 'round_steps', 'train_slices'),
                        "prefix_loss assigner's rounds", splits.info)
    return store['train_slices'][0], store
  if start == 'cluster':
    fitted = fit_cluster(splits, num_slices, seed, balance)
    cols = splits.train.with_format('numpy')[:]
    f_NxJ = features(cols['tokens'], cols['valid'], fitted['idf'])[0]
    slice_N = balanced_assign(f_NxJ @ fitted['centroids'].T, balance).astype(np.int64)
  else:
    slice_N = balanced_random(len(splits.train), num_slices, seed)
  return slice_N, {'data': np.asarray(_fingerprint(splits.info)),
                   'round_steps': np.zeros((0,), np.int64), 'train_slices': slice_N[None]}


def at_step(splits, store, step: int):
  """splits whose training rows carry the stored assignment in force at `step` (the last
  round made at or before it)."""
  made = [i + 1 for i, s in enumerate(store['round_steps']) if s <= step]
  slice_N = store['train_slices'][made[-1] if made else 0]
  return splits._replace(train=_with_slices(splits.train, slice_N, slice_N))


def add_round(store, step: int, slice_N: np.ndarray):
  """The store with the round made after `step` (a round already stored at `step` is
  replaced: the assignment is a function of the checkpoint, so it is the same)."""
  keep = [i for i, s in enumerate(store['round_steps']) if s < step]
  return {'data': store['data'],
          'round_steps': np.asarray([store['round_steps'][i] for i in keep] + [step], np.int64),
          'train_slices': np.concatenate([store['train_slices'][[0] + [i + 1 for i in keep]],
                                          slice_N[None]])}
