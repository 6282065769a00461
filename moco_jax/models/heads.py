"""Projection heads: linear (MoCo v1) and MLP (MoCo v2), no BN.

Names follow the reference: v1 `fc`; v2 `fc_0` → ReLU → `fc_2` (the
reference's nn.Sequential indices), so checkpoints convert by name.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

HEADS = ('linear', 'mlp')
# PyTorch's nn.Linear default: weight and bias both U(-1/sqrt(fan_in),
# 1/sqrt(fan_in)), fan_in the layer's input width.
dense_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def torch_bias_init(fan_in: int):
  """nn.Linear's bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


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
  def __call__(self, features, train: bool = True):
    """train: unused (no BN), for the heads' common interface."""
    del train
    dense = lambda n, fan_in, name: nn.Dense(
        n, dtype=self.dtype, kernel_init=dense_init,
        bias_init=torch_bias_init(fan_in), name=name)
    if self.kind == 'linear':
      out = dense(self.dim, features.shape[-1], 'fc')(features)
    elif self.kind == 'mlp':
      hidden = nn.relu(dense(self.hidden_dim, features.shape[-1], 'fc_0')(features))
      out = dense(self.dim, self.hidden_dim, 'fc_2')(hidden)
    else:
      raise ValueError(f'unknown model.head {self.kind!r}; valid: {", ".join(HEADS)}')
    return out.astype(jnp.float32)
