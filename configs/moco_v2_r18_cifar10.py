"""The MoCo CIFAR-10 demo recipe: ResNet-18, 200 epochs, 82.6% kNN in the reference.

Batch 512, lr 0.06 (0.03 per 256), SGD wd 5e-4, K 4096, m 0.99, T 0.1, linear
head, SplitBN with 8 groups on one device (per device on several).
"""
from moco_jax.config import recipes


def get_config():
  return recipes.cifar10_demo()
