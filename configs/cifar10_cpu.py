"""MoCo v2 on CIFAR-10 that visibly learns in about 20 minutes on 2 CPU cores.

The CIFAR demo recipe (configs/moco_v2_r18_cifar10.py) shrunk for a CPU:
ResNet-18 (CIFAR stem) at width ×0.125 (8…64 channels, ~0.2M parameters),
v2's MLP head (64-64-128), batch 256, K 4096, m 0.99, T 0.1, the CIFAR
augmentation (crop 0.08–1, flip, jitter p 0.8, grayscale p 0.2, no blur),
SplitBN with 8 groups (8 simulated GPUs), SGD lr 0.06 at 256 (twice the demo's
per-image rate: a short run gains from it), cosine decay over 780 steps
(4 epochs), wd 5e-4.

Time on 2 busy CPU cores: ~1 s per step (~250 images/s), ~45 s per kNN
evaluation (50,000-image bank + 10,000 queries; the first also decodes and
caches the images, ~30 s more). kNN (k 200, t 0.1) runs at step 0, after
epoch 2 and at the end: expect it to rise from the random network's ~28%.

python -m moco_jax.main --config=configs/cifar10_cpu.py --workdir=runs/cifar10_cpu \
    --config.data.data_dir=../shared/tfds
"""
from moco_jax.config_base import base_config


def get_config():
  c = base_config()
  c.model.arch = 'resnet18'
  c.model.width_multiplier = 0.125
  c.model.cifar_stem = True
  c.model.head = 'mlp'
  c.moco.queue_size = 4096
  c.moco.momentum = 0.99
  c.moco.temperature = 0.1
  c.moco.bn_splits = 8
  c.data.dataset = 'cifar10'
  c.data.data_dir = ''
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.crop_scale = (0.08, 1.0)
  c.data.augment = 'cifar'
  c.data.normalization = 'cifar10'
  c.data.cache = True
  c.optim.base_lr = 0.06
  c.optim.weight_decay = 5e-4
  c.train.batch_size = 256
  c.train.num_steps = 780          # 4 epochs of 195 steps
  c.train.log_every = 10
  c.train.checkpoint_every = 195
  c.eval.knn_every = 2             # epochs
  c.eval.knn_at_start = True
  return c
