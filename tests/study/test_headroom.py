import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from experiments import headroom as headroom_script
from gating.study import evaluation, headroom
from gating.training import loop as train

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'fixtures',
                       'run_format1')


def test_positions_alternate_between_choice_and_score_and_never_overlap():
  weight = np.array([[0, 1, 1, 1, 0, 1], [1, 0, 0, 1, 1, 0]], float)
  choice, score = headroom.split_positions(weight)
  np.testing.assert_array_equal(choice, [[0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0]])
  np.testing.assert_array_equal(score, [[0, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0]])
  assert not (choice & score).any()


def known_losses(num_subsets=4, batch=6, length=8, seed=0):
  """Sequence b's best subset is b % num_subsets (loss 0.1); every other subset costs 1.
  Subset 0 is also decent everywhere (0.5), so it is the best static subset."""
  rng = np.random.default_rng(seed)
  ce = np.ones((num_subsets, batch, length)) + 0.01 * rng.random((num_subsets, batch, length))
  ce[0] = 0.5
  for b in range(batch):
    ce[b % num_subsets, b] = 0.1
  return ce


def test_the_oracle_finds_the_best_subset_known_by_construction():
  ce = known_losses()
  weight = np.ones(ce.shape[1:])
  choice, score = headroom.split_positions(weight)
  dense = np.full(ce.shape[1:], 0.05)
  label = np.arange(6) % 2          # two labels: sequences 0, 2, 4 and 1, 3, 5
  out = headroom.oracle_from_losses(ce, choice, score, router_ce_BxL=ce[0],
                                    dense_ce_BxL=dense, label_B=label)
  assert out['dense'] == pytest.approx(0.05)
  assert out['oracle_closes'] == pytest.approx((out['static'] - 0.1) / (out['static'] - 0.05))
  # label 0 (b = 0, 2, 4) keeps subset 0 (0.1, 0.5, 0.1); label 1 (b = 1, 3, 5) takes
  # subset 1 (0.1, ~1, 0.1 beats 0.5 x 3): better than static, short of the oracle
  assert out['by_label'] == pytest.approx((0.1 + 0.5 + 0.1 + 0.1 + 0.1) / 6 + 1.0 / 6, abs=0.01)
  assert out['oracle'] < out['by_label'] < out['static']
  np.testing.assert_array_equal(out['oracle_subsets_B'], np.arange(6) % 4)
  assert out['static_subset'] == 0
  assert out['oracle'] == pytest.approx(0.1) and out['static'] == pytest.approx(0.5 * 4 / 6 + 0.1 * 2 / 6)
  assert out['router'] == pytest.approx(out['static']) and out['headroom'] > 0
  assert out['captured'] == pytest.approx(0.0)   # the router is the static subset


def test_the_oracle_never_scores_on_its_choice_positions():
  ce = known_losses()
  weight = np.ones(ce.shape[1:])
  choice, score = headroom.split_positions(weight)
  base = headroom.oracle_from_losses(ce, choice, score)
  # Sabotage the best subsets on the score positions only: the choice cannot see it, and
  # the reported oracle loss must show the damage in full.
  spoiled = ce.copy()
  for b in range(ce.shape[1]):
    spoiled[b % 4, b][score[b]] = 9.0
  out = headroom.oracle_from_losses(spoiled, choice, score)
  np.testing.assert_array_equal(out['oracle_subsets_B'], base['oracle_subsets_B'])
  assert out['oracle'] == pytest.approx(9.0)
  with pytest.raises(ValueError, match='disjoint'):
    headroom.oracle_from_losses(ce, choice, choice)


def test_a_sequence_with_nothing_to_choose_by_gets_the_static_subset():
  """Sequence 4 has no scored position (a window shorter than the prefix), sequence 5 one
  (a choice position, no score position): with nothing to choose by, each takes the
  static subset (1 here), not subset 0, which argmin of an empty sum would give."""
  ce = np.roll(known_losses(), 1, axis=0)     # subset s is known_losses' s - 1: static 1
  weight = np.ones(ce.shape[1:])
  weight[4] = 0
  weight[5, 1:] = 0
  ce = ce * weight
  choice, score = headroom.split_positions(weight)
  out = headroom.oracle_from_losses(ce, choice, score)
  assert out['static_subset'] == 1
  np.testing.assert_array_equal(out['chooses_B'], [True] * 4 + [False, True])
  np.testing.assert_array_equal(out['oracle_subsets_B'], [1, 2, 3, 0, 1, 2])
  # split half: chosen on the score positions (sequence 5 has none: static), scored on
  # the choice positions
  choice_S_B, score_S_B = (ce * choice).sum(2), (ce * score).sum(2)
  picks = [int(np.argmin(score_S_B[:, b])) if score[b].any() else 1 for b in range(6)]
  swapped = sum(choice_S_B[p, b] for b, p in enumerate(picks)) / choice.sum()
  assert out['oracle_split_half'] == pytest.approx((out['oracle'] + swapped) / 2)


