"""Linear evaluation of a MoCo v3 ViT on ImageNet, the protocol of the
reference's main_lincls.py (arXiv:2104.02057; ViT-S 73.2, ViT-B 76.7 top-1).

Frozen backbone, its final-norm class token as the feature (no BN before the
classifier: a plain Linear, weights N(0, 0.01), bias 0), SGD momentum 0.9, no
weight decay, lr 3 per 256 images (scaled by the batch: 12 at 1024; `--lr=3`
in moco-v3's CONFIG.md for ViT-S and ViT-B), batch 1024, 90 epochs, cosine
decay without warm-up (the reference decays per epoch, we per step),
RandomResizedCrop(224) + flip; eval resize 256, center crop 224. The backbone
is checked unchanged at the end, as the reference does.

python -m moco_jax.lincls --config=configs/lincls_v3_vit_imagenet.py --workdir=OUT \
    --config.pretrained=PRETRAIN_DIR
"""
from moco_jax.config.lincls import lincls_v3_config


def get_config():
  return lincls_v3_config(base_lr=3.0)   # per 256 images: 12 at batch 1024
