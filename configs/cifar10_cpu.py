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
from moco_jax.config import recipes


def get_config():
  return recipes.cifar10_cpu()
