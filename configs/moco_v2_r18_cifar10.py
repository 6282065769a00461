"""The MoCo CIFAR-10 demo recipe: ResNet-18, 200 epochs, 82.6% kNN in the reference.

Batch 512, lr 0.06 (0.03 per 256), SGD wd 5e-4, K 4096, m 0.99, T 0.1, linear
head, SplitBN with 8 groups on one device (per device on several).
"""
from moco_jax.config_base import base_config


def get_config():
  c = base_config()
  c.model.arch = 'resnet18'
  c.model.cifar_stem = True
  c.model.head = 'linear'
  c.moco.queue_size = 4096
  c.moco.momentum = 0.99
  c.moco.temperature = 0.1
  c.moco.bn_splits = 8
  c.data.dataset = 'cifar10'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.crop_scale = (0.08, 1.0)
  c.data.augment = 'cifar'
  c.data.normalization = 'cifar10'
  c.data.cache = True
  c.optim.weight_decay = 5e-4
  c.train.batch_size = 512
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.eval.knn_every = 1
  return c
