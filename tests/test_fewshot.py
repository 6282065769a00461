"""Few-shot linear evaluation (evaluation/fewshot.py, python -m moco_jax.fewshot)
and the low-label subsets behind it (data.labels_per_class, data/subset.py).

The closed form is checked against NumPy's least squares on the augmented
system (an independent derivation of ridge with an unpenalised bias); the
evaluator against the same closed form on features computed by another
path; the subset for balance, seeding and device-count independence.
"""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cli_runner import python
from conftest import REPO, TINY_DATASET, smoke_config
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.data import inputs, subset
from moco_jax.data.info import DatasetError
from moco_jax.evaluation import fewshot, knn
from moco_jax.runtime.mesh import make_mesh


def lstsq_ridge(x, y_onehot, l2_reg):
  """argmin ||x W + 1 b - y||^2 + l2 ||W||^2 as one least-squares problem:
  rows [x, 1] over [sqrt(l2) I, 0], targets [y; 0]."""
  n, f = x.shape
  a = np.block([[x, np.ones((n, 1))], [np.sqrt(l2_reg) * np.eye(f), np.zeros((f, 1))]])
  b = np.concatenate([y_onehot, np.zeros((f, y_onehot.shape[1]))])
  solution = np.linalg.lstsq(a, b, rcond=None)[0]
  return solution[:f], solution[f]


@pytest.mark.parametrize('n, f', [(40, 8), (12, 30)])   # primal and dual forms
def test_ridge_classifier_equals_least_squares(n, f):
  rng = np.random.default_rng(0)
  x, labels = rng.normal(size=(n, f)), rng.integers(0, 4, n)
  for l2_reg in (0.01, 1.0, 30.0):
    w, b = fewshot.ridge_classifier(x, labels, 4, l2_reg)
    want_w, want_b = lstsq_ridge(x, np.eye(4)[labels], l2_reg)
    np.testing.assert_allclose(w, want_w, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, want_b, rtol=1e-8, atol=1e-10)


def test_few_shot_accuracy_classifies_normalised_features_with_the_ridge_solution():
  rng = np.random.default_rng(1)
  centres = rng.normal(size=(5, 16))
  train_y, test_y = np.repeat(np.arange(5), 3), rng.integers(0, 5, 200)
  train_x = 3 * centres[train_y] + rng.normal(size=(15, 16))
  test_x = 3 * centres[test_y] + rng.normal(size=(200, 16))
  unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
  w, b = lstsq_ridge(unit(train_x), np.eye(5)[train_y], 0.5)
  want = 100 * np.mean(np.argmax(unit(test_x) @ w + b, axis=1) == test_y)
  got = fewshot.few_shot_accuracy(train_x, train_y, test_x, test_y, 5, l2_reg=0.5)
  assert got == pytest.approx(want, abs=1e-9)
  assert got > 60           # separable clusters: far above chance (20)
  with pytest.raises(ValueError, match=r'test labels span \[0, 4\]: not within the 3 classes'):
    fewshot.few_shot_accuracy(train_x, train_y % 3, test_x, test_y, 3)


def test_summarize_gives_mean_and_sample_std_over_seeds():
  out = fewshot.summarize({5: [50.0, 60.0, 70.0], 1: [20.0]})
  assert out == {'fewshot_1shot_top1': 20.0, 'fewshot_1shot_top1_std': 0.0,
                 'fewshot_5shot_top1': 60.0, 'fewshot_5shot_top1_std': 10.0}


def test_balanced_subset_is_balanced_seeded_and_nested():
  labels = np.random.default_rng(0).integers(0, 6, 500)
  five = subset.balanced_subset(labels, 5, seed=3)
  assert np.bincount(labels[five], minlength=6).tolist() == [5] * 6
  assert np.all(np.diff(five) > 0)
  np.testing.assert_array_equal(five, subset.balanced_subset(labels, 5, seed=3))
  assert set(five) != set(subset.balanced_subset(labels, 5, seed=4))
  assert set(subset.balanced_subset(labels, 2, seed=3)) <= set(five)
  smallest = np.bincount(labels).min()
  with pytest.raises(DatasetError, match=f'at most {smallest} for every class'):
    subset.balanced_subset(labels, smallest + 1, seed=0)
  with pytest.raises(DatasetError, match='without a label'):
    subset.balanced_subset(np.array([0, 1, -1]), 1, seed=0)


def _selected(data_config, mesh):
  """Sorted (label, image bytes) of every example the training split yields."""
  batches = inputs.eval_batches(data_config, data_config.train_split, 8, mesh,
                                inputs.on_device(data_config, mesh)[0])
  rows = []
  for batch in batches:
    images, labels, mask = (np.asarray(jax.device_get(batch[k])) for k in ('image', 'label', 'mask'))
    if images.shape[0] != mask.shape[0]:         # device path: global arrays
      images = images[:mask.shape[0]]
    rows += [(int(l), i.tobytes()) for i, l, m in zip(images, labels, mask) if m]
  return sorted(rows)


