"""Every shipped config is valid; config checks report every problem at once."""
import glob
import importlib.util
import os

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
  if config.moco.bn_splits == 1 or config.train.batch_size % (8 * config.moco.bn_splits) == 0:
    check_config(config, num_devices=8)


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
  config = load(os.path.join(REPO, 'configs', 'smoke.py'))   # batch 16, bn_splits 2
  assert not config_problems(config, num_devices=8)
  config.moco.bn_splits = 4
  assert any('devices × moco.bn_splits = 8 × 4 = 32' in p
             for p in config_problems(config, num_devices=8))
