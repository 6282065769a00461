"""The one upgrade step for old saved configs (config/upgrade.py): every key
it fills exists in base_config() (no typo can hide a key), a current config
is left exactly as it is, and an old one gets the values its run used."""
from moco_jax.config import upgrade
from moco_jax.config.base import base_config


def test_every_added_key_is_a_current_key():
  assert upgrade.missing_keys(base_config()) == []


def test_a_current_config_is_unchanged():
  config = base_config()
  config.moco.symmetric, config.model.conv_impl = True, 'fast'
  before = config.to_dict()
  assert upgrade.upgrade(config).to_dict() == before


def test_an_old_config_gets_the_old_behaviour_and_keeps_renamed_keys():
  old = base_config()
  for dotted in upgrade.ADDED_KEYS:
    section, key = dotted.split('.')
    del old[section][key]
  del old.moco['bn_groups']
  old.moco.bn_splits = 2
  upgraded = upgrade.upgrade(old)
  assert upgraded.model.conv_impl == 'xla' and upgraded.eval.knn_features == 'backbone'
  assert upgraded.moco.symmetric is False and upgraded.moco.momentum_schedule == 'constant'
  assert upgraded.train.stop_on_collapse is False and upgraded.data.on_device is False
  assert upgraded.moco.bn_splits == 2 and 'bn_groups' not in upgraded.moco
