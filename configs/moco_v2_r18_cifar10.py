"""The MoCo CIFAR-10 demo recipe: ResNet-18, 200 epochs, 82.6% kNN in the reference.

Batch 512, lr 0.06 (0.03 per 256), SGD wd 5e-4, K 4096, m 0.99, T 0.1, linear
head, 8 BN groups of 64 (the demo's SplitBN 8) on 1, 2, 4 or 8 devices, kNN
monitor on the L2-normalised head output (the demo's). The symmetric-loss
variant: configs/moco_v2_r18_cifar10_symmetric.py.
"""
from moco_jax.config import recipes


def get_config():
  return recipes.cifar10_demo()
