"""The MoCo encoder: backbone + projection head (+ the v3 predictor), built
from a config."""
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from moco_jax.models import v3_heads
from moco_jax.models.heads import HEADS, ProjectionHead
from moco_jax.models.resnet import resnet
from moco_jax.models.vit import ARCHS as VIT_ARCHS, vit

# 'linear' (v1), 'mlp' (v2), 'v3' (MoCo v3's projector: MLP with SyncBN).
ENCODER_HEADS = HEADS + ('v3',)
V3_HIDDEN_DIM = 4096          # the paper's projector and predictor width


def is_vit(arch: str) -> bool:
  return arch in VIT_ARCHS


class Encoder(nn.Module):
  """f_q / f_k: images (N, H, W, 3) -> projections (N, dim), float32.

  Params are {'backbone', 'head'} (+ 'predictor' for MoCo v3's query
  encoder); `features` gives the backbone's features alone (pooled for a
  ResNet, the class token for a ViT: what evaluation and export use).
  """
  backbone: nn.Module
  head: nn.Module
  predictor: Optional[nn.Module] = None

  def __call__(self, images, train: bool = True, predict: bool = False,
               shuffled_groups=None):
    """predict: also apply the predictor (v3's query branch; the key
    encoder and evaluation leave it out). Ignored without a predictor.
    shuffled_groups: a ResNet backbone's BN groups per example (shuffle BN
    by statistics; see models.batch_norm.GroupedBatchNorm)."""
    extra = {} if shuffled_groups is None else {'shuffled_groups': shuffled_groups}
    z = self.head(self.backbone(images, train=train, **extra), train=train)
    if predict and self.predictor is not None:
      z = self.predictor(z, train=train)
    return z

  def features(self, images, train: bool = False):
    return self.backbone(images, train=train)


def build_backbone(model_config, bn_groups: int = 1, dtype: Any = jnp.float32,
                   conv_impl: str = 'xla', image_size: int = 224) -> nn.Module:
  """ResNet (resnet*) or ViT (vit_*) from the `model` config section.

  image_size: training resolution (a ViT's exported position embedding grid;
  a multiple of its patch size). bn_groups, conv_impl: ResNet only.
  """
  arch = model_config.arch
  if is_vit(arch):
    return vit(arch, image_size=image_size, dtype=dtype,
               stop_grad_conv1=model_config.get('stop_grad_conv1', False))
  return resnet(arch, width_multiplier=model_config.width_multiplier,
                cifar_stem=model_config.cifar_stem, bn_groups=bn_groups,
                dtype=dtype, conv_impl=conv_impl)


def frozen_params(model_config) -> tuple:
  """Param paths the optimiser must leave alone: a ViT's patch projection
  with model.stop_grad_conv1 (MoCo v3), else none."""
  if is_vit(model_config.arch) and model_config.get('stop_grad_conv1', False):
    return (('backbone', 'patch_embed'),)
  return ()


def build_encoder(model_config, bn_groups: int = 1, dtype: Any = jnp.float32,
                  conv_impl: str = 'xla', image_size: int = 224,
                  axis_name: Optional[str] = None) -> Encoder:
  """Encoder from the `model` config section (arch, width_multiplier,
  cifar_stem, head, head_hidden_dim, dim, predictor, stop_grad_conv1).

  bn_groups: BN groups in each training-mode batch the encoder is applied to,
  i.e. per device (`Experiment` derives it from moco.bn_groups and the device
  count). Inference (BN with running statistics) ignores it: 1 will do.
  axis_name: the mapped device axis over which the v3 heads' SyncBN averages
  batch statistics ('data' inside the training step); None for an encoder
  applied outside a mapped context (inference, or one device).
  """
  backbone = build_backbone(model_config, bn_groups, dtype, conv_impl, image_size)
  kind = 'vit' if is_vit(model_config.arch) else 'resnet'
  predictor = None
  if model_config.head == 'v3':
    hidden = model_config.head_hidden_dim or V3_HIDDEN_DIM
    head = v3_heads.projector(kind, hidden_dim=hidden, out_dim=model_config.dim,
                              axis_name=axis_name, dtype=dtype)
    if model_config.get('predictor', False):
      predictor = v3_heads.predictor(kind, hidden_dim=hidden,
                                     out_dim=model_config.dim,
                                     axis_name=axis_name, dtype=dtype)
  else:
    hidden = model_config.head_hidden_dim or backbone.num_features
    head = ProjectionHead(kind=model_config.head, dim=model_config.dim,
                          hidden_dim=hidden, dtype=dtype)
  return Encoder(backbone=backbone, head=head, predictor=predictor)
