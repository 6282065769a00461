"""Fine-tuning of the v3 CPU checkpoint's ViT (vit_cpu) on CIFAR-10 in minutes on 2 CPU cores, DeiT-style.

configs/finetune_vit_imagenet.py (DeiT as moco-v3 used it) shrunk for a CPU
run of a few hundred steps: AdamW lr 5e-4 per 512 images, wd 0.05, half an
epoch of warm-up, cosine, label smoothing 0.1, drop-path 0.1 and random
erasing 0.25 kept; mixup and CutMix off (in a few hundred steps they slow
the fit more than they regularise). RandomResizedCrop(32, 0.08-1) + flip.

python -m moco_jax.finetune --config=configs/finetune_vit_cifar10_cpu.py \
    --workdir=runs/v3_cpu_ft --config.pretrained=runs/v3_cpu \
    --config.data.data_dir=../shared/tfds --config.train.num_steps=300
"""
from moco_jax.config.finetune import finetune_base_config


def get_config():
  c = finetune_base_config()
  c.optim.name = 'adamw'
  c.optim.base_lr = 5e-4 / 2       # 5e-4 per 512 images (DeiT)
  c.optim.weight_decay = 0.05
  c.optim.warmup_epochs = 0.5
  c.finetune.label_smoothing = 0.1
  c.finetune.drop_path = 0.1
  c.finetune.random_erasing = 0.25
  c.train.num_epochs = 2
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.eval.every_epochs = 0.5
  return c
