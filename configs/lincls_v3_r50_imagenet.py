"""Linear evaluation of a MoCo v3 ResNet-50 on ImageNet, the protocol of the
reference's main_lincls.py defaults (arXiv:2104.02057; R50 100/300/1000 ep:
68.9/72.8/74.6 top-1).

Checked against facebookresearch/moco-v3 main_lincls.py: SGD lr 0.1 per 256
images (init_lr = lr x batch / 256: 0.4 at batch 1024), momentum 0.9, weight
decay 0, batch 1024, 90 epochs, cosine decay to 0 without warm-up (the
reference steps it per epoch, we per step), a new fc N(0, 0.01) with bias 0
on the frozen backbone (BN in eval mode), RandomResizedCrop(224) + flip;
evaluation resize 256 + center crop 224; the best epoch's top-1 is kept
beside the last (best_acc1). Not the v1/v2 protocol (lr 30, step decay).

python -m moco_jax.lincls --config=configs/lincls_v3_r50_imagenet.py --workdir=OUT \
    --config.pretrained=PRETRAIN_DIR
"""
from moco_jax.config.lincls import lincls_v3_config


def get_config():
  return lincls_v3_config(base_lr=0.1)   # per 256 images: 0.4 at batch 1024
