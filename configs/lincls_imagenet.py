"""Linear evaluation on ImageNet, the MoCo v1/v2 protocol (v2 R50 200 ep: 67.5 top-1).

python -m moco_jax.lincls --config=configs/lincls_imagenet.py --workdir=OUT \
    --config.pretrained=PRETRAIN_DIR
"""
from moco_jax.config.lincls import lincls_base_config


def get_config():
  return lincls_base_config()
