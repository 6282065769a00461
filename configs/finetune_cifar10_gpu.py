"""Fine-tuning on CIFAR-10 on one GPU: the CIFAR demo's ResNet-18 (or any start point), 100 epochs.

The whole network plus a new linear head: SGD momentum 0.9, lr 0.1 per 256
images at batch 256 (the standard supervised CIFAR ResNet recipe's lr 0.1 at
batch 128 halved per image: fine-tuning starts from trained weights), wd 5e-4,
cosine over 100 epochs, RandomResizedCrop(32, 0.08-1) + flip, BN in train
mode, bfloat16 compute, the split on the device. Low-label runs take a
TFDS slice, e.g. --config.data.train_split='train[:10%]'.

python -m moco_jax.finetune --config=configs/finetune_cifar10_gpu.py \
    --workdir=runs/finetune_gpu --config.pretrained=runs/moco_v2_r18_cifar10
"""
from moco_jax.config.finetune import finetune_base_config


def get_config():
  c = finetune_base_config()
  c.dtype = 'bfloat16'
  c.data.on_device = True
  c.train.num_epochs = 100
  c.train.log_every = 50
  c.train.checkpoint_every = 2000
  c.eval.every_epochs = 5
  return c
