"""fast_conv.conv2d and Conv match XLA's convolution in value and gradient."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from moco_jax.models import fast_conv

# (kernel, stride, pad, spatial, cin, cout)
CASES = [
    (3, 1, 1, 8, 64, 8),
    (3, 2, 1, 8, 64, 8),
    (1, 1, 0, 8, 4, 6),
    (1, 2, 0, 8, 4, 6),
    (7, 2, 3, 15, 3, 8),   # stem, odd size
    (3, 2, 1, 9, 4, 6),    # odd size, stride 2
]


def _xla(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _value_and_grads(conv, x, kernel, strides, padding, g):
  y, vjp = jax.vjp(lambda x, k: conv(x, k, strides, padding), x, kernel)
  return (y, *vjp(g))


def _inputs(k, s, p, size, cin, cout, dtype=jnp.float32):
  # numpy, not jax.random: threefry takes seconds to compile on a busy CPU.
  rng = np.random.default_rng(0)
  out = (size + 2 * p - k) // s + 1
  shapes = (2, size, size, cin), (k, k, cin, cout), (2, out, out, cout)
  x, kernel, g = (jnp.asarray(rng.standard_normal(sh), dtype) for sh in shapes)
  return x, kernel, (s, s), ((p, p), (p, p)), g


@pytest.mark.parametrize('k,s,p,size,cin,cout', CASES)
def test_matches_xla_float32(k, s, p, size, cin, cout):
  x, kernel, strides, padding, g = _inputs(k, s, p, size, cin, cout)
  got = _value_and_grads(fast_conv.conv2d, x, kernel, strides, padding, g)
  want = _value_and_grads(_xla, x, kernel, strides, padding, g)
  for name, a, b in zip(('y', 'dx', 'dkernel'), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4, err_msg=name)


def test_matches_xla_bfloat16():
  x, kernel, strides, padding, g = _inputs(3, 2, 1, 9, 16, 8, jnp.bfloat16)
  got = _value_and_grads(fast_conv.conv2d, x, kernel, strides, padding, g)
  want = _value_and_grads(_xla, *(a.astype(jnp.float32) for a in (x, kernel)),
                          strides, padding, g.astype(jnp.float32))
  # Both accumulate in float32: the error is the final rounding to bfloat16.
  for name, a, b in zip(('y', 'dx', 'dkernel'), got, want):
    assert a.dtype == jnp.bfloat16, name
    atol = 1e-2 * float(jnp.abs(b).max())
    np.testing.assert_allclose(a.astype(jnp.float32), b, rtol=1e-2, atol=atol,
                               err_msg=name)


def test_jax_grad_of_loss():
  x, kernel, strides, padding, _ = _inputs(3, 1, 1, 6, 4, 5)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k, strides,
                                                        padding)))
  got = jax.jit(jax.grad(loss(fast_conv.conv2d), argnums=(0, 1)))(x, kernel)
  want = jax.grad(loss(_xla), argnums=(0, 1))(x, kernel)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('dtype', [None, jnp.bfloat16])
def test_module_matches_nn_conv(dtype):
  kwargs = dict(features=8, kernel_size=(3, 3), strides=(2, 2),
                padding=((1, 1), (1, 1)), use_bias=False, dtype=dtype)
  x, kernel, *_ = _inputs(3, 2, 1, 9, 4, 8)
  params = {'params': {'kernel': kernel}}
  ours = fast_conv.Conv(**kwargs)
  key = jax.random.key(0)
  for module in (ours, nn.Conv(**kwargs)):
    assert jax.tree.map(jnp.shape, jax.eval_shape(module.init, key, x)) == (
        jax.tree.map(jnp.shape, params))
  # Output and the float32 kernel gradient, through the cast to `dtype`;
  # bfloat16 gradients may differ from XLA's in the last bit.
  tol = 1e-5 if dtype is None else 1e-2
  run = lambda module: jax.jit(jax.value_and_grad(
      lambda p: jnp.sum(module.apply(p, x).astype(jnp.float32) ** 2)))(params)
  for got, want in zip(jax.tree.leaves(run(ours)),
                       jax.tree.leaves(run(nn.Conv(**kwargs)))):
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_conv_module():
  assert fast_conv.conv_module('xla') is nn.Conv
  assert fast_conv.conv_module('fast') is fast_conv.Conv
  assert fast_conv.conv_module('auto') is (
      fast_conv.Conv if jax.default_backend() == 'cpu' else nn.Conv)
  with pytest.raises(ValueError, match="'bogus'.*xla"):
    fast_conv.conv_module('bogus')
  # The plan compiles for TPUs on a CPU machine: 'auto' follows the target.
  assert fast_conv.resolve('auto', 'tpu') == fast_conv.resolve('auto', 'gpu') == 'xla'
  assert fast_conv.resolve('auto', 'cpu') == 'fast'
  assert fast_conv.resolve('fast', 'tpu') == 'fast'
