"""ResNet-18…152 backbones (torchvision's v1.5 layout) in Flax linen.

Module names mirror torchvision (`conv1`, `bn1`, `layer1_0/conv2`,
`layer2_0/downsample_0`, …: torchvision's dots become underscores), so that
weights convert 1:1. Stride sits on the 3×3 conv of a bottleneck (v1.5).
The backbone returns globally average-pooled features; heads live elsewhere.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from moco_jax.models import fast_conv
from moco_jax.models.batch_norm import GroupedBatchNorm

# name -> (block type, blocks per stage)
ARCHS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    'resnet152': ('bottleneck', (3, 8, 36, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}
# torchvision initialises convs with kaiming_normal(mode='fan_out', relu).
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(kernel: int):
  return ((kernel // 2, kernel // 2),) * 2


class BasicBlock(nn.Module):
  """Two 3×3 convs with a residual connection (ResNet-18/34)."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    identity = x
    y = self.conv(self.features, (3, 3), (self.strides,) * 2, _pad(3),
                  name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), (1, 1), _pad(3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      identity = self.conv(self.features, (1, 1), (self.strides,) * 2,
                           _pad(1), name='downsample_0')(x)
      identity = self.norm(name='downsample_1')(identity)
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """1×1 → 3×3 (strided, v1.5) → 1×1 ×4 convs with a residual (ResNet-50+)."""
  features: int
  strides: int
  conv: Any
  norm: Any

  @nn.compact
  def __call__(self, x):
    identity = x
    out_features = self.features * EXPANSION['bottleneck']
    y = self.conv(self.features, (1, 1), (1, 1), _pad(1), name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = self.conv(self.features, (3, 3), (self.strides,) * 2, _pad(3),
                  name='conv2')(y)
    y = nn.relu(self.norm(name='bn2')(y))
    y = self.conv(out_features, (1, 1), (1, 1), _pad(1), name='conv3')(y)
    y = self.norm(name='bn3')(y)
    if self.strides != 1 or x.shape[-1] != out_features:
      identity = self.conv(out_features, (1, 1), (self.strides,) * 2,
                           _pad(1), name='downsample_0')(x)
      identity = self.norm(name='downsample_1')(identity)
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """ResNet backbone.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    width_multiplier: scales every layer's width (stem included), as in the
      MoCo/CPC "R50w2"/"R50w4" (torchvision's wide_resnet widens only the
      bottleneck interior, which is a different network). Fractional
      multipliers (0.25) give narrow nets for CPUs.
    cifar_stem: 3×3 stride-1 first conv and no max-pool (for 32×32 inputs).
    bn_groups: BatchNorm groups in each training-mode batch this module sees
      (per device: moco.bn_groups / devices; see GroupedBatchNorm).
    dtype: compute dtype (params stay float32).
    conv_impl: 'xla', 'fast' (CPU-friendly backward) or 'auto'.
  """
  stage_sizes: Sequence[int]
  block: str = 'bottleneck'
  width_multiplier: float = 1
  cifar_stem: bool = False
  bn_groups: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = 'xla'

  @property
  def num_features(self) -> int:
    """Width of the pooled feature vector (2048 for ResNet-50)."""
    last_stage_width = int(64 * self.width_multiplier) * 2**(len(self.stage_sizes) - 1)
    return last_stage_width * EXPANSION[self.block]

  @nn.compact
  def __call__(self, x, train: bool = True, intermediates: bool = False,
               shuffled_groups=None):
    """x: (N, H, W, 3) normalised images -> (N, num_features) float32.

    intermediates: return instead {'C2', 'C3', 'C4', 'C5', 'pooled'}: the
    output maps of stages 1-4 (strides 4, 8, 16, 32 with the ImageNet stem;
    1, 2, 4, 8 with the CIFAR stem), (N, h, w, channels) in dtype, as the
    detection/segmentation necks of Detectron2 and torchvision consume them
    (res2-res5), and the pooled (N, num_features) float32 features.
    shuffled_groups: None, or every BN layer's groups given per example
    (GroupedBatchNorm.shuffled_groups: shuffle BN by statistics).
    """
    conv = functools.partial(fast_conv.conv_module(self.conv_impl),
                             use_bias=False, dtype=self.dtype,
                             kernel_init=conv_init)
    norm = functools.partial(GroupedBatchNorm, use_running_average=not train,
                             num_groups=self.bn_groups, dtype=self.dtype,
                             shuffled_groups=shuffled_groups)
    block_cls = {'basic': BasicBlock, 'bottleneck': Bottleneck}[self.block]
    width = int(64 * self.width_multiplier)

    x = x.astype(self.dtype)
    if self.cifar_stem:
      x = conv(width, (3, 3), (1, 1), _pad(3), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
    else:
      x = conv(width, (7, 7), (2, 2), _pad(7), name='conv1')(x)
      x = nn.relu(norm(name='bn1')(x))
      x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    maps = {}
    for stage, num_blocks in enumerate(self.stage_sizes):
      for index in range(num_blocks):
        strides = 2 if stage > 0 and index == 0 else 1
        x = block_cls(width * 2**stage, strides, conv, norm,
                      name=f'layer{stage + 1}_{index}')(x)
      maps[f'C{stage + 2}'] = x
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return dict(maps, pooled=pooled) if intermediates else pooled


def resnet(arch: str, **kwargs) -> ResNet:
  """Builds a ResNet by name ('resnet18' … 'resnet152')."""
  if arch not in ARCHS:
    raise ValueError(f'unknown model.arch {arch!r}; valid: {", ".join(ARCHS)}')
  block, stages = ARCHS[arch]
  return ResNet(stage_sizes=stages, block=block, **kwargs)
