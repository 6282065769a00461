"""Projection heads: linear (MoCo v1) and MLP (MoCo v2), no BN.

Names follow the reference: v1 `fc`; v2 `fc_0` → ReLU → `fc_2` (the
reference's nn.Sequential indices), so checkpoints convert by name.
"""
import flax.linen as nn
import jax.numpy as jnp

HEADS = ('linear', 'mlp')
# PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


class ProjectionHead(nn.Module):
  """Maps backbone features (N, F) to projections (N, dim) in float32.

  Attributes:
    kind: 'linear' (v1) or 'mlp' (v2).
    dim: output dimension (128 in the papers).
    hidden_dim: MLP hidden width (the reference uses F, e.g. 2048).
    dtype: compute dtype.
  """
  kind: str = 'mlp'
  dim: int = 128
  hidden_dim: int = 2048
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=dense_init,
                                     name=name)
    if self.kind == 'linear':
      out = dense(self.dim, 'fc')(features)
    elif self.kind == 'mlp':
      hidden = nn.relu(dense(self.hidden_dim, 'fc_0')(features))
      out = dense(self.dim, 'fc_2')(hidden)
    else:
      raise ValueError(f'unknown model.head {self.kind!r}; valid: {", ".join(HEADS)}')
    return out.astype(jnp.float32)
