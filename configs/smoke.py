"""Tiny: a few steps on 2 CPU cores in well under a minute (tests and CI).

Point data.dataset/data_dir at any small image dataset (tests build one).
"""
from moco_jax.config.base import base_config


def get_config():
  c = base_config()
  c.model.arch = 'resnet18'
  c.model.width_multiplier = 0.125  # 8…64 channels
  c.model.cifar_stem = True
  c.model.head = 'mlp'
  c.model.dim = 16
  c.moco.queue_size = 64
  c.moco.momentum = 0.99
  c.moco.bn_groups = 8             # groups of 2 (1 sample per group would make BN degenerate)
  c.data.dataset = 'cifar10'
  c.data.eval_split = 'test'
  c.data.image_size = 16
  c.data.augment = 'v2'
  c.data.normalization = 'cifar10'
  c.data.cache = True
  # A constant lr does not depend on num_steps, so the tests' runs of different
  # lengths all reuse one compiled step (XLA bakes the schedule into it).
  c.optim.schedule = 'constant'
  c.train.batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 2
  return c
