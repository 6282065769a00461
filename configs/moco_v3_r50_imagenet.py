"""MoCo v3, ResNet-50, ImageNet, 100 epochs: 68.9 linear top-1 in the paper.

LARS lr 0.6 per 256 (no decay or trust ratio on biases and BN, lr after the
momentum), wd 1e-6, 10 warm-up epochs, batch 4096, T 1.0, crops (0.2, 1),
2-layer projector and predictor (4096-256, SyncBN). 300 epochs:
--config.optim.base_lr=0.3 --config.train.num_epochs=300 (72.8); 1000:
also --config.optim.weight_decay=1.5e-6 --config.moco.momentum=0.996 (74.6).
The backbone's BN normalises per group (moco.bn_groups = 8), not over the
whole global batch as the reference's SyncBN does (README, MoCo v3).
"""
from moco_jax.config import recipes_v3


def get_config():
  return recipes_v3.r50_imagenet()
