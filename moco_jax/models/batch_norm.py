"""BatchNorm whose batch statistics can be computed per group of samples.

With `num_groups = S` a batch of N samples is normalised as S independent
groups of N/S samples: the one-device stand-in for S devices each normalising
its own shard (the MoCo CIFAR demo's SplitBatchNorm, "ghost" BN). Running
statistics are averaged over the groups; inference uses them as plain BN.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class GroupedBatchNorm(nn.Module):
  """BatchNorm over the batch axis, optionally per group of samples.

  Attributes:
    use_running_average: inference mode (normalise with the running stats).
    num_groups: number of sample groups with their own statistics; must
      divide the batch size.
    momentum: decay of the running averages (PyTorch's momentum 0.1 = 0.9).
    epsilon: added to the variance.
    dtype: output dtype; statistics are always computed in float32.
    scale_init: initialiser of the scale (gamma).

  The params ('scale', 'bias') and batch_stats ('mean', 'var') have
  flax.linen.BatchNorm's names and shapes (C,). As in PyTorch, the running
  variance accumulates the unbiased batch variance, so exported weights behave
  the same in torchvision.
  """
  use_running_average: bool = False
  num_groups: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    """x: (N, ..., C) -> same shape, in `dtype` (or x's dtype)."""
    channels = x.shape[-1]
    scale = self.param('scale', self.scale_init, (channels,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros,
                                 (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones,
                                (channels,), jnp.float32)
    out_dtype = self.dtype or x.dtype

    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
      y = (x.astype(jnp.float32) - mean) * (scale * jnp.reciprocal(
          jnp.sqrt(var + self.epsilon))) + bias
      return y.astype(out_dtype)

    batch = x.shape[0]
    if batch % self.num_groups:
      raise ValueError(f'batch of {batch} samples cannot be split into '
                       f'num_groups={self.num_groups} BatchNorm groups')
    grouped = x.astype(jnp.float32).reshape(
        (self.num_groups, batch // self.num_groups) + x.shape[1:])
    reduce_axes = tuple(range(1, grouped.ndim - 1))
    mean = grouped.mean(axis=reduce_axes, keepdims=True)       # (S,1,..,C)
    var = jnp.square(grouped - mean).mean(axis=reduce_axes, keepdims=True)
    y = (grouped - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    y = (y * scale + bias).reshape(x.shape)

    if not self.is_initializing():
      samples_per_group = grouped.size // (self.num_groups * channels)
      unbiased = samples_per_group / max(samples_per_group - 1, 1)
      group_mean = mean.reshape(self.num_groups, channels).mean(axis=0)
      group_var = var.reshape(self.num_groups, channels).mean(axis=0)
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * group_mean
      running_var.value = m * running_var.value + (1 - m) * group_var * unbiased
    return y.astype(out_dtype)
