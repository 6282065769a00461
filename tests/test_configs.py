"""Every shipped config is valid; config checks report every problem at once."""
import glob
import importlib.util
import os
from unittest import mock

import pytest

from conftest import REPO
from moco_jax.config.checks import ConfigError, check_config, config_problems

CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize('path', CONFIGS, ids=os.path.basename)
def test_shipped_pretraining_configs_are_valid(path):
  config = load(path)
  if 'moco' not in config:
    pytest.skip('not a pretraining config')
  check_config(config, num_devices=1)
  check_config(config, num_devices=8)   # 8 BN groups: 1, 2, 4 or 8 devices


def test_recipes_match_the_papers():
  cifar = load(os.path.join(REPO, 'configs', 'moco_v2_r18_cifar10.py'))
  assert (cifar.train.batch_size, cifar.moco.queue_size, cifar.moco.momentum,
          cifar.moco.temperature, cifar.optim.weight_decay) == (512, 4096, 0.99, 0.1, 5e-4)
  assert cifar.optim.base_lr * 512 / 256 == pytest.approx(0.06)
  v1 = load(os.path.join(REPO, 'configs', 'moco_v1_r50_imagenet.py'))
  assert (v1.model.head, v1.moco.temperature, v1.optim.schedule) == ('linear', 0.07, 'step')
  assert tuple(v1.optim.lr_drop_epochs) == (120, 160)
  v2 = load(os.path.join(REPO, 'configs', 'moco_v2_r50_imagenet.py'))
  assert (v2.model.head, v2.moco.temperature, v2.moco.queue_size, v2.moco.momentum) == (
      'mlp', 0.2, 65536, 0.999)


def test_every_problem_is_reported_at_once():
  config = load(os.path.join(REPO, 'configs', 'smoke.py'))
  config.moco.queue_size = 40
  config.moco.momentum = 1.0
  config.moco.temperature = 0.0
  config.model.arch = 'resnet42'
  config.optim.base_lr = -1.0
  problems = config_problems(config, num_devices=1)
  for expected in ('moco.queue_size=40', 'moco.momentum=1.0', 'moco.temperature=0.0',
                   "model.arch='resnet42'", 'optim.base_lr=-1.0'):
    assert any(expected in p for p in problems), (expected, problems)
  with pytest.raises(ConfigError) as error:
    check_config(config, num_devices=1)
  assert '\n' not in str(error.value)


def test_batch_must_split_over_devices_and_bn_groups():
  config = load(os.path.join(REPO, 'configs', 'smoke.py'))   # batch 16, bn_groups 8
  assert not config_problems(config, num_devices=8)
  config.moco.bn_groups = 4                  # fewer groups than devices
  (problem,) = config_problems(config, num_devices=8)
  assert problem.startswith('moco.bn_groups=4 with 8 devices and train.batch_size=16')
  assert problem.endswith('valid: 8, 16')
  config.moco.bn_groups = 12                 # not a multiple of 8, does not divide 16
  assert 'valid: 8, 16' in config_problems(config, num_devices=8)[0]
  config.moco.bn_groups = 16
  assert not config_problems(config, num_devices=8)   # 2 groups of 1 per device


def test_bn_groups_are_global_whatever_the_device_count():
  from moco_jax.experiment import bn_layout, describe_bn
  config = load(os.path.join(REPO, 'configs', 'moco_v2_r50_imagenet.py'))
  for devices, per_device in ((1, 8), (2, 4), (4, 2), (8, 1)):
    assert not config_problems(config, num_devices=devices)
    assert bn_layout(config, devices) == {
        'bn_groups': 8, 'bn_groups_per_device': per_device, 'bn_group_size': 32}
  assert describe_bn(bn_layout(config, 1), True) == (
      'BN: 8 groups of 32 samples (8 per device), shuffle BN on')
  assert 'moco.bn_groups=8 with 16 devices' in config_problems(config, 16)[0]


def test_one_device_runs_the_imagenet_recipe_with_eight_bn_groups():
  """The v2 recipe on one device: the encoder normalises 8 groups of 32, so
  shuffle BN is real (a per-device count would have made it a no-op)."""
  from jax.sharding import Mesh
  import jax
  from moco_jax import experiment as experiment_module
  from moco_jax.experiment import Experiment
  config = load(os.path.join(REPO, 'configs', 'moco_v2_r50_imagenet.py'))
  # No ImageNet here: the experiment's data module reports its size.
  data = getattr(experiment_module, 'inputs', None) or experiment_module.pipeline
  info = data.DatasetInfo(name='imagenet2012', data_dir=None, num_examples=1_281_167,
                          num_classes=1000, class_names=())
  with mock.patch.object(data, 'dataset_info', return_value=info):
    experiment = Experiment(config, mesh=Mesh(jax.devices()[:1], ('data',)))
  assert experiment.encoder.backbone.bn_groups == 8
  assert experiment.bn_layout['bn_group_size'] == 32


def test_old_and_pointless_bn_settings_are_refused():
  config = load(os.path.join(REPO, 'configs', 'moco_v2_r50_imagenet.py'))
  config.moco.bn_splits = 1       # an old config: per-device groups
  (problem,) = config_problems(config, num_devices=1)
  assert 'moco.bn_splits is no longer a setting' in problem and 'moco.bn_groups' in problem
  config = load(os.path.join(REPO, 'configs', 'moco_v2_r50_imagenet.py'))
  config.moco.bn_groups = 1
  (problem,) = config_problems(config, num_devices=1)
  assert problem.startswith('moco.shuffle_bn=True with moco.bn_groups=1')
  config.moco.shuffle_bn = False
  assert not config_problems(config, num_devices=1)


def test_symmetric_loss_needs_a_queue_of_whole_double_batches():
  config = load(os.path.join(REPO, 'configs', 'moco_v2_r18_cifar10_symmetric.py'))
  assert config.moco.symmetric and not config_problems(config, num_devices=1)
  config.moco.queue_size = 512 * 9            # a multiple of B, not of 2B
  (problem,) = config_problems(config, num_devices=1)
  assert problem.startswith('moco.queue_size=4608 is not a positive multiple of 2 × '
                            'train.batch_size')
  assert problem.endswith('= 1024 (e.g. 4096)')


def test_knn_features_of_the_recipes():
  feature = lambda name: load(os.path.join(REPO, 'configs', name)).eval.knn_features
  assert feature('moco_v2_r18_cifar10.py') == feature('moco_v2_r18_cifar10_symmetric.py') == 'head'
  assert feature('moco_v2_r50_imagenet.py') == feature('cifar10_cpu.py') == 'backbone'
  config = load(os.path.join(REPO, 'configs', 'smoke.py'))
  config.eval.knn_features = 'neck'
  assert "eval.knn_features='neck' is not one of backbone, head" in config_problems(config, 8)
