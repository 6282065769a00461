"""Recipes shared by configs/ and the Colab notebook.

configs/ is not part of the installed package, so a notebook that pip
installed moco_jax builds its config from here.
"""
import ml_collections

from moco_jax.config.base import base_config


def cifar10_demo() -> ml_collections.ConfigDict:
  """The MoCo CIFAR-10 demo: ResNet-18 (CIFAR stem), 200 epochs, 82.6% kNN in
  the reference.

  Batch 512, lr 0.06 (0.03 per 256), SGD wd 5e-4, K 4096, m 0.99, T 0.1,
  linear head, 8 BN groups of 64 (the demo's SplitBN 8, on any device count
  dividing 8), crops at scale (0.08, 1), the CIFAR colour augmentation (no
  blur), kNN on the L2-normalised 128-d head output (the demo's monitor).
  """
  c = base_config()
  c.model.arch = 'resnet18'
  c.model.cifar_stem = True
  c.model.head = 'linear'
  c.moco.queue_size = 4096
  c.moco.momentum = 0.99
  c.moco.temperature = 0.1
  c.data.dataset = 'cifar10'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.crop_scale = (0.08, 1.0)
  c.data.augment = 'cifar'
  c.data.normalization = 'cifar10'
  c.data.cache = True              # CIFAR-10 fits in memory
  # The split on the accelerator, cropped there: no host pipeline to wait for
  # (BENCHMARKS.md); 'auto' keeps the host path where it does not fit.
  c.data.on_device = 'auto'
  c.optim.weight_decay = 5e-4
  c.train.batch_size = 512
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.eval.knn_every = 1
  c.eval.knn_features = 'head'
  return c


def cifar10_cpu() -> ml_collections.ConfigDict:
  """The demo shrunk to learn visibly in ~20 minutes on 2 CPU cores
  (configs/cifar10_cpu.py explains the choices): width ×0.125, MLP head,
  batch 256 at lr 0.12 per 256, 1170 steps, kNN at the start and every 3
  epochs."""
  c = cifar10_demo()
  c.model.width_multiplier = 0.125
  c.model.head = 'mlp'
  c.optim.base_lr = 0.12
  c.train.batch_size = 256
  c.train.num_steps = 1170         # 6 epochs of 195 steps
  c.train.log_every = 10
  c.train.checkpoint_every = 195
  c.eval.knn_every = 3             # epochs
  c.eval.knn_at_start = True
  # The CPU figures in docs/evaluation.md are kNN on the backbone's 64-d features.
  c.eval.knn_features = 'backbone'
  return c
