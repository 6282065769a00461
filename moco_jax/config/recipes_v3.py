"""MoCo v3 recipes (arXiv:2104.02057; facebookresearch/moco-v3's CONFIG.md),
shared by configs/moco_v3_*.py.

Every v3 recipe: no queue (moco.queue_size = 0: the global batch's keys are
the negatives, loss × 2T), the symmetric loss, the v3 projector (hidden 4096,
out 256, SyncBN) and predictor on the query branch, a cosine momentum
schedule from m₀ = 0.99 to 1, the asymmetric v3 augmentation, no shuffle BN.
"""
import ml_collections

from moco_jax.config.base import base_config


def v3_base() -> ml_collections.ConfigDict:
  c = base_config()
  c.model.head = 'v3'
  c.model.head_hidden_dim = 4096
  c.model.dim = 256
  c.model.predictor = True
  c.moco.queue_size = 0
  c.moco.symmetric = True
  c.moco.shuffle_bn = False
  c.moco.momentum = 0.99
  c.moco.momentum_schedule = 'cosine'
  c.data.augment = 'v3'
  c.data.crop_scale = (0.08, 1.0)
  c.optim.schedule = 'cosine'
  return c


def vit_imagenet(arch: str) -> ml_collections.ConfigDict:
  """ViT-S/B, ImageNet, 300 epochs (linear top-1 73.2 / 76.7 in the paper):
  AdamW lr 1.5e-4 per 256 (2.4e-3 at 4096), wd 0.1, 40 warm-up epochs then
  cosine, batch 4096 (1024 on one 8-GPU node), T 0.2, frozen random patch
  projection (stop_grad_conv1)."""
  c = v3_base()
  c.model.arch = arch
  c.model.stop_grad_conv1 = True
  c.moco.temperature = 0.2
  c.optim.name = 'adamw'
  c.optim.base_lr = 1.5e-4
  c.optim.weight_decay = 0.1
  c.optim.warmup_epochs = 40.0
  c.train.batch_size = 4096
  c.train.num_epochs = 300
  return c


def r50_imagenet() -> ml_collections.ConfigDict:
  """ResNet-50, ImageNet, 100 epochs (68.9 linear top-1 in the paper; 300 ep
  72.8 with lr 0.3, 1000 ep 74.6 with lr 0.3, wd 1.5e-6, m₀ 0.996): LARS lr
  0.6 per 256 (9.6 at 4096), wd 1e-6 (none on biases and BN), 10 warm-up
  epochs then cosine, batch 4096, T 1.0, crops at scale (0.2, 1)."""
  c = v3_base()
  c.model.arch = 'resnet50'
  c.moco.temperature = 1.0
  c.data.crop_scale = (0.2, 1.0)
  c.optim.name = 'lars'
  c.optim.base_lr = 0.6
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-6
  c.optim.warmup_epochs = 10.0
  c.train.batch_size = 4096
  c.train.num_epochs = 100
  return c


def vit_cifar10() -> ml_collections.ConfigDict:
  """ViT-S at patch 4 (8×8 tokens) on CIFAR-10 at 32×32, with the ViT
  recipe's optimiser scaled to batch 512. The paper has no CIFAR recipe: our
  extrapolation, not a measured one."""
  c = vit_imagenet('vit_small_cifar')
  c.data.dataset = 'cifar10'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.normalization = 'cifar10'
  c.data.cache = True
  c.train.batch_size = 512
  c.train.num_epochs = 300
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  c.eval.knn_every = 10
  return c


def v3_cpu() -> ml_collections.ConfigDict:
  """The CIFAR-10 v3 recipe shrunk to learn visibly in ~20 minutes on 2 CPU
  cores (configs/moco_v3_cpu.py explains the choices)."""
  c = vit_cifar10()
  c.model.arch = 'vit_cpu'
  c.model.head_hidden_dim = 1024
  c.optim.base_lr = 5e-4
  c.optim.warmup_epochs = 0.2      # 39 steps
  c.train.batch_size = 256
  c.train.num_steps = 150          # ~0.8 epoch: ~15 min at ~6 s per step
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.eval.knn_every = 1             # epochs: here only at the last step
  c.eval.knn_at_start = True
  return c
