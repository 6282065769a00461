"""MoCo v3 on CIFAR-10 that visibly learns in about 20 minutes on 2 CPU cores.

The CIFAR v3 recipe (configs/moco_v3_vit_cifar10.py) shrunk for a CPU:
vit_cpu (patch 8 on 32×32 images: 16 tokens + the class token, 128-d, 6
blocks, 4 heads), the v3 projector (128-1024-1024-256) and predictor
(256-1024-256) with 1024-wide hidden layers instead of 4096, batch 256, no
queue, symmetric loss × 2T, T 0.2, m₀ 0.99 cosine to 1, the asymmetric v3
augmentation (crop 0.08-1), frozen patch projection, AdamW lr 5e-4 per 256
(the paper's 1.5e-4 is for 300 epochs; a short run gains from more), wd 0.1,
39 steps of warm-up, cosine over 150 steps (~0.8 epoch, ~6 s per step here).

kNN (k 200, t 0.1, on the class token) runs at step 0 and at the last step.

python -m moco_jax.main --config=configs/moco_v3_cpu.py --workdir=runs/v3_cpu \
    --config.data.data_dir=../shared/tfds
"""
from moco_jax.config import recipes_v3


def get_config():
  return recipes_v3.v3_cpu()
