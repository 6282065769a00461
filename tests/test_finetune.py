"""End-to-end fine-tuning: the backbone moves (or stays when frozen), exact
resume, one-line errors, and the regularisers and layer scales against
re-derivations."""
import importlib.util
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cli_runner import python
from conftest import REPO, TINY_DATASET, recipe_config, straight_and_resumed_runs
from moco_jax.config.checks import ConfigError
from moco_jax.evaluation import finetune, finetune_augment, layers
from moco_jax.runtime.metric_writer import read_metrics
from moco_jax.weights import pretrained


def finetune_config(pretrain_dir, data_dir, **overrides):
  """configs/finetune_cifar10_cpu.py on the tiny dataset, with dotted overrides."""
  return recipe_config('finetune_cifar10_cpu.py', pretrain_dir, data_dir, **{
      'data.on_device': False, 'train.batch_size': 16, 'eval.batch_size': 16,
      'train.num_steps': 4, 'train.log_every': 2, 'train.checkpoint_every': 2,
      'eval.every_epochs': 0, **overrides})


def final_state(config, workdir):
  run = finetune.Finetune(config, workdir)
  state = run.checkpointer.restore(run.abstract)
  run.checkpointer.close()
  return jax.device_get(state)


def start_backbone(pretrain_dir):
  run = pretrained.load(pretrain_dir, finetune.make_mesh())
  return jax.device_get({'params': run.params, 'batch_stats': run.batch_stats})


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_fine_tuning_moves_the_backbone_and_freezing_keeps_it(
    smoke_pretrain_dir, tiny_data_dir, tmp_path):
  start = start_backbone(smoke_pretrain_dir)
  results = finetune.finetune(finetune_config(smoke_pretrain_dir, tiny_data_dir),
                              str(tmp_path / 'all'))
  assert 0 <= results['finetune_top1'] <= 100
  logged = [e for e in read_metrics(str(tmp_path / 'all')) if 'finetune_top1' in e]
  assert results['finetune_best_top1'] == max(e['finetune_top1'] for e in logged)
  moved = final_state(finetune_config(smoke_pretrain_dir, tiny_data_dir),
                      str(tmp_path / 'all'))
  for name in ('conv1', 'layer1_0', 'layer4_1'):
    assert not tree_equal(moved.params['backbone'][name], start['params'][name]), name
  assert not tree_equal(moved.batch_stats['backbone'], start['batch_stats'])

  frozen_config = finetune_config(smoke_pretrain_dir, tiny_data_dir,
                                  **{'finetune.freeze_to': 'layer2'})
  finetune.finetune(frozen_config, str(tmp_path / 'frozen'))
  frozen = final_state(frozen_config, str(tmp_path / 'frozen'))
  for name in ('conv1', 'bn1', 'layer1_0', 'layer1_1', 'layer2_0', 'layer2_1'):
    assert tree_equal(frozen.params['backbone'][name], start['params'][name]), name
    if name != 'conv1':   # a conv has no batch statistics
      assert tree_equal(frozen.batch_stats['backbone'][name], start['batch_stats'][name]), name
  for name in ('layer3_0', 'layer4_1'):
    assert not tree_equal(frozen.params['backbone'][name], start['params'][name]), name
  assert not tree_equal(frozen.params['head'], moved.params['head'])


def test_a_resumed_fine_tune_equals_an_uninterrupted_one(
    smoke_pretrain_dir, tiny_data_dir, tmp_path, monkeypatch):
  # mixup, CutMix and erasing draw random numbers every step: a resumed run
  # must draw the same ones.
  config = finetune_config(smoke_pretrain_dir, tiny_data_dir, **{
      'finetune.mixup_alpha': 0.8, 'finetune.cutmix_alpha': 1.0,
      'finetune.random_erasing': 0.25, 'finetune.label_smoothing': 0.1})
  straight, interrupted = straight_and_resumed_runs(config, tmp_path, monkeypatch,
                                                   run=finetune.finetune)
  a, b = final_state(config, straight), final_state(config, interrupted)
  assert int(a.step) == int(b.step) == 4
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                  jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
    np.testing.assert_array_equal(x, y)


def test_labels_per_class_is_a_key_of_both_supervised_configs(smoke_pretrain_dir, tiny_data_dir,
                                                             tmp_path):
  # docs/transfer.md tells users --config.data.labels_per_class=K: the key must
  # exist in the fine-tuning and linear-probe recipes (an override of a missing
  # key is refused), and set the number of training images to K per class.
  lincls = recipe_config('lincls_cifar10.py', smoke_pretrain_dir, tiny_data_dir)
  assert (lincls.data.labels_per_class, lincls.data.labels_seed) == (0, 0)
  config = finetune_config(smoke_pretrain_dir, tiny_data_dir, **{'data.labels_per_class': 4})
  run = finetune.Finetune(config, str(tmp_path / 'subset'))
  assert run.info.num_examples == 4 * run.info.num_classes == 16    # of 64
  run.checkpointer.close()


