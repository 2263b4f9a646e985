"""Slice assigners (gating.training.slices) and a gate='slices' run end to end: label and
balanced-k-means cluster assignment, prefix routing at test time, the stored centroids."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gating.training import loop as train
from gating.training import slices
from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig

SLICES = TrainConfig(
    model=ModelConfig(num_layers=1, features=32, num_heads=8, head_dim=4, gate='slices',
                      active_heads=3, shared_heads=2, path='gathered', noise=None,
                      mlp_groups=8, active_groups=3, shared_groups=2),
    data=DataConfig(num_tasks=4, input_len=6, num_digits=6, num_recall_tasks=1,
                    num_induction_tasks=1, num_train=256, num_validation=32, num_test=32),
    optim=OptimConfig(learning_rate=3e-3, warmup_steps=2),
    steps=8, batch_size=16, eval_batches=1, eval_every=8, checkpoint_every=4)   # 6 labels
CLUSTER = dataclasses.replace(SLICES, model=dataclasses.replace(
    SLICES.model, active_heads=4, active_groups=4, gate_options=(('assigner', 'cluster'),)))


def test_balanced_kmeans_is_balanced_deterministic_and_finds_planted_clusters():
  rng = np.random.default_rng(0)
  centers = np.eye(3, 16) * 5
  x = np.concatenate([centers[e] + rng.normal(size=(n, 16)) for e, n in
                      enumerate((50, 30, 20))])              # unequal planted clusters
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  c1, a1 = slices.balanced_kmeans(x, 3, seed=1)
  c2, a2 = slices.balanced_kmeans(x, 3, seed=1)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(c1, c2)
  assert np.bincount(a1, minlength=3).max() <= 34            # ceil(100 / 3)
  # balanced, and otherwise the planted structure: the 20 and 30 rows stay together
  for lo, hi in ((50, 80), (80, 100)):
    assert len(set(a1[lo:hi])) == 1
  with pytest.raises(ValueError, match='3 slices need at least 3 training rows'):
    slices.balanced_kmeans(x[:2], 3, seed=0)


def test_the_balance_option_bounds_each_cluster_and_at_e_is_plain_kmeans():
  rng = np.random.default_rng(0)
  centers = np.eye(3, 16) * 5
  planted = np.repeat(np.arange(3), (60, 25, 15))
  x = centers[planted] + rng.normal(size=(100, 16))
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  for balance, most in ((1.0, 34), (1.2, 40), (3.0, 100)):
    assignment = slices.balanced_kmeans(x, 3, seed=1, balance=balance)[1]
    assert np.bincount(assignment, minlength=3).max() <= most     # ceil(balance 100 / 3)
  # balance 1.2 cuts the 60 planted rows to 40; at balance E = 3 each row takes its
  # nearest centroid, and k-means finds the three planted clusters whole
  assert np.bincount(slices.balanced_kmeans(x, 3, seed=1, balance=1.2)[1]).max() == 40
  found = slices.balanced_kmeans(x, 3, seed=1, balance=3.0)[1]
  assert sorted(np.bincount(found)) == [15, 25, 60]
  for e in range(3):
    assert len(set(found[planted == e])) == 1
  # A centroid that no row chooses keeps its place (no mean of nothing): two rows, far
  # from the third seed once the first assignment has moved the other two.
  x = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
  centroids, found = slices.balanced_kmeans(x, 3, seed=0, balance=3.0)
  assert np.isfinite(centroids).all() and found.shape == (3,)
  sim = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
  np.testing.assert_array_equal(slices.balanced_assign(sim), [0, 0, 1])          # ceil(3/2)
  np.testing.assert_array_equal(slices.balanced_assign(sim, balance=2.0), [0, 0, 0])
  # Balance 1 with E not dividing N: floor or ceil rows each, none left short (four rows
  # all nearest centroid 0 and next nearest 1 once gave [2, 2, 0], not [2, 1, 1]).
  sim = np.array([[0.9, 0.5, 0.1]] * 4)
  assert sorted(np.bincount(slices.balanced_assign(sim), minlength=3)) == [1, 1, 2]
  rng = np.random.default_rng(0)
  for n, e in ((100, 6), (7, 3), (19217, 3)):
    sizes = np.bincount(slices.balanced_assign(rng.normal(size=(n, e))), minlength=e)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == n


def test_features_of_the_prefix_read_only_the_prefix():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (4, 20))
  valid = np.ones((4, 20), bool)
  changed = tokens.copy()
  changed[:, 6:] = rng.integers(0, 50, (4, 14))            # every token after P = 6
  prefix = slices.prefix_valid(valid, 6)
  f, idf = slices.features(tokens, valid)
  np.testing.assert_array_equal(slices.features(tokens, prefix, idf)[0],
                                slices.features(changed, prefix, idf)[0])
  assert not np.array_equal(slices.features(changed, valid, idf)[0], f)


@pytest.mark.slow
def test_a_label_run_trains_each_label_in_its_slice_and_reports_it(tmp_path):
  summary = train.train(SLICES, str(tmp_path / 'run'), progress=False)
  report = summary['slices']
  assert report['assigner'] == 'label' and report['num_slices'] == 6
  assert sum(report['train_rows_per_slice']) == 256
  assert report['test_prefix_agreement'] == 1.0              # the label is the oracle
  # every test sequence of label t ran the shared heads 0, 1 and slice t's head 2 + t
  names = json.load(open(tmp_path / 'run' / 'data_info.json'))['label_names']
  for t, name in enumerate(names):
    want = np.zeros(8)
    want[[0, 1, 2 + t]] = 1
    np.testing.assert_array_equal(summary['test']['per_label'][name]['usage'], [want])

  # The headroom oracle reads a slices model (its searched layer forced, the rest sliced).
  from experiments import headroom  # pylint: disable=import-outside-toplevel
  headroom.main(['--workdir', str(tmp_path / 'run'), '--k', '3', '--max-sequences', '24'])
  layer = json.load(open(tmp_path / 'run' / 'headroom.json'))['layers'][0]
  assert layer['router'] is not None and len(layer['by_label_subsets']) == 6
  check_the_slice_oracle(str(tmp_path / 'run'))


def check_the_slice_oracle(workdir):
  """The assignment oracle of a slices run against a brute force: every validation
  sequence run in each slice through the loop's own forward, the best slice chosen on the
  first, third, ... target and scored on the others."""
  from experiments import headroom as headroom_cli  # pylint: disable=import-outside-toplevel
  from gating.study import evaluation, headroom  # pylint: disable=import-outside-toplevel
  run = evaluation.load_run(workdir)
  got = headroom.headroom(run, layers=[], max_sequences=None)['slices']
  rows = run.splits.validation.with_format('numpy')[:]
  model = nnx.merge(run.graphdef, run.state)[0].model
  ce_ExBxL, weight_BxL = [], None
  for e in [*range(6), None]:
    batch = {k: jnp.asarray(rows[k]) for k in ('tokens', 'valid', 'target_mask', 'label')}
    batch['slice'] = jnp.asarray(rows['slice'] if e is None else np.full(32, e, np.int32))
    out = train.model_outputs(model, batch, deterministic=True)
    ce_ExBxL.append(np.asarray(out.ce * out.weight))
    weight_BxL = np.asarray(out.weight)
  own_BxL = ce_ExBxL.pop()
  ce_ExBxL = np.stack(ce_ExBxL)
  rank_BxL = np.cumsum(weight_BxL > 0, axis=1) - 1
  choose_BxL = (weight_BxL > 0) & (rank_BxL % 2 == 0)
  score_BxL = (weight_BxL > 0) & (rank_BxL % 2 == 1)
  choice_ExB, score_ExB = (ce_ExBxL * choose_BxL).sum(2), (ce_ExBxL * score_BxL).sum(2)
  tokens = score_BxL.sum()
  static = int(np.argmin(choice_ExB.sum(1)))
  best_B = np.argmin(choice_ExB, axis=0)
  assert got['num_slices'] == 6 and got['static_slice'] == static
  np.testing.assert_allclose(got['static'], score_ExB[static].sum() / tokens, rtol=1e-5)
  np.testing.assert_allclose(got['oracle'], score_ExB[best_B, np.arange(32)].sum() / tokens,
                             rtol=1e-5)
  np.testing.assert_allclose(got['router'], (own_BxL * score_BxL).sum() / tokens, rtol=1e-5)
  np.testing.assert_allclose(got['whole'], got['router'], rtol=1e-6)   # the label: both
  assert got['oracle_in_sample'] <= choice_ExB.sum(1).min() / choose_BxL.sum() + 1e-6
  assert got['router_sequences_per_slice'] == np.bincount(rows['label'], minlength=6).tolist()
  assert got['router_agreement'] == np.mean(best_B == rows['slice'])
  assert sorted(got['by_label_slices']) == sorted(run.splits.info.label_names)
  assert got['headroom'] == pytest.approx(got['static'] - got['oracle'])
  # The command line searches the assignment alone with --layers none (a model without
  # slices is refused that: tests/study/test_headroom.py).
  headroom_cli.main(['--workdir', workdir, '--layers', 'none', '--out', workdir + '/h.json'])
  saved = json.load(open(workdir + '/h.json'))
  assert saved['layers'] == [] and saved['slices']['num_slices'] == 6


def check_the_prefix_routes(workdir):
  """The headroom's by_prefix of a cluster run against a brute force: each validation
  sequence routed by its first P' tokens with the stored centroids, run in that slice
  through the loop's own forward, and scored only at the score positions t >= P' - 1."""
  from gating.study import evaluation, headroom  # pylint: disable=import-outside-toplevel
  run = evaluation.load_run(workdir)
  rows = run.splits.validation.with_format('numpy')[:]
  L, P = rows['tokens'].shape[1], run.splits.info.prompt_len
  prefixes = (2, P, P + 3, L - 1)     # the last is too long to leave a score position
  report = headroom.headroom(run, layers=[], max_sequences=None, prefixes=prefixes)
  got = report['slices']['by_prefix']
  assert [b['prefix'] for b in got] == [2, P, P + 3]
  # The run's own loss on the same positions, as every report gives it.
  assert [(a['prefix'], a['score_tokens'], a['loss']) for a in report['after_prefix']] == \
      [(b['prefix'], b['score_tokens'], pytest.approx(b['router'])) for b in got]
  model = nnx.merge(run.graphdef, run.state)[0].model
  fitted = dict(np.load(os.path.join(workdir, slices.STORE)))
  batch = {k: jnp.asarray(rows[k]) for k in ('tokens', 'valid', 'target_mask', 'label')}
  ce_BxL = lambda slice_B: np.asarray(train.model_outputs(
      model, {**batch, 'slice': jnp.asarray(slice_B)}, deterministic=True).ce)
  weight_BxL = np.asarray(train.model_outputs(model, {**batch, 'slice': rows['slice']},
                                              deterministic=True).weight) > 0
  score_BxL = weight_BxL & ((np.cumsum(weight_BxL, axis=1) - 1) % 2 == 1)
  for b in got:
    route_B = slices.route_by_prefix(rows['tokens'], rows['valid'], fitted, b['prefix'])
    after_BxL = score_BxL & (np.arange(L) >= b['prefix'] - 1)
    assert b['score_tokens'] == after_BxL.sum() > 0
    assert b['agreement'] == np.mean(route_B == rows['slice_whole'])
    if b['prefix'] == P:     # the run's own routing
      np.testing.assert_array_equal(route_B, rows['slice'])
    for key, slice_B in (('route', route_B), ('router', rows['slice']),
                         ('whole', rows['slice_whole'])):
      want = (ce_BxL(slice_B) * after_BxL).sum() / after_BxL.sum()
      assert b[key] == pytest.approx(want, rel=1e-5), key


@pytest.mark.slow
def test_a_cluster_run_stores_its_centroids_and_resumes_with_them(tmp_path):
  run = tmp_path / 'run'
  assert train.train(CLUSTER, str(run), progress=False, stop_after=4) is None
  stored = np.load(run / slices.STORE)
  splits = train.load_data(CLUSTER, str(run))
  assert np.bincount(splits.train['slice'], minlength=3).max() <= -(-256 // 3)   # balanced
  summary = train.train(CLUSTER, str(run), progress=False)
  again = np.load(run / slices.STORE)
  np.testing.assert_array_equal(stored['centroids'], again['centroids'])
  report = summary['slices']
  assert report['assigner'] == 'cluster' and report['num_slices'] == 3
  assert 0.0 <= report['test_prefix_agreement'] <= 1.0
  assert report['test_prefix_agreement'] == slices.agreement(splits.test)

  # Evaluation reads the stored assigner: at the run's own K only, both paths agree.
  from gating.study import evaluation  # pylint: disable=import-outside-toplevel
  report = evaluation.evaluate_run(evaluation.load_run(str(run)), split='test')
  by = {(r['path'], r['K']): r for r in report['results']}
  assert 'trained with: K=4 only' in by[('gathered', 8)]['skipped']
  assert abs(by[('gathered', 4)]['loss'] - summary['test']['loss']) < 1e-4
  assert abs(report['gap']['loss']) < 1e-4

  check_the_prefix_routes(str(run))

  # Centroids of other data are refused, naming the file.
  other = dataclasses.replace(CLUSTER, data=dataclasses.replace(CLUSTER.data, seed=7))
  with pytest.raises(ValueError, match=r"slices.npz: the cluster assigner's centroids were "
                                       r'fitted on other data'):
    train.load_data(other, str(run))


def test_the_cluster_assigner_applies_the_balance_option_to_the_training_rows():
  for balance in (1.0, 3.0):
    cfg = dataclasses.replace(CLUSTER, model=dataclasses.replace(
        CLUSTER.model, gate_options=(('assigner', 'cluster'), ('balance', balance))))
    splits, fitted = train.load_data_and_assigner(cfg)
    cols = splits.train.with_format('numpy')[:]
    f_NxJ = slices.features(cols['tokens'], cols['valid'], fitted['idf'])[0]
    if balance == 1.0:
      assert np.bincount(cols['slice'], minlength=3).max() <= -(-256 // 3)
    else:   # no limit: each training row at its nearest centroid, more than 86 in one
      np.testing.assert_array_equal(cols['slice'], slices.nearest(f_NxJ, fitted['centroids']))
      assert np.bincount(cols['slice'], minlength=3).max() > -(-256 // 3)


@pytest.mark.parametrize('cfg, message', [
    (dataclasses.replace(SLICES, model=dataclasses.replace(
        SLICES.model, active_heads=4, active_groups=4)),
     r"assigner 'label' gives each label its slice: the data has 6 label\(s\) .* the "
     r'model 3 slices'),
])
def test_an_assignment_the_data_cannot_give_is_refused_before_any_folder(tmp_path, cfg,
                                                                         message):
  with pytest.raises(ValueError, match=message):
    train.train(cfg, str(tmp_path / 'run'), progress=False)
  assert not os.path.exists(tmp_path / 'run')


PREFIX_LOSS = dataclasses.replace(CLUSTER, model=dataclasses.replace(
    CLUSTER.model, gate_options=(('assigner', 'prefix_loss'), ('rounds', 2))))


def test_prefix_loss_rounds_and_the_random_start():
  assert slices.round_steps(8, 2) == [2, 5] and slices.round_steps(12, 3) == [3, 6, 9]
  a = slices.balanced_random(100, 3, seed=0)
  np.testing.assert_array_equal(a, slices.balanced_random(100, 3, seed=0))
  assert sorted(np.bincount(a).tolist()) == [33, 33, 34]
  assert not np.array_equal(a, slices.balanced_random(100, 3, seed=1))


def test_prefix_loss_can_start_from_the_cluster_assigners_balanced_kmeans(tmp_path):
  """start=cluster: the first training assignment is the cluster assigner's (same seed and
  balance), stored as round 0 and read back on resume; start is prefix_loss's alone, and
  a bad one is refused with the config."""
  for balance in (1.0, 3.0):
    options = (('assigner', 'prefix_loss'), ('start', 'cluster'), ('balance', balance))
    cfg = dataclasses.replace(PREFIX_LOSS, model=dataclasses.replace(
        PREFIX_LOSS.model, gate_options=options))
    cluster_cfg = dataclasses.replace(CLUSTER, model=dataclasses.replace(
        CLUSTER.model, gate_options=(('assigner', 'cluster'), ('balance', balance))))
    splits, store = train.load_data_and_assigner(cfg)
    want = train.load_data_and_assigner(cluster_cfg)[0].train.with_format('numpy')['slice']
    np.testing.assert_array_equal(splits.train.with_format('numpy')['slice'], want)
    np.testing.assert_array_equal(store['train_slices'][0], want)
    assert not np.array_equal(want, slices.balanced_random(256, 3, PREFIX_LOSS.seed))
  slices.save(str(tmp_path), dict(store, train_slices=store['train_slices'][:, ::-1]))
  resumed, _ = slices.initial_prefix_loss(splits, 3, PREFIX_LOSS.seed, str(tmp_path),
                                          'cluster', 3.0)
  np.testing.assert_array_equal(resumed, store['train_slices'][0, ::-1])   # the stored one
  for options, message in (((('assigner', 'cluster'), ('start', 'cluster')),
                            r"option start=cluster is the prefix_loss assigner's first "
                            r"assignment; assigner 'cluster' has none"),
                           ((('assigner', 'prefix_loss'), ('start', 'label')),
                            r"option start \(prefix_loss's first assignment\) must be one "
                            r"of \('random', 'cluster'\), got 'label'")):
    with pytest.raises(ValueError, match='model.gate_options: .*' + message):  # the config
      dataclasses.replace(PREFIX_LOSS.model, gate_options=options)


@pytest.mark.slow
def test_a_prefix_loss_run_reassigns_resumes_exactly_and_routes_by_the_prefix(tmp_path):
  whole = train.train(PREFIX_LOSS, str(tmp_path / 'whole'), progress=False)
  store = np.load(tmp_path / 'whole' / slices.STORE)
  np.testing.assert_array_equal(store['round_steps'], [2, 5])
  assert store['train_slices'].shape == (3, 256)          # the random start and 2 rounds
  assert not np.array_equal(store['train_slices'][0], store['train_slices'][1])
  for slice_N in store['train_slices']:
    assert np.bincount(slice_N, minlength=3).max() <= -(-256 // 3)    # balanced
  report = whole['slices']
  assert report['assigner'] == 'prefix_loss' and 0 <= report['test_prefix_agreement'] <= 1
  assert report['rounds_at_steps'] == [2, 5]
  # the rounds' scoring (3 slices x 16 batches of [16, P] per round) is counted beside
  assert whole['assignment_flops'] > 0
  assert whole['train_flops_with_assignment'] == whole['train_flops'] + whole['assignment_flops']

  # Stopped between the rounds, it resumes on the stored round and ends the same.
  assert train.train(PREFIX_LOSS, str(tmp_path / 'split'), progress=False,
                     stop_after=4) is None
  split = train.train(PREFIX_LOSS, str(tmp_path / 'split'), progress=False)
  assert split['test']['loss'] == whole['test']['loss']
  np.testing.assert_array_equal(np.load(tmp_path / 'split' / slices.STORE)['train_slices'],
                                store['train_slices'])

  # Test rows are routed by their prefix alone: later tokens do not move the choice.
  from gating.study import evaluation  # pylint: disable=import-outside-toplevel
  run = evaluation.load_run(str(tmp_path / 'whole'))
  score = slices.prefix_scorer(run.graphdef, 3)
  P = run.splits.info.prompt_len
  cols = run.splits.test.with_format('numpy')[:]
  changed = dict(cols, tokens=np.concatenate(
      [cols['tokens'][:, :P], np.roll(cols['tokens'][:, P:], 1, axis=0)], axis=1))
  import datasets  # pylint: disable=import-outside-toplevel
  before = slices.losses_by_slice(score, run.state, run.splits.test, P, 16)
  after = slices.losses_by_slice(score, run.state, datasets.Dataset.from_dict(
      changed, features=run.splits.test.features).with_format('numpy'), P, 16)
  np.testing.assert_array_equal(before, after)
  np.testing.assert_array_equal(np.argmin(before, 1), cols['slice'])

  # Extended past its schedule, it reports and counts the rounds that ran: the old
  # schedule's (2, 5), then the new one's after step 8 (it reported [4, 8], 2 rounds).
  extended = train.train(dataclasses.replace(PREFIX_LOSS, steps=12), str(tmp_path / 'whole'),
                         progress=False, extend_schedule=True)
  assert extended['slices']['rounds_at_steps'] == [2, 5, 8]
  np.testing.assert_array_equal(np.load(tmp_path / 'whole' / slices.STORE)['round_steps'],
                                [2, 5, 8])
  assert extended['assignment_flops'] == pytest.approx(1.5 * whole['assignment_flops'])
