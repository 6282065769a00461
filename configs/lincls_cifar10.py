"""Linear evaluation on CIFAR-10 with the ImageNet protocol's optimiser.

Frozen backbone (BN in inference mode), linear layer N(0, 0.01), SGD lr 30,
momentum 0.9, no weight decay, batch 256, 100 epochs, ×0.1 at 60 and 80.
Train: RandomResizedCrop(32, scale 0.08–1) + flip; eval: the full 32×32 image.

python -m moco_jax.lincls --config=configs/lincls_cifar10.py --workdir=OUT \
    --config.pretrained=PRETRAIN_DIR --config.data.data_dir=../shared/tfds
"""
from moco_jax.config.lincls import lincls_base_config


def get_config():
  c = lincls_base_config()
  c.data.dataset = 'cifar10'
  c.data.eval_split = 'test'
  c.data.image_size = 32
  c.data.cache = True
  c.train.log_every = 20
  c.train.checkpoint_every = 500
  return c
