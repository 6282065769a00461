"""MoCo v3, ViT-Small (384-d, 12 blocks, 12 heads, patch 16), ImageNet, 300
epochs: 73.2 linear top-1 in the paper. AdamW lr 1.5e-4 per 256, wd 0.1, 40
warm-up epochs, batch 4096, T 0.2, m₀ 0.99 cosine, frozen patch projection.
On one 8-device host the reference uses batch 1024:
--config.train.batch_size=1024.
"""
from moco_jax.config import recipes_v3


def get_config():
  return recipes_v3.vit_imagenet('vit_small')
