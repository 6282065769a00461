"""MoCo v2, ResNet-50, ImageNet, 200 epochs: 67.5 linear top-1 in the paper."""
from moco_jax.config.base import base_config


def get_config():
  return base_config()
