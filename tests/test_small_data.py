"""Small data: kNN's k is clamped to the bank with a note; a diverging
linear evaluation stops with exit 3, or warns while its loss is still finite
(the K >= dataset warning is shown by test_health's forced-collapse run)."""
import os

import numpy as np

from conftest import TINY_DATASET, smoke_config
from moco_jax.evaluation import knn
from moco_jax.runtime import health
from moco_jax.runtime.mesh import make_mesh
from test_knn import backbone_variables
from test_lincls import run_module


def test_knn_k_larger_than_the_bank_is_clamped_with_a_note(tiny_data_dir, capsys):
  mesh = make_mesh()
  params, batch_stats = backbone_variables(smoke_config(tiny_data_dir))
  config = smoke_config(tiny_data_dir, **{'eval.batch_size': 16, 'eval.knn_k': 200})
  evaluator = knn.KnnEvaluator(config, mesh)
  notes = [l for l in capsys.readouterr().out.splitlines() if l.startswith('note:')]
  assert notes == ['note: eval.knn_k=200 is more than the 64 images of the kNN bank '
                   '(data.train_split); using k=64']
  assert evaluator.k == 64
  clamped = evaluator.predict(params, batch_stats)
  # Asking for exactly the bank gives the same predictions, without a note.
  exact = knn.KnnEvaluator(
      smoke_config(tiny_data_dir, **{'eval.batch_size': 16, 'eval.knn_k': 64}), mesh)
  assert 'note:' not in capsys.readouterr().out
  np.testing.assert_array_equal(clamped[1], exact.predict(params, batch_stats)[1])


def test_diverging_linear_evaluation_stops_with_exit_3(smoke_pretrain_dir, tiny_data_dir,
                                                        tmp_path):
  result = run_module(
      'moco_jax.lincls', '--config=configs/lincls_cifar10.py', f'--workdir={tmp_path}',
      f'--config.pretrained={smoke_pretrain_dir}',
      f'--config.data.dataset={TINY_DATASET}', f'--config.data.data_dir={tiny_data_dir}',
      '--config.data.image_size=16', '--config.train.batch_size=16',
      '--config.eval.batch_size=16', '--config.train.num_steps=8',
      '--config.train.log_every=2', '--config.train.checkpoint_every=2',
      '--config.optim.base_lr=1e38')
  assert result.returncode == 3, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'non-finite training detected at step' in errors[0]
  assert 'lower optim.base_lr' in errors[0]
  step = int(errors[0].split('at step ')[1].split()[0])
  saved = [int(name) for name in os.listdir(tmp_path / 'checkpoints') if name.isdigit()]
  assert all(s < step for s in saved)                       # nothing saved after


def test_a_finite_linear_blow_up_warns_once():
  watch = health.LossBlowUp(num_classes=10)               # chance ln 10 = 2.30
  assert watch.update(1, 6.0) is None and watch.update(2, 23.0) is None
  line = watch.update(3, 248.0)
  assert line.startswith('warning: the loss is 248 at step 3') and 'lower optim.base_lr' in line
  assert watch.update(4, 300.0) is None                   # once
