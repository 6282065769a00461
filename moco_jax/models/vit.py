"""Vision Transformer backbones (timm's VisionTransformer layout) in Flax linen.

The MoCo v3 ViT: patch embedding, class token, a FIXED 2-D sin-cos position
embedding, pre-norm transformer blocks, a final LayerNorm; the backbone returns
the normalised class token (N, D), as ResNet returns pooled features.

Module names are timm's with '_' for '.', so every array maps 1:1 to a timm
state_dict entry (see moco_jax/weights/timm.py):

  patch_embed/proj/{kernel,bias}       patch_embed.proj.{weight,bias}
  cls_token (1, 1, D)                  cls_token
  (a constant, not a param)            pos_embed (1, 1 + N, D)
  blocks_{i}/norm1, norm2 {scale,bias} blocks.{i}.norm1, norm2 {weight,bias}
  blocks_{i}/attn/qkv, attn/proj       blocks.{i}.attn.qkv, attn.proj
  blocks_{i}/mlp/fc1, mlp/fc2          blocks.{i}.mlp.fc1, mlp.fc2
  norm {scale,bias}                    norm.{weight,bias}

The position embedding is a function of the token grid alone, so it is
computed in the forward pass (a trace-time constant: no gradient, no weight
decay, nothing to checkpoint) and written out only on export.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ViTSpec:
  """patch: patch side; dim: embedding width D; depth: blocks; heads: attention heads."""
  patch: int
  dim: int
  depth: int
  heads: int


ARCHS = {
    # MoCo v3's ImageNet models (224×224 → 14×14 patches). MoCo v3's ViT-S has
    # 12 heads (timm's vit_small has 6); the parameter count is the same.
    'vit_tiny': ViTSpec(16, 192, 12, 3),
    'vit_small': ViTSpec(16, 384, 12, 12),
    'vit_base': ViTSpec(16, 768, 12, 12),
    # The same widths at patch 4 for 32×32 images (CIFAR: 8×8 patches).
    'vit_tiny_cifar': ViTSpec(4, 192, 12, 3),
    'vit_small_cifar': ViTSpec(4, 384, 12, 12),
    # A small model for CPU runs on 32×32 images (4×4 patches of 8×8 pixels):
    # ~4x the training throughput of D 192 at patch 4 on a 2-core CPU.
    'vit_cpu': ViTSpec(8, 128, 6, 4),
}
MLP_RATIO = 4
LAYER_NORM_EPS = 1e-6          # timm's ViT default
POS_TEMPERATURE = 10000.


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """MoCo v3's fixed 2-D sin-cos position embedding, class slot included.

  Transcribes the reference's build_2d_sincos_position_embedding (float32 as
  there): with ω_d = 1 / 10000^(d / (D/4)), d < D/4, and the token grid
  enumerated as torch.meshgrid(arange(w), arange(h)) ('ij' indexing) does,
  token m gets [sin(a ω), cos(a ω), sin(b ω), cos(b ω)] with a = m // grid_h,
  b = m % grid_h. On a square grid, a is the token's row and b its column
  (the reference calls them w and h). The class token's slot is zero.

  Args:
    grid_h, grid_w: patches per column and per row.
    dim: embedding width D, a multiple of 4.

  Returns:
    (1, 1 + grid_h * grid_w, dim) float32.
  """
  if dim % 4:
    raise ValueError(f'the 2-D sin-cos position embedding needs a width that '
                     f'is a multiple of 4, got {dim}')
  quarter = dim // 4
  omega = np.arange(quarter, dtype=np.float32) / np.float32(quarter)
  omega = (np.float32(1) / np.float32(POS_TEMPERATURE)**omega).astype(np.float32)
  a, b = np.meshgrid(np.arange(grid_w, dtype=np.float32),
                     np.arange(grid_h, dtype=np.float32), indexing='ij')
  out_a = np.outer(a.reshape(-1), omega)
  out_b = np.outer(b.reshape(-1), omega)
  tokens = np.concatenate([np.sin(out_a), np.cos(out_a), np.sin(out_b),
                           np.cos(out_b)], axis=1)
  cls_slot = np.zeros((1, dim), np.float32)
  return np.concatenate([cls_slot, tokens], axis=0)[None].astype(np.float32)


def qkv_init(key, shape, dtype=jnp.float32):
  """Xavier-uniform of q, k and v as three (D, D) matrices: U(±sqrt(6 / 2D)).

  shape: (D, 3D), our (in, out) kernel layout.
  """
  fan_in, fan_out = shape[0], shape[1] // 3
  bound = np.sqrt(6. / (fan_in + fan_out))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def patch_init(key, shape, dtype=jnp.float32):
  """The reference's patch projection init: U(±sqrt(6 / (3·p·p + D))).

  shape: (p, p, 3, D), HWIO. Not torch's conv xavier (whose fan_out would be
  D·p·p): the projection is treated as a (3·p·p → D) linear map.
  """
  kh, kw, cin, cout = shape
  bound = np.sqrt(6. / (cin * kh * kw + cout))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


dense_init = nn.initializers.xavier_uniform()


def _layer_norm(name):
  # Statistics and output in float32 (two-pass variance, as torch).
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32,
                      use_fast_variance=False, name=name)


class PatchProjection(nn.Module):
  """Non-overlapping p×p patches → D: timm's Conv2d(3, D, p, stride p).

  Params 'kernel' (p, p, 3, D) HWIO and 'bias' (D,), as nn.Conv's. Written as
  one matmul over flattened patches (the same map as the strided conv).

  Attributes:
    features: D.
    patch: p.
    stop_gradient: freeze kernel and bias (MoCo v3's stop_grad_conv1): their
      gradients are exactly zero.
    dtype: compute dtype.
  """
  features: int
  patch: int
  stop_gradient: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (N, H, W, C) -> (N, H/p, W/p, D) in dtype."""
    n, h, w, c = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f'image size {h}x{w} is not a multiple of the patch '
                       f'size {p}')
    kernel = self.param('kernel', patch_init, (p, p, c, self.features),
                        jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      jnp.float32)
    if self.stop_gradient:
      kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
    patches = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, h // p, w // p, p * p * c).astype(self.dtype)
    y = jnp.dot(patches, kernel.reshape(p * p * c, -1).astype(self.dtype))
    return y + bias.astype(self.dtype)


