"""Router fitting as a run: the recipe chain elastic -> labels -> router -> eval, resume,
the frozen model, and bad input."""

import dataclasses
import json
import os

import re

import numpy as np
import pytest
from flax import nnx

from experiments import eval as eval_cli
from experiments import fit_router
from gating.study import results
from gating.training import checkpoint, router_fit
from gating.training import loop as train
from gating.training.config import TrainConfig, override
from tests.training.test_train import TINY, metrics

ELASTIC = dataclasses.replace(
    TINY, steps=12, eval_every=12, checkpoint_every=12,
    model=dataclasses.replace(TINY.model, gate='dense', active_heads=None, noise=None,
                              eval_path='masked'),
    loss=dataclasses.replace(TINY.loss, elastic_ks=(1, 2), distill_weight=0.5))


@pytest.fixture(scope='module')
def elastic_run(trained_run):
  """A finished elastic run (trained once per session, shared: the tests only read it)."""
  return str(trained_run(ELASTIC))


def model_params(cfg, workdir):
  """{path: array} of the model parameters in workdir's latest checkpoint."""
  graphdef, state = train.create(cfg, train.load_data(cfg).info)
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'))
  state = checkpoint.restore(mngr, mngr.latest_step(), state)
  mngr.close()
  learner, _ = nnx.merge(graphdef, state)
  return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(learner.model, nnx.Param))}


@pytest.mark.slow
def test_the_chain_elastic_labels_router_eval(elastic_run, tmp_path, capsys):
  """The recipe end to end, as a user runs it: fit, evaluate, and a rerun changes nothing."""
  out = str(tmp_path / 'router')
  fit_router.main(['--from', elastic_run, '--workdir', out, '--k', '2', '--steps', '8',
                   '--no-progress', '--no-plots'])
  saved = json.load(open(os.path.join(out, 'config.json')))
  assert saved['model']['gate'] == 'topk' and saved['model']['active_heads'] == 2
  assert saved['loss']['router_labels'] == 'grad_x_act' and saved['init_from'] == elastic_run
  lines = metrics(out)
  assert [r['step'] for r in lines] == list(range(1, 9))
  assert all(0.0 <= r['router/recall'] <= 1.0 for r in lines)
  # Only the routers moved: every other parameter is the elastic run's, exactly.
  fitted = model_params(router_fit.fit_config(ELASTIC, k=2, init_from=elastic_run), out)
  source = model_params(ELASTIC, elastic_run)
  routers = [p for p in fitted if 'router' in map(str, p)]
  assert routers and set(fitted) - set(routers) == set(source)
  for p, v in source.items():
    np.testing.assert_array_equal(v, fitted[p])

  eval_cli.main(['--workdir', out, '--paths', 'gathered', '--k', '1,2', '--split',
                 'validation'])
  # The sweep's results row: the recipe named, validation columns, every FLOP counted.
  row = results.point_row(out, 'fit', 'validation')
  assert row['status'] == 'done' and row['rule'] == 'elastic + router fit (grad_x_act, bce)'
  assert row['validation_loss'] > 0 and 'test_loss' not in row
  elastic_flops = json.load(open(os.path.join(elastic_run, 'summary.json')))['train_flops']
  fit_flops = json.load(open(os.path.join(out, 'summary.json')))['train_flops']
  assert row['train_flops'] == elastic_flops + fit_flops and fit_flops > 0
  with pytest.raises(ValueError, match='scores the validation split'):
    results.point_row(out, 'fit', 'test')
  before = open(os.path.join(out, 'metrics.jsonl')).read()
  fit_router.main(['--from', elastic_run, '--workdir', out, '--k', '2', '--steps', '8',
                   '--no-progress', '--no-plots'])
  assert 'finished' in capsys.readouterr().out
  assert open(os.path.join(out, 'metrics.jsonl')).read() == before


@pytest.mark.parametrize('argv, match', [
    (['--k', '9'], r'K=9 must be in \[1, num_heads=4\]'),
    (['--k', '2', '--shared-heads', '2'], 'shared_heads=2 must be < active_heads=2'),
    (['--k', '2', '--shared-groups', '1'], 'model.shared_groups: 1 needs model.mlp_groups'),
    (['--k', '2', '--shared-heads', '-1'], 'shared_heads must be an int >= 0'),
    (['--k', '2', '--labels', 'gradient'], 'labels must be one of'),
    (['--k', '2', '--loss', 'mse'], 'loss must be one of'),
    (['--k', '2', '--router', 'average'], r"model.router: must be one of \('mean', "),
    (['--k', '2', '--groups', '2'], 'groups: the source has no MLP channel groups'),
    (['--k', '2', '--steps', '0'], 'steps: a fit needs at least 1 step, got 0'),
])
def test_bad_flags_are_one_error_line(elastic_run, tmp_path, argv, match, capsys):
  out = tmp_path / 'router'
  with pytest.raises(SystemExit) as e:
    fit_router.main(['--from', elastic_run, '--workdir', str(out), *argv])
  assert str(e.value).startswith('error: ')
  assert re.search(match, str(e.value))
  assert not out.exists()


def test_a_source_without_checkpoint_or_of_another_shape_is_refused(elastic_run, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(SystemExit, match='error: --from .*not a run folder'):
    fit_router.main(['--from', str(empty), '--workdir', str(tmp_path / 'a'), '--k', '2'])
  unfinished = tmp_path / 'unfinished'
  unfinished.mkdir()
  for name in ('config.json', 'data_info.json'):
    (unfinished / name).write_text(open(os.path.join(elastic_run, name)).read())
  with pytest.raises(SystemExit, match='error: --from .*no checkpoint'):
    fit_router.main(['--from', str(unfinished), '--workdir', str(tmp_path / 'b'), '--k', '2'])
  # A run of another shape: the fit's config asks for wider layers than the source has.
  with pytest.raises(SystemExit, match='error: init_from=.* is another model'):
    fit_router.main(['--from', elastic_run, '--workdir', str(tmp_path / 'c'), '--k', '2',
                     '--set', 'model.features=48', '--no-progress'])
  assert not any((tmp_path / name).exists() for name in 'abc')
  assert not os.path.exists(os.path.join(elastic_run, 'checkpoints_quarantine'))


def test_router_fitting_needs_a_source_and_a_dynamic_router():
  with pytest.raises(ValueError, match='router fitting needs init_from'):
    override(TrainConfig(), ['loss.router_labels=grad_x_act'])
  with pytest.raises(ValueError, match='needs a rule with a budget K and a router it trains'):
    override(TrainConfig(), ['loss.router_labels=grad_x_act', 'init_from=x',
                             'model.gate=static', 'model.active_heads=none',
                             'model.eval_path=masked'])
  with pytest.raises(ValueError, match='turn elastic_ks and the sparsity terms off'):
    override(TrainConfig(), ['loss.router_labels=ablation', 'loss.l0_weight=0.1'])