@pytest.mark.slow
def test_headroom_of_a_run_and_its_bad_inputs(tmp_path):
  shutil.copytree(FIXTURE, tmp_path / 'run')
  headroom_script.main(['--workdir', str(tmp_path / 'run'), '--max-sequences', '16'])
  report = json.load(open(tmp_path / 'run' / 'headroom.json'))
  (layer,) = report['layers']
  assert layer['K'] == 2 and layer['num_subsets'] == 6 and report['sequences'] == 16
  assert sum(report['sequences_per_label'].values()) == 16
  assert layer['headroom'] == pytest.approx(layer['static'] - layer['oracle'])
  assert {'dense', 'by_label', 'router', 'oracle_closes', 'captured'} <= set(layer)
  assert 0.0 <= layer['router_recall'] <= 1.0
  assert layer['score_tokens'] > 0 and layer['choice_tokens'] > 0
  with pytest.raises(SystemExit, match='error: layer 3 does not exist'):
    headroom_script.main(['--workdir', str(tmp_path / 'run'), '--layers', '3'])
  with pytest.raises(SystemExit, match="error: .*no layer to search, and the model has no "
                                       "slices"):
    headroom_script.main(['--workdir', str(tmp_path / 'run'), '--layers', 'none'])
  with pytest.raises(SystemExit, match='error: max_sequences=-2 must be at least 1'):
    headroom_script.main(['--workdir', str(tmp_path / 'run'), '--max-sequences', '-2'])
  with pytest.raises(SystemExit, match=r"error: --k ',': expected at least one integer"):
    headroom_script.main(['--workdir', str(tmp_path / 'run'), '--k', ','])
  assert json.load(open(tmp_path / 'run' / 'headroom.json')) == report   # kept as it was
  run = evaluation.load_run(str(tmp_path / 'run'))
  dense = dataclasses.replace(run.config, model=dataclasses.replace(
      run.config.model, gate='dense', active_heads=None))
  graphdef, state = train.create(dense, run.splits.info)
  dense_run = run._replace(config=dense, graphdef=graphdef, state=state)
  with pytest.raises(ValueError, match="no budget K .*'dense'.*--k 2,4"):
    headroom.headroom(dense_run)
  report = headroom.headroom(dense_run, ks=[1, 3], max_sequences=16)
  assert [r['K'] for r in report['layers']] == [1, 3]
  assert [r['num_subsets'] for r in report['layers']] == [4, 4]
  assert 'router' not in report['layers'][0]     # a dense run has no router to compare
  assert 'router_recall' not in report['layers'][0]
  with pytest.raises(ValueError, match=r'K=4 must be in \[1, H\)'):
    headroom.headroom(dense_run, ks=[4])


def test_router_recall_of_the_oracle_subsets():
  subsets = [(0, 1), (0, 2), (2, 3)]
  router_open_BxH = np.array([[1, 1, 0, 0], [1, 0, 0, 1], [0, 0, 1, 1]], bool)
  # sequence 0: both heads of (0, 1); 1: head 0 of (0, 2); 2: none of (0, 1)
  assert headroom.oracle_recall(router_open_BxH, subsets, np.array([0, 1, 0])) == pytest.approx(3 / 6)


def test_with_no_real_difference_in_sample_fits_the_noise_and_held_out_does_not():
  """Every subset is as good as every other, up to noise: the in-sample oracle finds a
  spurious gain, the held-out one none (its interval covers 0), and with few choice
  positions per sequence the report warns."""
  rng = np.random.default_rng(0)
  ce = 1.0 + 0.3 * rng.standard_normal((6, 200, 8))
  weight = np.ones(ce.shape[1:])
  choice, score = headroom.split_positions(weight)
  out = headroom.oracle_from_losses(ce, choice, score)
  assert out['headroom_in_sample'] > 0.1                    # fits the noise
  low, high = out['headroom_ci95']
  assert low < 0.0 < high and abs(out['headroom']) < 0.05
  assert out['oracle_in_sample'] < out['oracle']
  assert out['choice_positions'] == {'min': 4, 'median': 4.0} and 'warning' in out
  # The split half: the held-out figure averaged with the one whose halves swap roles.
  swapped = headroom.oracle_from_losses(ce, score, choice)
  assert out['oracle_split_half'] == pytest.approx((out['oracle'] + swapped['oracle']) / 2)