class PatchEmbed(nn.Module):
  """timm's PatchEmbed: holds the projection `proj` (names patch_embed.proj.*)."""
  features: int
  patch: int
  stop_gradient: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return PatchProjection(self.features, self.patch, self.stop_gradient,
                           self.dtype, name='proj')(x)


class Attention(nn.Module):
  """Multi-head self-attention, timm's layout: qkv (D → 3D, [3, heads, D/heads]).

  Attributes:
    num_heads: heads; D must be a multiple.
    dtype: compute dtype; the softmax runs in float32.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: (N, T, D) -> (N, T, D) in dtype."""
    n, t, d = x.shape
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, dtype=self.dtype, kernel_init=qkv_init,
                   name='qkv')(x)
    q, k, v = qkv.reshape(n, t, 3, self.num_heads, head_dim).transpose(
        2, 0, 1, 3, 4)                                  # 3 × (N, T, heads, hd)
    q = q * jnp.asarray(head_dim**-0.5, q.dtype)
    logits = jnp.einsum('nqhd,nkhd->nhqk', q, k).astype(jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('nhqk,nkhd->nqhd', weights, v).reshape(n, t, d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init,
                    name='proj')(out)


class Mlp(nn.Module):
  """fc1 (D → hidden) → exact GELU → fc2 (hidden → D)."""
  hidden_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, kernel_init=dense_init,
                 name='fc1')(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, kernel_init=dense_init, name='fc2')(x)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

  The residual stream stays float32 (as under torch autocast); attention and
  MLP compute in dtype.
  """
  num_heads: int
  mlp_ratio: int = MLP_RATIO
  dtype: Any = jnp.float32
  drop_path: float = 0.0

  def _drop_path(self, y, train: bool):
    """timm's DropPath: a residual branch is zeroed per sample with
    probability drop_path in training, the kept ones scaled by 1 / keep."""
    if not train or self.drop_path <= 0:
      return y
    keep = 1.0 - self.drop_path
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (y.shape[0], 1, 1))
    return y * mask / keep

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, T, D) float32 -> (N, T, D) float32; train enables drop_path
    (it needs a 'dropout' rng)."""
    y = Attention(self.num_heads, self.dtype, name='attn')(
        _layer_norm('norm1')(x))
    x = x + self._drop_path(y.astype(jnp.float32), train)
    y = Mlp(self.mlp_ratio * x.shape[-1], self.dtype, name='mlp')(
        _layer_norm('norm2')(x))
    return x + self._drop_path(y.astype(jnp.float32), train)


