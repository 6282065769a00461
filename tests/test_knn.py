"""kNN monitor: the vote against a NumPy reference; the sharded evaluator; the CLI."""
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from cli_runner import python
from conftest import REPO, copy_of, smoke_config
from moco_jax.evaluation import knn
from moco_jax.config.checks import ConfigError
from moco_jax.runtime.metric_writer import read_metrics
from moco_jax.models import build_encoder
from moco_jax.runtime.mesh import make_mesh
from moco_jax.augment.normalization import MEAN_STD


def reference_knn(test, bank, bank_labels, num_classes, k, temperature):
  """The CIFAR demo's knn_predict, literally, in NumPy (float64)."""
  sims = test.astype(np.float64) @ bank.astype(np.float64).T
  order = np.argsort(-sims, axis=1)[:, :k]
  weights = np.exp(np.take_along_axis(sims, order, axis=1) / temperature)
  one_hot = np.eye(num_classes)[bank_labels[order]]            # (T, k, C)
  return np.argmax((one_hot * weights[..., None]).sum(axis=1), axis=1)


def unit_rows(rng, n, dim):
  x = rng.normal(size=(n, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize('k,temperature,chunk', [
    (1, 0.1, 7), (5, 0.1, 64), (20, 0.07, 33), (37, 0.5, 1000), (100, 0.1, 100)])
def test_knn_predict_matches_brute_force(k, temperature, chunk):
  rng = np.random.default_rng(k)
  bank, test = unit_rows(rng, 100, 12), unit_rows(rng, 30, 12)
  # Random labels: for k > 1 the weighted vote, not the nearest row, decides.
  bank_labels = rng.integers(0, 6, 100)
  got = knn.knn_predict(test, bank, bank_labels, num_classes=6, k=k,
                             temperature=temperature, chunk=chunk)
  want = reference_knn(test, bank, bank_labels, 6, k, temperature)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_knn_topk_ignores_masked_rows_and_pads_missing_neighbours():
  rng = np.random.default_rng(0)
  bank, test = unit_rows(rng, 10, 4), unit_rows(rng, 3, 4)
  mask = np.arange(10) < 4
  sims, labels = knn.knn_topk(test, bank, np.arange(10), k=6, chunk=3,
                                   bank_mask=mask)
  sims, labels = np.asarray(sims), np.asarray(labels)
  assert np.all(labels[:, :4] < 4) and np.all(np.isneginf(sims[:, 4:]))
  np.testing.assert_allclose(sims[:, :4], -np.sort(-(test @ bank[:4].T), axis=1),
                             rtol=1e-6)


def encoder_variables(config, seed=0):
  """Random He-scaled query-encoder variables ({'backbone', 'head'}), without
  compiling flax's init; random head biases."""
  encoder = build_encoder(config.model)
  images = jax.ShapeDtypeStruct((2,) + (config.data.image_size,) * 2 + (3,), np.float32)
  shapes = jax.eval_shape(lambda x: encoder.init(jax.random.PRNGKey(0), x, train=False),
                          images)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'kernel' in name:
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
    if 'head' in name:
      return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
    return (np.ones if 'scale' in name or 'var' in name else np.zeros)(
        leaf.shape, np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return variables['params'], variables['batch_stats']


def backbone_variables(config, seed=0):
  params, batch_stats = encoder_variables(config, seed)
  return params['backbone'], batch_stats['backbone']


def test_evaluator_is_a_percent_and_padding_changes_nothing(tiny_data_dir):
  mesh = make_mesh()                                   # 8 fake devices
  params, batch_stats = backbone_variables(smoke_config(tiny_data_dir))
  results = []
  # 64 train / 32 test examples: a batch of 24 leaves partial, padded batches.
  for batch_size in (24, 64):
    config = smoke_config(tiny_data_dir, **{'eval.batch_size': batch_size,
                                            'eval.knn_k': 10})
    evaluator = knn.KnnEvaluator(config, mesh)
    labels, predictions = evaluator.predict(params, batch_stats)
    assert labels.shape == predictions.shape == (32,)
    results.append((labels, predictions))
  np.testing.assert_array_equal(results[0][0], results[1][0])
  np.testing.assert_array_equal(results[0][1], results[1][1])
  top1 = evaluator(params, batch_stats)['knn_top1']
  assert top1 == pytest.approx(100 * np.mean(labels == predictions))
  # The classes are separable by colour: even a random backbone's neighbours
  # mostly share the query's class.
  assert top1 > 50


def test_evaluator_rejects_a_batch_the_devices_cannot_split(tiny_data_dir):
  config = smoke_config(tiny_data_dir, **{'eval.batch_size': 12})
  with pytest.raises(ConfigError, match='eval.batch_size=12'):
    knn.KnnEvaluator(config, make_mesh())


def test_head_features_are_the_normalised_query_encoder_output(tiny_data_dir):
  """knn_features='head': bank and queries are normalize(f_q(x)) with BN in
  inference mode, checked against a direct encoder.apply and the demo's vote."""
  config = smoke_config(tiny_data_dir, **{'eval.knn_features': 'head',
                                          'eval.batch_size': 24, 'eval.knn_k': 10})
  params, batch_stats = encoder_variables(config)
  evaluator = knn.KnnEvaluator(config, make_mesh())
  encoder = build_encoder(config.model)
  mean, std = (np.asarray(v, np.float32) for v in MEAN_STD['cifar10'])

  def direct(images):
    x = (images.astype(np.float32) / 255 - mean) / std
    out = np.asarray(encoder.apply({'params': params, 'batch_stats': batch_stats},
                                   x, train=False), np.float64)
    return out / np.linalg.norm(out, axis=1, keepdims=True)

  def split(batches):
    rows = [(direct(b['image'])[b['mask']], b['label'][b['mask']]) for b in batches]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])

  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), np.uint8)
  got = np.asarray(evaluator.features(params, batch_stats, images))
  assert got.shape == (8, config.model.dim)
  np.testing.assert_allclose(got, direct(images), rtol=1e-4, atol=1e-5)
  # Not the backbone's features (64-d), and the vote is the demo's on them.
  bank, bank_labels = split(evaluator.bank_batches)
  test, test_labels = split(evaluator.test_batches)
  labels, predictions = evaluator.predict(params, batch_stats)
  np.testing.assert_array_equal(labels, test_labels)
  want = reference_knn(test, bank, bank_labels, evaluator.num_classes, 10, 0.1)
  np.testing.assert_array_equal(predictions, want)
  backbone_config = smoke_config(tiny_data_dir, **{'eval.batch_size': 24})
  backbone_features = knn.KnnEvaluator(backbone_config, make_mesh()).features(
      params['backbone'], batch_stats['backbone'], images)
  assert backbone_features.shape == (8, 64)


