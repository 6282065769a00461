"""2-D convolution with a weight gradient that is fast on CPU.

XLA on CPU lowers a convolution's kernel gradient to a convolution whose
"kernel" is the whole output gradient, which runs up to ~20x slower than the
forward pass (worse as the batch grows). Here the forward pass and the input
gradient stay XLA's, and the kernel gradient is a set of matrix products, one
per kernel tap:

  dW[i, j] = X_tap(i, j)^T @ dY,  X_tap: (N*Ho*Wo, Cin), dY: (N*Ho*Wo, Cout)

where X_tap(i, j) is the padded input shifted by (i, j) and subsampled by the
stride. Use `conv2d`, or `Conv` in place of flax.linen.Conv.
"""
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

_DIMS = ('NHWC', 'HWIO', 'NHWC')
IMPLS = ('xla', 'fast', 'auto')


def _xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=_DIMS)


def stride_phases(x, strides, padding):
  """Pads x, splits it by stride phase and puts channels first.

  x: (N, H, W, C) -> xs: (sh, sw, C, N, Hq, Wq) with xs[a, b, c, n, h, w] =
  x_pad[n, h*sh + a, w*sw + b, c]. Kernel tap (i, j) then sees a unit-stride
  (Ho, Wo) window of xs[i % sh, j % sw] starting at (i // sh, j // sw).
  """
  sh, sw = strides
  n, h, w, c = x.shape
  hp, wp = h + sum(padding[0]), w + sum(padding[1])
  hq, wq = -(-hp // sh), -(-wp // sw)
  x = jnp.pad(x, ((0, 0), (padding[0][0], padding[0][1] + hq * sh - hp),
                  (padding[1][0], padding[1][1] + wq * sw - wp), (0, 0)))
  return x.reshape(n, hq, sh, wq, sw, c).transpose(2, 4, 5, 0, 1, 3)


def _kernel_grad(x, g, kernel_hw, strides, padding):
  """x: (N, H, W, Cin), g: (N, Ho, Wo, Cout) -> dW: (kh, kw, Cin, Cout) f32."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  n, ho, wo, cout = g.shape
  cin = x.shape[-1]
  # Channels-first makes each product (kw*Cin, M) @ (M, Cout), the layout CPU
  # matmuls are fastest in (~2x over contracting the leading dim of both).
  xs = stride_phases(x, strides, padding)
  g = g.reshape(-1, cout)

  def row(_, i):
    """dW[i]: the kw taps of kernel row i as one (kw*Cin, M) @ (M, Cout)."""
    taps = [lax.dynamic_slice(xs, (i % sh, j % sw, 0, 0, i // sh, j // sw),
                              (1, 1, cin, n, ho, wo)).reshape(cin, -1)
            for j in range(kw)]
    return None, jnp.dot(jnp.concatenate(taps), g,
                         preferred_element_type=jnp.float32)

  # A loop over kernel rows rather than kh*kw independent products: XLA would
  # keep every shifted copy of x alive at once (49 for a 7x7 kernel), and
  # touching that much fresh memory costs more than the matmuls.
  _, dw = lax.scan(row, None, jnp.arange(kh))
  return dw.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, res, g):
  x, kernel = res
  _, x_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)
  dw = _kernel_grad(x, g, kernel.shape[:2], strides, padding)
  return x_vjp(g)[0], dw.astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x, kernel, strides: Sequence[int], padding: Sequence[Sequence[int]]):
  """Same as lax.conv_general_dilated(x, kernel, strides, padding, NHWC/HWIO).

  x: (N, H, W, Cin); kernel: (kh, kw, Cin, Cout); strides: (sh, sw);
  padding: ((top, bottom), (left, right)). Returns (N, Ho, Wo, Cout).
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(x, kernel, strides, padding)


class Conv(nn.Module):
  """The part of nn.Conv the ResNet uses, backed by `conv2d`.

  Same parameter (`kernel`, (kh, kw, Cin, Cout)) and dtype handling as
  nn.Conv, so checkpoints move between the two. Inputs are (N, H, W, Cin).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: str | Sequence[tuple[int, int]] = ((1, 1), (1, 1))
  use_bias: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x):
    if self.use_bias:
      raise NotImplementedError('fast_conv.Conv has no bias; use_bias=False.')
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init,
                        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    padding = self.padding
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), self.strides,
                                    padding)
    x, kernel = dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    return conv2d(x, kernel, self.strides, padding)


def resolve(impl: str, platform: str) -> str:
  """'xla' or 'fast' for `impl` on devices of `platform` ('cpu', 'tpu',
  'gpu', ...): 'auto' is 'fast' on CPU only."""
  if impl not in IMPLS:
    raise ValueError(f'Unknown conv impl {impl!r}; expected one of {IMPLS}.')
  if impl == 'auto':
    return 'fast' if platform == 'cpu' else 'xla'
  return impl


def conv_module(impl: str):
  """Conv module class for `impl` on the default backend: 'xla' (nn.Conv),
  'fast' (Conv) or 'auto' (see `resolve`)."""
  return Conv if resolve(impl, jax.default_backend()) == 'fast' else nn.Conv