class ViT(nn.Module):
  """Vision Transformer backbone: images -> normalised class token.

  Attributes:
    patch_size: p (16 for ImageNet, 4 for 32×32 images).
    embed_dim: D (a multiple of 4 and of num_heads).
    depth: number of blocks.
    num_heads: attention heads.
    mlp_ratio: MLP hidden width / D.
    image_size: the training resolution; sets the exported pos_embed's grid
      (the forward pass works at any multiple of patch_size).
    drop_path: stochastic depth of the last block in training (fine-tuning;
      0 in pretraining, as MoCo v3).
    stop_grad_conv1: freeze the (random) patch projection, as MoCo v3's
      --stop-grad-conv1: its gradients are exactly zero. The optimiser's
      weight decay still shrinks it unless masked out.
    dtype: compute dtype (params stay float32; LayerNorm and softmax run in
      float32).
  """
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: int = MLP_RATIO
  image_size: int = 224
  stop_grad_conv1: bool = False
  dtype: Any = jnp.float32
  drop_path: float = 0.0

  @property
  def num_features(self) -> int:
    """Width of the feature vector: D."""
    return self.embed_dim

  @property
  def grid_size(self) -> int:
    """Patches per side at image_size."""
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, x, train: bool = True, intermediates: bool = False):
    """x: (N, H, W, 3) normalised images -> (N, D) float32.

    `train` is accepted for the backbone interface (ResNet's BN uses it); the
    ViT has no batch statistics, so it changes nothing unless drop_path > 0
    (fine-tuning's stochastic depth, rising linearly over the blocks to
    drop_path as in timm; it needs a 'dropout' rng).
    intermediates: return instead {'patch_tokens': (N, H/p, W/p, D), 'cls':
    (N, D)}: every token after the final LayerNorm (timm's forward_features),
    the patch tokens laid out as their grid (row-major, as the patches are
    cut), float32; 'cls' equals the default output.
    """
    n = x.shape[0]
    tokens = PatchEmbed(self.embed_dim, self.patch_size, self.stop_grad_conv1,
                        self.dtype, name='patch_embed')(x)
    _, gh, gw, d = tokens.shape
    tokens = tokens.reshape(n, gh * gw, d).astype(jnp.float32)
    cls_token = self.param('cls_token', nn.initializers.normal(1e-6),
                           (1, 1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (n, 1, d)), tokens], 1)
    x = x + jnp.asarray(sincos_pos_embed(gh, gw, d))
    rates = np.linspace(0.0, self.drop_path, self.depth)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, float(rates[i]),
                name=f'blocks_{i}')(x, train)
    if intermediates:   # LayerNorm is per token: the class token's is the same
      x = _layer_norm('norm')(x)
      return {'patch_tokens': x[:, 1:].reshape(n, gh, gw, d), 'cls': x[:, 0]}
    return _layer_norm('norm')(x[:, 0])   # per token: the class token's alone


def vit(arch: str, image_size: int = 224, dtype: Any = jnp.float32,
        stop_grad_conv1: bool = False) -> ViT:
  """Builds a ViT by name (see ARCHS).

  Args:
    arch: 'vit_tiny', 'vit_small', 'vit_base' (patch 16), 'vit_tiny_cifar',
      'vit_small_cifar' (patch 4), 'vit_cpu' (patch 8).
    image_size: training resolution, a multiple of the patch size.
    dtype: compute dtype.
    stop_grad_conv1: freeze the patch projection (MoCo v3's ViT recipes do).
  """
  if arch not in ARCHS:
    raise ValueError(f'unknown model.arch {arch!r}; valid: {", ".join(ARCHS)}')
  spec = ARCHS[arch]
  if image_size % spec.patch:
    raise ValueError(f'{arch} has {spec.patch}x{spec.patch} patches: '
                     f'data.image_size {image_size} is not a multiple')
  return ViT(patch_size=spec.patch, embed_dim=spec.dim, depth=spec.depth,
             num_heads=spec.heads, image_size=image_size,
             stop_grad_conv1=stop_grad_conv1, dtype=dtype)
