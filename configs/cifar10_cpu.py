"""MoCo v2 on CIFAR-10 that visibly learns in about 20 minutes on 2 CPU cores.

The CIFAR demo recipe (configs/moco_v2_r18_cifar10.py) shrunk for a CPU:
ResNet-18 (CIFAR stem) at width ×0.125 (8…64 channels, ~0.2M parameters),
v2's MLP head (64-64-128), batch 256, K 4096, m 0.99, T 0.1, the CIFAR
augmentation (crop 0.08–1, flip, jitter p 0.8, grayscale p 0.2, no blur),
SplitBN with 8 groups (8 simulated GPUs), SGD lr 0.12 at 256 (four times the
demo's per-image rate: a short run gains from it), cosine decay over 1170
steps (6 epochs), wd 5e-4. The earlier 780 steps at lr 0.06 gained 12.6
kNN points in 12.4 quiet minutes; 6 epochs at twice the lr use the 20-minute
budget (docs/transfer.md has the measured run).

Time on 2 quiet CPU cores: ~0.7 s per step (~360 images/s), ~45 s per kNN
evaluation (50,000-image bank + 10,000 queries; the first also decodes and
caches the images, ~30 s more). kNN (k 200, t 0.1) runs at step 0, after
epoch 3 and at the end: expect it to rise from the random network's ~28%.

python -m moco_jax.main --config=configs/cifar10_cpu.py --workdir=runs/cifar10_cpu \
    --config.data.data_dir=../shared/tfds
"""
from moco_jax.config import recipes


def get_config():
  return recipes.cifar10_cpu()