@pytest.mark.parametrize('on_device', [False, True])
def test_labels_per_class_is_balanced_and_the_same_on_1_and_8_devices(tiny_data_dir, on_device):
  config = smoke_config(tiny_data_dir).data
  config.labels_per_class, config.labels_seed = 3, 1
  config.on_device = on_device
  one = _selected(config, make_mesh(jax.devices()[:1]))
  eight = _selected(config, make_mesh(jax.devices()[:8]))
  assert len(jax.devices()) == 8
  assert one == eight
  assert np.bincount([label for label, _ in one]).tolist() == [3, 3, 3, 3]
  assert inputs.dataset_info(config).num_examples == 12
  # The subset is the draw of data/subset.py on the split's labels.
  whole = ml_collections.ConfigDict(config.to_dict())
  whole.labels_per_class = 0
  everything = _selected(whole, make_mesh(jax.devices()[:1]))
  assert set(one) <= set(everything) and len(everything) == 64
  config.labels_seed = 2
  assert _selected(config, make_mesh(jax.devices()[:1])) != one


def test_labels_per_class_larger_than_a_class_is_one_error(tiny_data_dir):
  config = smoke_config(tiny_data_dir).data
  config.labels_per_class = 40
  with pytest.raises(DatasetError, match='data.labels_per_class=40 is more than'):
    inputs.dataset_info(config)


def test_evaluator_equals_the_closed_form_on_independently_selected_features(tiny_data_dir):
  config = smoke_config(tiny_data_dir)
  config.eval.batch_size = 8
  mesh = make_mesh(jax.devices()[:2])
  backbone = knn.backbone_from_config(config)
  size = config.data.image_size
  variables = backbone.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  evaluator = fewshot.FewShotEvaluator(config, mesh, shots=(1, 3), seeds=2, l2_reg=0.1)
  got = evaluator.accuracies(params, batch_stats)

  # Features of the whole splits in record order, one image at a time.
  mean, std = MEAN_STD[config.data.normalization]
  features = jax.jit(knn.features_fn(backbone, mean, std))
  one_device = make_mesh(jax.devices()[:1])
  def split(name):
    rows = [(np.asarray(features(params, batch_stats, batch['image'][m][None]))[0], batch['label'][m])
            for batch in inputs.eval_batches(config.data, name, 8, one_device,
                                             inputs.on_device(config.data, one_device)[0])
            for m in np.flatnonzero(batch['mask'])]
    return np.stack([r[0] for r in rows]), np.array([r[1] for r in rows])
  train_x, train_y = split('train')
  test_x, test_y = split('test')
  for k in (1, 3):
    for seed in range(2):
      chosen = subset.balanced_subset(train_y, k, seed)
      want = fewshot.few_shot_accuracy(train_x[chosen], train_y[chosen], test_x, test_y, 4, 0.1)
      assert got[k][seed] == pytest.approx(want, abs=1e-6), (k, seed)


def build_unlabelled_dataset(data_dir):
  import tensorflow as tf
  import tensorflow_datasets as tfds
  images = np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3)).astype(np.uint8)
  builder = tfds.dataset_builders.TfDataBuilder(
      name='tiny_unlabelled', version='1.0.0', data_dir=str(data_dir),
      split_datasets={'train': tf.data.Dataset.from_tensor_slices({'image': images}),
                      'test': tf.data.Dataset.from_tensor_slices({'image': images})},
      features=tfds.features.FeaturesDict({'image': tfds.features.Image(shape=(16, 16, 3))}))
  builder.download_and_prepare()


def run_cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  result = subprocess.run([*python(), '-m', 'moco_jax.fewshot', *args],
                          capture_output=True, text=True, env=env, timeout=600)
  return result.returncode, result.stdout, result.stderr.strip().splitlines()


def test_cli_one_line_errors(smoke_pretrain_dir, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  code, _, err = run_cli(f'--workdir={empty}')
  assert code == 2 and len(err) == 1 and 'has no checkpoints' in err[0], err
  code, _, err = run_cli(f'--workdir={smoke_pretrain_dir}', '--shots=1,100')
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith('error: ') and '100-shot' in err[0] and 'more than' in err[0]
  build_unlabelled_dataset(tmp_path / 'tfds')
  code, _, err = run_cli(f'--workdir={smoke_pretrain_dir}', '--config.data.dataset=tiny_unlabelled',
                         f'--config.data.data_dir={tmp_path / "tfds"}')
  assert code == 2 and len(err) == 1 and 'has no class labels' in err[0], err


def test_cli_prints_mean_and_std_and_appends_metrics(smoke_pretrain_dir, tmp_path):
  import shutil
  workdir = shutil.copytree(smoke_pretrain_dir, tmp_path / 'run')  # the fixture stays as is
  code, out, err = run_cli(f'--workdir={workdir}', '--shots=1,2', '--seeds=2')
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result) >= {'fewshot_1shot_top1', 'fewshot_1shot_top1_std',
                         'fewshot_2shot_top1', 'fewshot_2shot_top1_std'}
  assert result['step'] == 4 and not result['random_init']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]['fewshot_2shot_top1'] == result['fewshot_2shot_top1']


def test_pretraining_runs_the_few_shot_evaluator_every_eval_fewshot_every(tiny_data_dir, tmp_path):
  from moco_jax import train
  # 64 images, batch 16: 4 steps per epoch; every half epoch -> steps 2 and 4.
  config = smoke_config(tiny_data_dir, **{'eval.fewshot_every': 0.5,
                                          'eval.fewshot_shots': (1, 2),
                                          'eval.fewshot_seeds': 2,
                                          'eval.batch_size': 16})
  train.train_and_evaluate(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    events = [json.loads(line) for line in f]
  fewshot_events = [e for e in events if 'fewshot_1shot_top1' in e]
  assert [e['step'] for e in fewshot_events] == [2, 4]
  for event in fewshot_events:
    assert 0 <= event['fewshot_2shot_top1'] <= 100
    assert event['fewshot_2shot_top1_std'] >= 0
