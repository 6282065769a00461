"""Fine-tuning on CIFAR-10 that finishes in minutes on 2 CPU cores (the transfer page's protocol).

The whole network (the quickstart's ResNet-18 x0.125, or any start point)
plus a new linear head, trained end to end for a fixed budget of 100 steps
of batch 128 whatever the labelled fraction: SGD momentum 0.9, lr 0.1 per
256 images (0.05 at 128), wd 5e-4, cosine to 0, no warm-up, BN in train
mode, RandomResizedCrop(32, 0.08-1) + flip, no mixup or smoothing: the CIFAR
demo's optimiser family (SGD, wd 5e-4, cosine) at a supervised lr. Top-1 on
the 10,000 test images at the end. Low-label runs take a TFDS slice of the
training split, e.g. --config.data.train_split='train[:1%]' (500 images: the
first 1%, not class-balanced), and compare with --config.init=random.

python -m moco_jax.finetune --config=configs/finetune_cifar10_cpu.py \
    --workdir=runs/finetune_10pct --config.pretrained=runs/quickstart \
    --config.data.data_dir=../shared/tfds --config.data.train_split='train[:10%]'
"""
from moco_jax.config.finetune import finetune_base_config


def get_config():
  c = finetune_base_config()
  c.train.batch_size = 128
  c.train.num_steps = 100
  c.train.log_every = 10
  c.train.checkpoint_every = 50
  c.eval.every_epochs = 0          # only at the end
  return c
