"""train_and_evaluate and the CLI: exact resume, checkpoints, bad input."""
import hashlib
import os
import subprocess

import jax
import numpy as np
import pytest

from cli_runner import python, run_commands
from conftest import (REPO, TINY_DATASET, restored_state, smoke_config,
                      straight_and_resumed_runs)
from moco_jax import train
from moco_jax.runtime import checkpointing
from moco_jax.runtime.metric_writer import read_metrics


def test_resume_is_exact(tiny_data_dir, tmp_path, monkeypatch):
  config = smoke_config(tiny_data_dir)
  straight, interrupted = straight_and_resumed_runs(config, tmp_path, monkeypatch)

  want = restored_state(config, straight, 4)
  got = restored_state(config, interrupted, 4)
  assert int(got.step) == 4
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               want, got)
  logged = lambda workdir: {e['step']: e['loss'] for e in read_metrics(workdir)}
  assert logged(straight)[4] == pytest.approx(logged(interrupted)[4], rel=1e-6)


def cli_command(workdir, data_dir, *overrides):
  """The pretraining CLI on the smoke config and tiny dataset, one device."""
  command = [*python(), '-m', 'moco_jax.main', '--config=configs/smoke.py',
             f'--workdir={workdir}', f'--config.data.dataset={TINY_DATASET}',
             f'--config.data.data_dir={data_dir}', *overrides]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return dict(args=command, cwd=REPO, env=env, text=True)


def run_cli(workdir, data_dir, *overrides):
  return subprocess.run(**cli_command(workdir, data_dir, *overrides),
                        capture_output=True, timeout=300)


def tree_digest(directory):
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      path = os.path.join(root, name)
      digest.update(path.encode())
      with open(path, 'rb') as f:
        digest.update(f.read())
  return digest.hexdigest()


@pytest.fixture(scope='module')
def cli_workdir(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('cli'))
  result = run_cli(workdir, tiny_data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_cli_smoke_writes_metrics_and_checkpoints_then_continues(cli_workdir, tiny_data_dir):
  events = read_metrics(cli_workdir)
  assert [e['step'] for e in events] == [2, 4]
  for key in ('loss', 'instance_top1', 'instance_top5', 'lr', 'queue_ptr', 'images_per_sec'):
    assert key in events[-1]
  assert np.isfinite(events[-1]['loss'])
  assert checkpointing.Checkpointer(cli_workdir).all_steps() == [2, 4]
  assert os.listdir(os.path.join(cli_workdir, 'tensorboard'))

  result = run_cli(cli_workdir, tiny_data_dir, '--config.train.num_steps=6')
  assert result.returncode == 0, result.stderr[-3000:]
  assert [e['step'] for e in read_metrics(cli_workdir)] == [2, 4, 6]  # no step redone
  assert checkpointing.Checkpointer(cli_workdir).all_steps() == [4, 6]


BAD_INPUTS = [
    (['--config.moco.queue_size=40'], 'moco.queue_size=40'),
    (['--config.moco.bn_groups=3'], 'moco.bn_groups=3 with 1 device and train.batch_size=16'),
    (['--config.moco.bn_groups=1'], 'moco.shuffle_bn=True with moco.bn_groups=1'),
    (['--config.model.arch=resnet42'], "model.arch='resnet42'"),
    (['--config.data.dataset=no_such_dataset'], "'no_such_dataset'"),
    (['--config.data.data_dir=/nonexistent/tfds'], "'/nonexistent/tfds' does not exist"),
    (['--config.moco.queu_size=4096'], 'Did you mean "queue_size"'),
    (['--config.train.batch_size=many'], "--config.train.batch_size=many"),
]


@pytest.fixture(scope='module')
def bad_input_results(cli_workdir, tiny_data_dir):
  """Each BAD_INPUTS command line run on the finished CLI run, as `python -m`
  runs it (forked from a server that has imported the package:
  tests/cli_runner.py); the run's digest before and after them all."""
  before = tree_digest(cli_workdir)
  command = cli_command(cli_workdir, tiny_data_dir)
  module_and_args = command['args'][command['args'].index('-m') + 1:]
  done, import_stderr = run_commands(
      [module_and_args + overrides for overrides, _ in BAD_INPUTS], command['env'])
  assert import_stderr.strip() == '', import_stderr[-2000:]
  return before, done, tree_digest(cli_workdir)


@pytest.mark.parametrize('index', range(len(BAD_INPUTS)), ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_clear_line_and_touches_nothing(bad_input_results, index):
  before, done, after = bad_input_results
  result, message = done[index], BAD_INPUTS[index][1]
  assert result.returncode == 2, result.stderr[-2000:]
  error_lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert after == before


def test_knn_monitor_runs_at_start_and_each_epoch(tiny_data_dir, tmp_path):
  config = smoke_config(tiny_data_dir, **{'eval.knn_every': 1.0, 'eval.knn_at_start': True,
                                          'eval.batch_size': 16, 'eval.knn_k': 10})
  train.train_and_evaluate(config, str(tmp_path))
  knn = [e for e in read_metrics(str(tmp_path)) if 'knn_top1' in e]
  assert [e['step'] for e in knn] == [0, 4] and all(0 <= e['knn_top1'] <= 100 for e in knn)