def run_knn_cli(*args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device
  return subprocess.run([*python(), '-m', 'moco_jax.knn', *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)


def test_knn_cli_appends_knn_top1_at_the_checkpoint_step(smoke_pretrain_dir, tmp_path):
  workdir = copy_of(smoke_pretrain_dir, tmp_path)    # the CLI appends to its evaluations
  result = run_knn_cli(f'--workdir={workdir}', '--step=2',
                       '--config.eval.knn_k=10', '--config.eval.batch_size=24',
                       '--config.eval.knn_features=head')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'knn_top1' in result.stdout and 'k=10' in result.stdout
  assert 'features=head' in result.stdout
  # Apart from the training curve (metrics.jsonl), with what it measured.
  assert not any(e['step'] == 2 and 'knn_top1' in e for e in read_metrics(workdir))
  with open(os.path.join(workdir, 'knn_evaluations.jsonl')) as f:
    last = json.loads(f.read().splitlines()[-1])
  assert last['step'] == 2 and 0 <= last['knn_top1'] <= 100
  assert last['knn_features'] == 'head' and last['knn_k'] == 10
  assert last['knn_top1'] == round(last['knn_top1'], 4)


def test_knn_cli_without_checkpoints_is_one_clear_line(tmp_path):
  result = run_knn_cli(f'--workdir={tmp_path}')
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'has no checkpoints' in errors[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and os.listdir(tmp_path) == []
