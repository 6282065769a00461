"""MoCo v3 on CIFAR-10: ViT-S at patch 4 (8×8 tokens of 32×32 images), batch
512, AdamW lr 1.5e-4 per 256, wd 0.1, 40 warm-up epochs, 300 epochs, T 0.2,
m₀ 0.99 cosine, the v3 heads and augmentation, kNN every 10 epochs. The paper
has no CIFAR recipe: this one is our extrapolation and is not measured here.
"""
from moco_jax.config import recipes_v3


def get_config():
  return recipes_v3.vit_cifar10()
