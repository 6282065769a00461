"""BatchNorm whose batch statistics can be computed per group of samples.

With `num_groups = S` a batch of N samples is normalised as S independent
groups of N/S samples: the one-device stand-in for S devices each normalising
its own shard (the MoCo CIFAR demo's SplitBatchNorm, "ghost" BN). Running
statistics are averaged over the groups; inference uses them as plain BN.

With `shuffled_groups` the groups are not contiguous and may span devices:
shuffle BN by statistics (moco.shuffle_bn_mode='statistics'). Each example
is normalised with the statistics of the BN group the step's permutation puts
it in, computed from per-group partial sums psum'ed over the device axis, so
only G × C numbers per layer cross devices instead of the batch of images.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def _stats_dtype(dtype):
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def _center(x, num_groups):
  """x: (N, ..., C) -> (x - mean, mean) as (S, N/S * ..., C) and (S, 1, C)."""
  xf = x.astype(_stats_dtype(x.dtype)).reshape(num_groups, -1, x.shape[-1])
  mean = jnp.mean(xf, axis=1, keepdims=True)
  return xf - mean, mean


def _normalize_fwd(x, scale, bias, num_groups, epsilon, out_dtype):
  xc, mean = _center(x, num_groups)
  # Two passes over x (mean, then variance of x - mean): a single-pass
  # E[x^2] - E[x]^2 loses precision when |mean| >> std.
  var = jnp.mean(jnp.square(xc), axis=1, keepdims=True)
  rstd = lax.rsqrt(var + epsilon)
  y = (xc * (scale * rstd) + bias).astype(out_dtype).reshape(x.shape)
  return (y, mean[:, 0], var[:, 0]), (x, mean, rstd, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _normalize(x, scale, bias, num_groups, epsilon, out_dtype):
  """Per-group batch normalisation of x: (N, ..., C); scale, bias: (C,).

  Returns y (x's shape, out_dtype) and the groups' mean and biased variance,
  (num_groups, C), float32 (float64 for float64 x).

  The VJP is written out: two reductions over (g, x - mean) and one
  elementwise pass for dx. Autodiff's version of the same maths is a chain of
  broadcasts and reductions, 2-5x slower on CPU.
  """
  return _normalize_fwd(x, scale, bias, num_groups, epsilon, out_dtype)[0]


def _normalize_bwd(num_groups, epsilon, out_dtype, res, cotangents):
  x, mean, rstd, scale = res
  gy, gmean, gvar = cotangents
  gy = gy.astype(mean.dtype).reshape(num_groups, -1, x.shape[-1])
  xc = x.astype(mean.dtype).reshape(gy.shape) - mean
  m = gy.shape[1]
  sum_g = jnp.sum(gy, axis=1, keepdims=True)              # (S, 1, C)
  sum_gxc = jnp.sum(gy * xc, axis=1, keepdims=True)
  a = scale * rstd
  # dx = a * (g - mean(g) - xhat * mean(g * xhat)) plus the terms of the
  # mean and variance outputs, as one affine map of (g, x - mean).
  coef_xc = (2 * gvar[:, None] - a * rstd * rstd * sum_gxc) / m
  offset = (gmean[:, None] - a * sum_g) / m
  dx = gy * a + xc * coef_xc + offset
  dscale = jnp.sum(sum_gxc * rstd, axis=(0, 1))
  dbias = jnp.sum(sum_g, axis=(0, 1))
  return (dx.astype(x.dtype).reshape(x.shape), dscale.astype(scale.dtype),
          dbias.astype(scale.dtype))


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def shuffled_group_normalize(x, scale, bias, group_ids, num_groups: int, axis_name,
                             epsilon, out_dtype):
  """BatchNorm forward with statistics per BN group, the group given per example.

  Args:
    x: (N, ..., C) this device's examples (any float dtype).
    scale, bias: (C,) float32.
    group_ids: (N,) int32 in [0, num_groups), the BN group of each example
      (a group may hold examples of several devices).
    num_groups: G, the BN groups of the whole batch over `axis_name`.
    axis_name: the mapped device axis the groups span (None: this device only).
    epsilon: added to the variance; out_dtype: dtype of y.

  Returns:
    (y in x's shape and out_dtype, (G, C) group means, (G, C) biased group
    variances, float32). Two passes (mean, then the mean of (x - mean)^2), as
    `_normalize`. Exact float32 sums and gathers (no matmul, whose default
    TPU precision is bfloat16). Forward only: the key encoder takes no gradient.
  """
  def group_sum(per_example):   # (N, ...) -> (G, ...), summed over devices
    total = jax.ops.segment_sum(per_example, group_ids, num_segments=num_groups)
    return total if axis_name is None else lax.psum(total, axis_name)

  xf = x.astype(_stats_dtype(x.dtype)).reshape(x.shape[0], -1, x.shape[-1])
  devices = 1 if axis_name is None else lax.axis_size(axis_name)
  count = x.shape[0] * devices // num_groups * xf.shape[1]   # values per group
  mean = group_sum(jnp.sum(xf, axis=1)) / count
  xc = xf - mean[group_ids][:, None, :]
  var = group_sum(jnp.sum(jnp.square(xc), axis=1)) / count
  rstd = lax.rsqrt(var + epsilon)[group_ids][:, None, :]
  y = (xc * (scale * rstd) + bias).astype(out_dtype).reshape(x.shape)
  return y, mean, var


class GroupedBatchNorm(nn.Module):
  """BatchNorm over the batch axis, optionally per group of samples.

  Attributes:
    use_running_average: inference mode (normalise with the running stats).
    num_groups: number of sample groups with their own statistics; must
      divide the batch size.
    momentum: decay of the running averages (PyTorch's momentum 0.1 = 0.9).
    epsilon: added to the variance.
    dtype: output dtype; statistics are computed in float32 (float64 for
      float64 inputs).
    scale_init: initialiser of the scale (gamma).
    shuffled_groups: None, or (group_ids, G, axis_name): each example's BN
      group ((N,) int32), the groups of the whole batch and the device axis
      they span (shuffle BN by statistics, see `shuffled_group_normalize`);
      replaces num_groups' contiguous groups. Training mode only.

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
  shuffled_groups: Any = None

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
    if self.shuffled_groups is not None:
      group_ids, groups, axis_name = self.shuffled_groups
      y, mean, var = shuffled_group_normalize(
          x, scale, bias, group_ids, groups, axis_name, self.epsilon,
          jnp.dtype(out_dtype))
      devices = 1 if axis_name is None else lax.axis_size(axis_name)
      examples_per_group = batch * devices // groups   # every group the same size
    elif batch % self.num_groups:
      raise ValueError(f'batch of {batch} samples cannot be split into '
                       f'num_groups={self.num_groups} BatchNorm groups')
    else:
      y, mean, var = _normalize(x, scale, bias, self.num_groups, self.epsilon,
                                jnp.dtype(out_dtype))
      examples_per_group = batch // self.num_groups
    if not self.is_initializing():
      samples_per_group = examples_per_group * (x.size // (batch * channels))
      unbiased = samples_per_group / max(samples_per_group - 1, 1)
      mean, var = (s.mean(0).astype(jnp.float32) for s in (mean, var))
      m = self.momentum
      running_mean.value = m * running_mean.value + (1 - m) * mean
      running_var.value = m * running_var.value + (1 - m) * var * unbiased
    return y
