"""--backend ray: the tiny sweep on a local Ray cluster, and its bad input."""

import csv
import shutil
import socket
import sys
import time

import pytest

from experiments import sweep as sweep_script

TIMING = ('train_wall_s', 'eval_wall_s')


def _rows(out):
  with open(out / 'results.csv', newline='') as f:
    return {row['point']: {k: v for k, v in row.items() if k not in TIMING}
            for row in csv.DictReader(f)}


@pytest.mark.slow
def test_tiny_sweep_on_ray_matches_local_and_skips_a_finished_point(tmp_path, capsys,
                                                                   finished_sweep):
  # Resuming a stopped point is `sweep.run_point`'s, the Ray task itself, and is tested
  # on the local backend (test_sweep); here Ray runs it, skipping the finished points.
  local, on_ray = finished_sweep('tiny'), tmp_path / 'ray'
  # The warm start and the dense point are the local sweep's, finished: Ray skips them
  # and trains the top-k point from the warm start. One trained point, not two: each is a
  # train and an eval process, the most expensive part of this test (that Ray runs
  # points at once, and a point after its warm start, is the next test's).
  for name in ('warm_s0', 'dense_s0'):
    shutil.copytree(local / name, on_ray / name)
  shutil.copy(local / 'sweep.json', on_ray)
  sweep_script.main(['tiny', '--out', str(on_ray), '--backend', 'ray'])
  printed = capsys.readouterr().out
  assert 'on Ray (a local cluster)' in printed and printed.count('skipped') == 2
  rows = _rows(on_ray)
  assert set(rows) == {'dense_s0', 'topk_k2_s0'}
  assert all(row['status'] == 'done' for row in rows.values())
  assert rows == _rows(local)
  for name in ('sweep.json', 'results.md', 'plots/pareto.png'):
    assert (on_ray / name).exists()


def test_a_task_adds_the_drivers_xla_flags_to_the_workers_own():
  from gating.study import ray_backend
  extra = {'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false', 'PYTHONPATH': '/repo'}
  env = ray_backend.task_env({'XLA_FLAGS': '--mine', 'PYTHONPATH': '/x', 'HOME': '/h'}, extra)
  assert env == {'XLA_FLAGS': '--mine --xla_cpu_multi_thread_eigen=false',
                 'PYTHONPATH': '/repo', 'HOME': '/h'}
  assert ray_backend.task_env({'HOME': '/h'}, extra) == {**extra, 'HOME': '/h'}
  assert ray_backend.task_env({'XLA_FLAGS': '--mine'}, {}) == {'XLA_FLAGS': '--mine'}


def test_an_unreachable_address_fails_in_seconds_naming_it(tmp_path):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]   # nothing listens here once the socket is closed
  out = tmp_path / 'x'
  start = time.time()
  with pytest.raises(SystemExit, match=f'error: cannot reach the Ray cluster at '
                                       f'127.0.0.1:{port}'):
    sweep_script.main(['tiny', '--out', str(out), '--backend', 'ray', '--address',
                       f'127.0.0.1:{port}'])
  assert time.time() - start < 10
  assert not out.exists()


def test_ray_missing_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'ray', None)   # `import ray` raises ImportError
  with pytest.raises(SystemExit, match=r'error: --backend ray needs Ray, which is not '
                                       r'installed: pip install -e "\.\[cluster\]"'):
    sweep_script.main(['tiny', '--out', str(tmp_path / 'x'), '--backend', 'ray'])
  assert not (tmp_path / 'x').exists()


def test_flags_of_the_other_backend_are_refused(tmp_path):
  with pytest.raises(SystemExit, match='error: --parallel is for the local backend'):
    sweep_script.main(['tiny', '--out', str(tmp_path), '--backend', 'ray', '--parallel', '2'])
  with pytest.raises(SystemExit, match='error: --address is for --backend ray'):
    sweep_script.main(['tiny', '--out', str(tmp_path), '--address', '127.0.0.1:6379'])


@pytest.mark.slow
def test_on_ray_a_point_waits_for_its_warm_start_and_skips_a_failed_one(tmp_path):
  """Two CPUs: the point that starts from the warm start waits for it, and the point that
  needs none runs on Ray at the same time as the warm start."""
  from gating.study import ray_backend
  from tests.study.test_sweep import _stand_in, _times
  ray_backend.connect(None, num_cpus=2)
  try:
    run = lambda points: ray_backend.run_points(points, extra_env={}, report=lambda line: None)
    fine = tmp_path / 'fine'
    outcomes = run([_stand_in(fine, 'warm_s0', sleep=3.0),
                    _stand_in(fine, 'routed_s0', after='warm_s0'),
                    _stand_in(fine, 'dense_s0', sleep=3.0)])
    assert [o.status for o in outcomes] == ['done', 'done', 'done']
    warm_start, warm_end = _times(fine, 'warm_s0')
    assert _times(fine, 'routed_s0')[0] >= warm_end
    dense_start, dense_end = _times(fine, 'dense_s0')
    assert dense_start < warm_end and warm_start < dense_end    # at the same time
    broken = tmp_path / 'broken'
    outcomes = run([_stand_in(broken, 'warm_s0', 3),
                    _stand_in(broken, 'routed_s0', after='warm_s0')])
    assert [o.status for o in outcomes] == ['failed', 'failed']
    assert outcomes[1].message == 'not run: warm_s0, which it starts from, did not finish'
    assert not (broken / 'routed_s0').exists()
  finally:
    ray_backend.shutdown()
