"""Encoders: ResNet backbones and projection heads."""
from moco_jax.models.encoder import Encoder, build_encoder
from moco_jax.models.heads import ProjectionHead
from moco_jax.models.resnet import ARCHS, ResNet, resnet
