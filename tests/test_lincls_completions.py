"""Linear-probe completions: best-epoch tracking, the optional parameter-free
BN before the linear layer, and the MoCo v3 ResNet-50 recipe's schedule."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import REPO
from moco_jax import optim
from moco_jax.augment import colour as augment
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.evaluation import classifier_loop, linear
from moco_jax.evaluation.knn import backbone_from_config
from moco_jax.runtime.mesh import AXIS, make_mesh
from moco_jax.runtime.metric_writer import read_metrics
from test_lincls import lincls_config


def load_recipe(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_v3_r50_recipe_is_lr_0_1_per_256_cosine_over_90_epochs_at_batch_1024():
  config = load_recipe('lincls_v3_r50_imagenet')
  assert config.train.batch_size == 1024 and config.train.num_epochs == 90
  assert (config.optim.name, config.optim.momentum, config.optim.weight_decay) == ('sgd', 0.9, 0.0)
  assert not config.head_batch_norm
  epoch_steps = 1251                       # 1,281,167 images / 1024
  total = 90 * epoch_steps
  schedule = optim.learning_rate_schedule(config.optim, config.train.batch_size,
                                          epoch_steps, total)
  # The reference: init_lr = 0.1 * 1024 / 256, then init_lr * 0.5 (1 + cos(pi t / T)).
  for step in (0, total // 4, total // 2, total - 1):
    want = 0.4 * 0.5 * (1 + np.cos(np.pi * step / total))
    assert float(schedule(step)) == pytest.approx(want, rel=1e-5, abs=1e-7), step


def test_best_epoch_is_the_maximum_so_far_and_survives_a_resume(tmp_path):
  events = [{'step': 10, 'lincls_top1': 40.0}, {'step': 20, 'loss': 1.0},
            {'step': 20, 'lincls_top1': 55.5}, {'step': 30, 'lincls_top1': 50.0},
            {'step': 40, 'lincls_top1': 70.0}]
  (tmp_path / 'metrics.jsonl').write_text(
      ''.join(json.dumps(e) + '\n' for e in events) + '{"step": 50, "linc')  # cut line
  best = classifier_loop.BestEpoch.from_log('lincls', str(tmp_path), up_to_step=30,
                                             epoch_steps=10)
  assert (best.top1, best.epoch) == (55.5, 2.0)
  assert best.update(54.0, 4.0) == best
  assert best.update(60.0, 4.0).metrics() == {'lincls_best_top1': 60.0, 'lincls_best_epoch': 4.0}
  assert classifier_loop.BestEpoch.from_log('lincls', str(tmp_path), 0, 10).top1 == -1.0
  # Fine-tuning's metrics are named by their own prefix.
  assert classifier_loop.BestEpoch.from_log('finetune', str(tmp_path), 30, 10).top1 == -1.0


def test_every_evaluation_logs_the_best_so_far(smoke_pretrain_dir, tiny_data_dir, tmp_path):
  config = lincls_config(smoke_pretrain_dir, tiny_data_dir, pretrained_step=0,
                         **{'train.num_epochs': 4, 'eval.every_epochs': 1,
                            'optim.base_lr': 0.1, 'train.log_every': 100})
  results = linear.linear_evaluation(config, str(tmp_path))
  evaluations = [e for e in read_metrics(str(tmp_path)) if 'lincls_top1' in e]
  assert len(evaluations) == 4
  for i, event in enumerate(evaluations):
    so_far = [e['lincls_top1'] for e in evaluations[:i + 1]]
    assert event['lincls_best_top1'] == max(so_far)
    first_best = evaluations[so_far.index(max(so_far))]
    assert event['lincls_best_epoch'] == first_best['step'] / 1    # 64 images, batch 64
  assert results['lincls_best_top1'] == max(e['lincls_top1'] for e in evaluations)


def _one_step(config, workdir, mesh, images, labels):
  run = linear.LinearEval(config, workdir, mesh)
  step = linear.make_train_step(mesh, run.logits_fn, run.optimizer, run.schedule)
  state = run.init_state()
  backbone = run.load_backbone()
  to_global = lambda local: jax.make_array_from_process_local_data(
      NamedSharding(mesh, P(AXIS)), local)
  state, _ = step(state, backbone, to_global(images), to_global(labels))
  return run, backbone, jax.device_get(state)


def test_head_batch_norm_uses_global_batch_statistics_on_any_device_count(
    smoke_pretrain_dir, tiny_data_dir, tmp_path):
  config = lincls_config(smoke_pretrain_dir, tiny_data_dir, pretrained_step=0,
                         head_batch_norm=True, **{'train.batch_size': 16})
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 16, 16, 3)).astype(np.uint8)
  labels = rng.integers(0, 4, 16).astype(np.int32)
  run, backbone, one = _one_step(config, str(tmp_path / 'a'), make_mesh(jax.devices()[:1]),
                                 images, labels)
  _, _, eight = _one_step(config, str(tmp_path / 'b'), make_mesh(jax.devices()[:8]),
                          images, labels)
  assert isinstance(one, linear.NormalizedLinearState)
  assert set(one.params) == {'fc'} and set(one.batch_stats['bn']) == {'mean', 'var'}
  # Per-device statistics (2 images a device) would move the kernel by O(1);
  # float rounding at lr 30 moves it by ~5e-6.
  for a, b in zip(jax.tree.leaves((one.params, one.batch_stats)),
                  jax.tree.leaves((eight.params, eight.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  # Running statistics after one step: 0.9 * init + 0.1 * the batch's (torch's
  # momentum 0.1; unbiased variance there, biased in flax: within 1/16).
  mean, std = MEAN_STD[run.config.data.normalization]
  features = np.asarray(backbone_from_config(run.pre_config).apply(
      jax.device_get(backbone), augment.normalize(jnp.asarray(images), mean, std), train=False))
  np.testing.assert_allclose(one.batch_stats['bn']['mean'], 0.1 * features.mean(0),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(one.batch_stats['bn']['var'], 0.9 + 0.1 * features.var(0),
                             rtol=1e-4, atol=1e-5)
