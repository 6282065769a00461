"""MoCo v3 projector and predictor: MLPs with (synchronised) BatchNorm.

Layout of the reference's _build_mlp, an nn.Sequential: for each layer l,
Linear(bias=False) at index 3l, then BatchNorm1d at 3l + 1 and ReLU at 3l + 2
on hidden layers; the last Linear is followed by BatchNorm1d(affine=False)
when `last_bn`. Our module names are `{prefix}_{index}` with the Sequential's
index and the reference's attribute name as prefix, so convert's naming rule
('_N' -> '.N') gives the reference's names:

  projector, ViT (3 layers)   head_0, head_1, head_3, head_4, head_6, head_7
                              = base_encoder.head.{0,1,3,4,6,7}
  projector, ResNet (2)       fc_0, fc_1, fc_3, fc_4 = base_encoder.fc.*
  predictor (2; last BN ViT)  predictor_0, predictor_1, predictor_3
                              [, predictor_4] = predictor.*

Linear: params {'kernel'} (in, out), no bias. BN: params {'scale', 'bias'}
(absent for the affine-free last BN) and batch_stats {'mean', 'var'}.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from moco_jax.models.heads import dense_init

BACKBONE_KINDS = ('vit', 'resnet')


class SyncBatchNorm(nn.Module):
  """BatchNorm over the batch axis, statistics synchronised over `axis_name`.

  Inside jax.shard_map over `axis_name`, mean and variance are those of the
  global batch (PyTorch's SyncBatchNorm); with axis_name None, those of the
  local batch. Two-pass variance in float32. As in PyTorch, the running
  variance accumulates the UNBIASED batch variance (global sample count), like
  GroupedBatchNorm, so exported weights behave the same in torch.

  Attributes:
    use_running_average: inference mode (normalise with the running stats).
    axis_name: mapped device axis to average statistics over, or None.
    use_affine: learn 'scale' and 'bias' (False: BatchNorm1d(affine=False)).
    momentum: decay of the running averages (PyTorch's momentum 0.1 = 0.9).
    epsilon: added to the variance.
    dtype: output dtype (default: the input's).
  """
  use_running_average: bool = False
  axis_name: Optional[str] = None
  use_affine: bool = True
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x):
    """x: (N, C) -> (N, C)."""
    channels = x.shape[-1]
    running_mean = self.variable('batch_stats', 'mean', jnp.zeros,
                                 (channels,), jnp.float32)
    running_var = self.variable('batch_stats', 'var', jnp.ones,
                                (channels,), jnp.float32)
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      # No collectives while initialising (init runs outside shard_map).
      sync = self.axis_name is not None and not self.is_initializing()
      mean = jnp.mean(xf, axis=0)
      if sync:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.mean(jnp.square(xf - mean), axis=0)
      if sync:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        count = x.shape[0] * (lax.axis_size(self.axis_name) if sync else 1)
        unbiased = var * (count / max(count - 1, 1))
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * unbiased
    y = (xf - mean) * lax.rsqrt(var + self.epsilon)
    if self.use_affine:
      y = y * self.param('scale', nn.initializers.ones, (channels,), jnp.float32)
      y = y + self.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
    return y.astype(self.dtype or x.dtype)


class MLPHead(nn.Module):
  """MoCo v3 MLP: (N, F) -> (N, out_dim) float32.

  Attributes:
    num_layers: Linear layers (projector: 3 for ViT, 2 for ResNet; predictor 2).
    hidden_dim: width of the hidden layers (4096 in the paper).
    out_dim: output width (256).
    last_bn: BatchNorm without affine after the last Linear.
    prefix: module name prefix: the reference's attribute ('head', 'fc',
      'predictor').
    axis_name: mapped device axis for SyncBN, or None (per-call batch stats:
      one device, or outside a mapped context).
    dtype: compute dtype of the Linear layers (BN statistics in float32).
  """
  num_layers: int = 2
  hidden_dim: int = 4096
  out_dim: int = 256
  last_bn: bool = True
  prefix: str = 'layers'
  axis_name: Optional[str] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    """x: (N, F) features -> (N, out_dim) float32."""
    if self.num_layers < 1:
      raise ValueError(f'an MLP head needs at least one layer, got {self.num_layers}')
    x = x.astype(self.dtype)
    for layer in range(self.num_layers):
      last = layer == self.num_layers - 1
      index = 3 * layer
      x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False,
                   dtype=self.dtype, kernel_init=dense_init,
                   name=f'{self.prefix}_{index}')(x)
      if not last or self.last_bn:
        x = SyncBatchNorm(use_running_average=not train,
                          axis_name=self.axis_name, use_affine=not last,
                          dtype=self.dtype,
                          name=f'{self.prefix}_{index + 1}')(x)
      if not last:
        x = nn.relu(x)
    return x.astype(jnp.float32)


def _check_kind(backbone: str):
  if backbone not in BACKBONE_KINDS:
    raise ValueError(f'unknown backbone kind {backbone!r}; valid: '
                     f'{", ".join(BACKBONE_KINDS)}')


def projector(backbone: str, hidden_dim: int = 4096, out_dim: int = 256,
              axis_name: Optional[str] = None, dtype: Any = jnp.float32) -> MLPHead:
  """The reference projector: 3 layers for 'vit' (named head_*), 2 for
  'resnet' (named fc_*), last BN without affine."""
  _check_kind(backbone)
  vit = backbone == 'vit'
  return MLPHead(num_layers=3 if vit else 2, hidden_dim=hidden_dim,
                 out_dim=out_dim, last_bn=True, prefix='head' if vit else 'fc',
                 axis_name=axis_name, dtype=dtype)


def predictor(backbone: str, hidden_dim: int = 4096, out_dim: int = 256,
              axis_name: Optional[str] = None, dtype: Any = jnp.float32) -> MLPHead:
  """The reference predictor: 2 layers named predictor_*, last BN (no affine)
  for 'vit' only."""
  _check_kind(backbone)
  return MLPHead(num_layers=2, hidden_dim=hidden_dim, out_dim=out_dim,
                 last_bn=backbone == 'vit', prefix='predictor',
                 axis_name=axis_name, dtype=dtype)
