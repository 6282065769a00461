"""MoCo v1, ResNet-50, ImageNet, 200 epochs: 60.6 linear top-1 in the paper."""
from moco_jax.config.base import base_config


def get_config():
  c = base_config()
  c.model.head = 'linear'
  c.moco.temperature = 0.07
  c.data.augment = 'v1'
  c.optim.schedule = 'step'        # ×0.1 at epochs 120 and 160
  return c