def test_a_wrong_class_count_is_one_line_and_creates_nothing(
    smoke_pretrain_dir, tiny_data_dir, tmp_path):
  out = tmp_path / 'out'
  config = finetune_config(smoke_pretrain_dir, tiny_data_dir, **{'finetune.num_classes': 7})
  with pytest.raises(ConfigError) as error:
    finetune.finetune(config, str(out))
  message = str(error.value)
  assert '\n' not in message
  assert "finetune.num_classes=7 but data.dataset='tiny_images' has 4 classes" in message
  assert not out.exists()


def test_a_pretrained_path_that_holds_nothing_is_one_line(tiny_data_dir, tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(pretrained.PretrainedError, match='holds nothing') as error:
    finetune.finetune(finetune_config(str(tmp_path / 'nowhere'), tiny_data_dir), str(out))
  assert '\n' not in str(error.value)
  (tmp_path / 'empty').mkdir()
  with pytest.raises(pretrained.PretrainedError, match='has no checkpoints'):
    finetune.finetune(finetune_config(str(tmp_path / 'empty'), tiny_data_dir), str(out))
  assert not out.exists() and os.listdir(tmp_path / 'empty') == []


def test_a_dataset_without_labels_is_one_line(smoke_pretrain_dir, tmp_path):
  rng = np.random.default_rng(0)
  npz = tmp_path / 'unlabelled.npz'
  np.savez(npz, train_images=rng.integers(0, 256, (32, 16, 16, 3), np.uint8),
           train_labels=np.full(32, -1), test_images=rng.integers(0, 256, (16, 16, 16, 3),
                                                                  np.uint8),
           test_labels=np.full(16, -1))
  config = finetune_config(smoke_pretrain_dir, '', **{'data.dataset': f'npz:{npz}',
                                                      'data.on_device': True})
  with pytest.raises(ConfigError, match='has no class labels') as error:
    finetune.finetune(config, str(tmp_path / 'out'))
  assert '\n' not in str(error.value)
  assert not (tmp_path / 'out').exists()


def test_cli_fails_with_one_line_and_exit_2(tiny_data_dir, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(
      [*python(), '-m', 'moco_jax.finetune', '--config=configs/finetune_cifar10_cpu.py',
       f'--workdir={tmp_path / "out"}', f'--config.pretrained={tmp_path / "nowhere"}',
       f'--config.data.dataset={TINY_DATASET}', f'--config.data.data_dir={tiny_data_dir}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: ') and 'holds nothing' in lines[0]
  assert not (tmp_path / 'out').exists()


def test_layer_scales_follow_the_layer_decay_rule():
  params = {'backbone': {'conv1': {'kernel': 0}, 'bn1': {'scale': 0},
                         **{f'layer{s}_{b}': {'conv1': {'kernel': 0}}
                            for s in range(1, 5) for b in range(2)}},
            'head': {'kernel': 0, 'bias': 0}}
  scales = layers.update_scales(params, '', 0.5)
  assert scales['head']['kernel'] == 1 and scales['backbone']['conv1']['kernel'] == 0.5**5
  for stage in range(1, 5):
    assert scales['backbone'][f'layer{stage}_1']['conv1']['kernel'] == 0.5**(5 - stage)
  frozen = layers.update_scales(params, 'layer2', 1.0)
  assert [frozen['backbone'][f'layer{s}_0']['conv1']['kernel'] for s in range(1, 5)] == [
      0, 0, 1, 1]
  assert frozen['backbone']['bn1']['scale'] == 0 and frozen['head']['bias'] == 1
  vit = {'backbone': {'patch_embed': {'kernel': 0}, 'cls_token': 0, 'norm': {'scale': 0},
                      **{f'blocks_{i}': {'kernel': 0} for i in range(3)}},
         'head': {'kernel': 0}}
  scales = layers.update_scales(vit, 'blocks_0', 0.9)
  assert scales['backbone']['patch_embed']['kernel'] == 0 == scales['backbone']['cls_token']
  assert scales['backbone']['blocks_0']['kernel'] == 0
  assert scales['backbone']['blocks_1']['kernel'] == pytest.approx(0.9**2)
  assert scales['backbone']['norm']['scale'] == 1 == scales['head']['kernel']
  with pytest.raises(ValueError, match="freeze_to='layer9'.*valid: stem, layer1"):
    layers.update_scales(params, 'layer9', 1.0)


def test_mixup_and_cutmix_targets_match_the_pixels():
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(6, 8, 8, 3)), jnp.float32)
  labels = jnp.arange(6)
  for seed in range(6):
    key = jax.random.PRNGKey(seed)
    # mixup alone: x = lam x + (1 - lam) x[::-1], lam read back from the targets
    mixed, targets = finetune_augment.mix_batch(key, images, labels, 6, 0.8, 0.0, 0.5, 0.0)
    lam = float(targets[0, 0])
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-5)
    np.testing.assert_allclose(targets.sum(1), 1, atol=1e-6)
    # CutMix alone: the targets' weight of the partner is the pasted area
    mixed, targets = finetune_augment.mix_batch(key, images, labels, 6, 0.0, 1.0, 0.5, 0.1)
    from_partner = np.all(np.asarray(mixed) == np.asarray(images[::-1]), axis=-1)[1]
    from_self = np.all(np.asarray(mixed) == np.asarray(images), axis=-1)[1]
    assert np.all(from_partner | from_self)
    lam = 1 - from_partner.mean()
    smooth = np.full(6, 0.1 / 6)
    want = lam * (smooth + np.eye(6)[1] * 0.9) + (1 - lam) * (smooth + np.eye(6)[4] * 0.9)
    np.testing.assert_allclose(targets[1], want, atol=1e-6)


