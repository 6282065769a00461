"""The semi-supervised protocol: ResNet-50 fine-tuned on 10% of ImageNet's labels (SimCLR's, 30 epochs).

configs/finetune_r50_semisup_1pct.py with imagenet2012_subset/10pct
(128,116 images) and 30 epochs, as SimCLR (arXiv:2002.05709, Appendix B.5).

python -m moco_jax.finetune --config=configs/finetune_r50_semisup_10pct.py \
    --workdir=runs/semisup_10pct --config.pretrained=moco_v2_800ep_pretrain.pth.tar \
    --config.model.arch=resnet50
"""
from moco_jax.config.finetune import semi_supervised_r50


def get_config():
  return semi_supervised_r50(10)
