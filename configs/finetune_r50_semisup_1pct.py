"""The semi-supervised protocol: ResNet-50 fine-tuned on 1% of ImageNet's labels (SimCLR's, 60 epochs).

Defined by SimCLR (Chen et al., arXiv:2002.05709, Appendix B.5) and used by
BYOL, MoCo v2's successors and SimCLRv2 with the same TFDS subsets
(imagenet2012_subset/1pct: 12,811 images): the whole network plus a new
linear head, SGD with Nesterov momentum 0.9, lr 0.05 per 256 images (0.8 at
SimCLR's batch 4096), no warm-up, no regularisation at all (no weight
decay), RandomResizedCrop(224) + flip only, 60 epochs; evaluation resize 256
+ centre crop 224. The schedule is not stated there; SimCLR's code decays
with a cosine, as here. Batch 1024 here (lr scaled linearly, as SimCLR's rule).

python -m moco_jax.finetune --config=configs/finetune_r50_semisup_1pct.py \
    --workdir=runs/semisup_1pct --config.pretrained=moco_v2_800ep_pretrain.pth.tar \
    --config.model.arch=resnet50
"""
from moco_jax.config.finetune import semi_supervised_r50


def get_config():
  return semi_supervised_r50(1)