def test_random_erasing_fills_one_box_of_the_allowed_size():
  images = jnp.full((64, 16, 16, 3), 5.0)
  erased = np.asarray(finetune_augment.random_erasing(jax.random.PRNGKey(1), images, 1.0))
  for image in erased:
    changed = np.any(image != 5.0, axis=-1)
    rows, cols = np.where(changed)
    assert changed.any()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert box == changed.sum()                      # one filled rectangle
    assert 0.02 * 256 * 0.5 <= box <= 256 / 3 * 1.5   # U(0.02, 1/3) of the area, rounded
  untouched = finetune_augment.random_erasing(jax.random.PRNGKey(1), images, 0.0)
  assert np.array_equal(untouched, images)


@pytest.mark.parametrize('name', sorted(
    os.path.basename(p) for p in os.listdir(os.path.join(REPO, 'configs'))
    if p.startswith('finetune_')))
def test_shipped_finetune_configs_are_valid(name):
  spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(REPO, 'configs', name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert finetune.config_problems(config, num_devices=8, num_classes=10) == []


def test_every_start_point_gives_the_same_backbone(smoke_pretrain_dir, tiny_data_dir, tmp_path):
  from moco_jax.weights import export, start_point
  mesh = finetune.make_mesh()
  config = finetune_config(smoke_pretrain_dir, tiny_data_dir)
  from_workdir = start_point.resolve(config, mesh)
  flax_file = export.export(smoke_pretrain_dir, 'flax', str(tmp_path / 'backbone.msgpack'))
  npz_file = export.export(smoke_pretrain_dir, 'torchvision', str(tmp_path / 'backbone.npz'))
  from_flax = start_point.resolve(finetune_config(flax_file, tiny_data_dir), mesh)
  official = finetune_config(npz_file, tiny_data_dir, **{
      'model.arch': 'resnet18', 'model.width_multiplier': 0.125, 'model.cifar_stem': True,
      'data.normalization': 'cifar10'})
  from_npz = start_point.resolve(official, mesh)
  assert from_flax.model.to_dict() == from_workdir.model.to_dict()
  assert (from_flax.mean, from_flax.std) == (from_workdir.mean, from_workdir.std)
  assert (from_npz.mean, from_npz.std) == (from_workdir.mean, from_workdir.std)
  want = jax.tree_util.tree_leaves_with_path(from_workdir.variables)
  for other in (from_flax.variables, from_npz.variables):
    got = jax.tree_util.tree_leaves_with_path(other)
    assert [p for p, _ in got] == [p for p, _ in want]
    for (path, a), (_, b) in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  random = start_point.resolve(finetune_config(smoke_pretrain_dir, tiny_data_dir,
                                               init='random'), mesh)
  assert random.variables is None and random.model.to_dict() == from_workdir.model.to_dict()
  with pytest.raises(pretrained.PretrainedError, match="model.arch='resnet50' but"):
    start_point.resolve(finetune_config(smoke_pretrain_dir, tiny_data_dir,
                                        **{'model.arch': 'resnet50'}), mesh)
