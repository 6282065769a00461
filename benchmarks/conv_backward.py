"""Times XLA's convolution against fast_conv.conv2d: forward and gradients.

Prints one JSON object: median milliseconds per jitted call (after a warm-up)
for the forward pass, the input gradient, the kernel gradient and the full
value-and-gradient, for both implementations, and `speedup` (XLA over ours for
the value-and-gradient).

  python benchmarks/conv_backward.py [--batch 64 --size 32 --channels 64 ...]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moco_jax.models import fast_conv


def xla_conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding,
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def median_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return round(1e3 * float(np.median(times)), 1)


def time_conv(conv, x, kernel, g, strides, padding, repeats):
  """Milliseconds for forward, dx, dkernel and value_and_grad of one conv.

  g, the output cotangent, is an argument: closed over it would be a constant
  that XLA may fold into the backward pass.
  """
  fwd = lambda x, k: conv(x, k, strides, padding)
  fns = {
      'fwd': lambda x, k, g: fwd(x, k),
      'dx': lambda x, k, g: jax.vjp(lambda x: fwd(x, k), x)[1](g)[0],
      'dkernel': lambda x, k, g: jax.vjp(lambda k: fwd(x, k), k)[1](g)[0],
      'value_and_grad': jax.value_and_grad(
          lambda x, k, g: jnp.vdot(fwd(x, k), g), argnums=(0, 1)),
  }
  return {name: median_ms(jax.jit(fn), x, kernel, g, repeats=repeats)
          for name, fn in fns.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=32)
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--kernel', type=int, default=3)
  parser.add_argument('--stride', type=int, default=1)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  c, k, s, p = args.channels, args.kernel, args.stride, args.kernel // 2
  strides, padding = (s, s), ((p, p), (p, p))
  x = jnp.asarray(rng.standard_normal((args.batch, args.size, args.size, c)),
                  args.dtype)
  kernel = jnp.asarray(rng.standard_normal((k, k, c, c)) / (3 * k), args.dtype)
  g = jnp.ones_like(xla_conv(x, kernel, strides, padding))

  result = {}
  for name, conv in (('xla', xla_conv), ('fast', fast_conv.conv2d)):
    times = time_conv(conv, x, kernel, g, strides, padding, args.repeats)
    result.update({f'{name}_{op}_ms': ms for op, ms in times.items()})
  result['speedup'] = round(
      result['xla_value_and_grad_ms'] / result['fast_value_and_grad_ms'], 2)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
