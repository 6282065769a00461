"""Encoders: ResNet and ViT backbones, projection heads, MoCo v3's heads."""
from moco_jax.models.encoder import (ENCODER_HEADS, Encoder, build_backbone,
                                     build_encoder, frozen_params, is_vit)
from moco_jax.models.heads import ProjectionHead
from moco_jax.models.resnet import ARCHS, ResNet, resnet
from moco_jax.models.v3_heads import MLPHead, predictor, projector
# Not the function `vit`: it would hide the submodule moco_jax.models.vit.
from moco_jax.models.vit import ARCHS as VIT_ARCHS, ViT
