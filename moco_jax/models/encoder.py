"""The MoCo encoder: backbone + projection head, built from a config."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from moco_jax.models.heads import ProjectionHead
from moco_jax.models.resnet import ResNet, resnet


class Encoder(nn.Module):
  """f_q / f_k: images (N, H, W, 3) -> projections (N, dim), float32.

  Params are {'backbone': …, 'head': …}; `features` gives the backbone's
  pooled features alone (what evaluation and export use).
  """
  backbone: ResNet
  head: ProjectionHead

  def __call__(self, images, train: bool = True):
    return self.head(self.backbone(images, train=train))

  def features(self, images, train: bool = False):
    return self.backbone(images, train=train)


def build_encoder(model_config, bn_splits: int = 1, dtype: Any = jnp.float32,
                  conv_impl: str = 'xla') -> Encoder:
  """Encoder from the `model` config section (arch, width_multiplier,
  cifar_stem, head, head_hidden_dim, dim)."""
  backbone = resnet(model_config.arch,
                    width_multiplier=model_config.width_multiplier,
                    cifar_stem=model_config.cifar_stem, bn_splits=bn_splits,
                    dtype=dtype, conv_impl=conv_impl)
  hidden = model_config.head_hidden_dim or backbone.num_features
  head = ProjectionHead(kind=model_config.head, dim=model_config.dim,
                        hidden_dim=hidden, dtype=dtype)
  return Encoder(backbone=backbone, head=head)
