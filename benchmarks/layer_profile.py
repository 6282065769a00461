"""Per-layer timings of a CIFAR ResNet's convolutions and BatchNorms on CPU.

For every conv shape class of a CIFAR-stem ResNet-18 (3x3 stride 1, 3x3 and
1x1 stride 2 at each stage) times the forward pass (fwd), the input gradient
(dx) and the kernel gradient (dw) of each implementation, after checking that
they agree with XLA's:
  xla     lax.conv_general_dilated and its autodiff;
  fast    fast_conv.conv2d (XLA's forward and dx, dw as matmuls);
  im2col  (fwd) patches (N*Ho*Wo, kh*kw*Cin) @ kernel, one matmul;
  phases  (dx, strided convs) one stride-1 conv per stride phase of dx
          instead of XLA's conv over the zero-dilated output gradient;
  im2col  (dw) all kh*kw taps of x in one (kh*kw*Cin, M) @ (M, Cout).
The alternatives measured slower than xla/fast on a 2-core EPYC (Zen 3) and
are kept to re-check on other CPUs. Then BatchNorm+ReLU forward and VJP:
GroupedBatchNorm against the same maths under autodiff.

Candidates of one op are timed round-robin in one process, by default in CPU
time of the whole process (BENCH_CLOCK=wall for wall time): on a shared
machine wall times swing by 2x. Compare within a run, not across runs.

  python benchmarks/layer_profile.py [--batch 128 --width 1.0 --repeats 5]
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moco_jax.runtime import cpu_tuning
from moco_jax.models import fast_conv
from moco_jax.models.batch_norm import GroupedBatchNorm

DIMS = ('NHWC', 'HWIO', 'NHWC')


def xla_conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DIMS)


def layer_classes(width):
  """(name, spatial, cin, cout, kernel, stride) of a CIFAR ResNet-18."""
  c = int(64 * width)
  out = [('stem', 32, 3, c, 3, 1), ('l1', 32, c, c, 3, 1)]
  for stage, size in ((2, 32), (3, 16), (4, 8)):
    cin, cout = c * 2**(stage - 2), c * 2**(stage - 1)
    out += [(f'l{stage}_s2', size, cin, cout, 3, 2),
            (f'l{stage}_ds', size, cin, cout, 1, 2),
            (f'l{stage}', size // 2, cout, cout, 3, 1)]
  return out


def _taps(x, kernel_hw, strides, padding, out_hw):
  """The kh*kw shifted, subsampled windows of padded x, each (N, Ho, Wo, C)."""
  xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
  return [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
          for i in range(kh) for j in range(kw)]


def im2col_conv(x, k, strides, padding):
  kh, kw, cin, cout = k.shape
  n, h, w, _ = x.shape
  ho = (h + sum(padding[0]) - kh) // strides[0] + 1
  wo = (w + sum(padding[1]) - kw) // strides[1] + 1
  cols = jnp.concatenate(_taps(x, (kh, kw), strides, padding, (ho, wo)), -1)
  return (cols.reshape(-1, kh * kw * cin) @ k.reshape(-1, cout)).reshape(
      n, ho, wo, cout)


def phases_dx(x_shape, k, g, strides, padding):
  """dx of a strided conv: for each stride phase (a, b) of x's padded grid,
  a stride-1 correlation of g with the kernel taps k[a::sh, b::sw]."""
  (sh, sw), (n, h, w, cin) = strides, x_shape
  _, ho, wo, _ = g.shape
  hq = -(-(h + sum(padding[0])) // sh)
  wq = -(-(w + sum(padding[1])) // sw)
  rows = []
  for a in range(sh):
    row = []
    for b in range(sw):
      sub = k[a::sh, b::sw]
      th, tw = sub.shape[:2]
      if not th or not tw:
        row.append(jnp.zeros((n, hq, wq, cin), g.dtype))
        continue
      gp = jnp.pad(g, ((0, 0), (th - 1, hq - ho), (tw - 1, wq - wo), (0, 0)))
      row.append(xla_conv(gp, jnp.swapaxes(sub[::-1, ::-1], 2, 3), (1, 1),
                          'VALID'))
    rows.append(jnp.stack(row, 3))                  # (N, Hq, Wq, sw, Cin)
  dxp = jnp.stack(rows, 2).reshape(n, hq * sh, wq * sw, cin)
  return dxp[:, padding[0][0]:padding[0][0] + h, padding[1][0]:padding[1][0] + w]


def im2col_dw(x, g, kernel_hw, strides, padding):
  xs = fast_conv.stride_phases(x, strides, padding)
  (kh, kw), (sh, sw) = kernel_hw, strides
  n, ho, wo, cout = g.shape
  cols = jnp.concatenate([
      xs[i % sh, j % sw, :, :, i // sh:i // sh + ho, j // sw:j // sw + wo]
      .reshape(x.shape[-1], -1) for i in range(kh) for j in range(kw)])
  return (cols @ g.reshape(-1, cout)).reshape(kh, kw, x.shape[-1], cout)


def ops(strides, padding, kernel_hw):
  """name -> {impl: fn(x, k, g)} for fwd, dx, dw."""
  def vjp_x(conv):
    return lambda x, k, g: jax.vjp(lambda x: conv(x, k, strides, padding), x)[1](g)[0]

  def vjp_k(conv):
    return lambda x, k, g: jax.vjp(lambda k: conv(x, k, strides, padding), k)[1](g)[0]

  fwd = lambda conv: lambda x, k, g: conv(x, k, strides, padding)
  result = {
      'fwd': {'xla': fwd(xla_conv), 'fast': fwd(fast_conv.conv2d),
              'im2col': fwd(im2col_conv)},
      'dx': {'xla': vjp_x(xla_conv), 'fast': vjp_x(fast_conv.conv2d)},
      'dw': {'xla': vjp_k(xla_conv), 'fast': vjp_k(fast_conv.conv2d),
             'im2col': lambda x, k, g: im2col_dw(x, g, kernel_hw, strides,
                                                 padding)},
  }
  if strides != (1, 1):
    result['dx']['phases'] = lambda x, k, g: phases_dx(x.shape, k, g, strides,
                                                       padding)
  return result


def interleaved_ms(fns, args, repeats, clock=None):
  """Median ms per fn, timing the candidates round-robin.

  clock: time.perf_counter (wall) or time.process_time (CPU time of all
  threads: steadier than wall time when other jobs share the cores). Defaults
  to $BENCH_CLOCK ('cpu' or 'wall', default 'cpu').
  """
  if clock is None:
    clock = (time.perf_counter if os.environ.get('BENCH_CLOCK') == 'wall'
             else time.process_time)
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = clock()
      jax.block_until_ready(fn(*args))
      times[name].append(clock() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def bench_convs(batch, width, repeats, only=None, op_names=None):
  rng = np.random.default_rng(0)
  total = {}
  for name, size, cin, cout, k, s in layer_classes(width):
    if only and name not in only:
      continue
    p = k // 2
    strides, padding = (s, s), ((p, p), (p, p))
    x = jnp.asarray(rng.standard_normal((batch, size, size, cin)), jnp.float32)
    kern = jnp.asarray(rng.standard_normal((k, k, cin, cout)) / (3 * k),
                       jnp.float32)
    g = jnp.asarray(rng.standard_normal(
        xla_conv(x, kern, strides, padding).shape), jnp.float32)
    line = [f'{name:7s} {size:2d}x{size:<2d} {cin:3d}->{cout:3d} k{k}s{s}']
    for op, impls in ops(strides, padding, (k, k)).items():
      if op_names and op not in op_names:
        continue
      fns = {i: jax.jit(f) for i, f in impls.items()}
      want = fns['xla'](x, kern, g)
      for i, f in fns.items():
        got = f(x, kern, g)
        err = float(jnp.max(jnp.abs(got - want)) / (jnp.max(jnp.abs(want)) + 1e-30))
        assert err < 1e-4, (name, op, i, err)
      ms = interleaved_ms(fns, (x, kern, g), repeats)
      line.append(op + ' ' + ' '.join(f'{i}={v:7.1f}' for i, v in ms.items()))
      for i, v in ms.items():
        total[(op, i)] = total.get((op, i), 0) + v
    print(' | '.join(line), flush=True)
  print('sum per class (one conv each):',
        {f'{o}/{i}': round(v) for (o, i), v in total.items()})


def autodiff_bn(x, scale, bias, num_groups, epsilon=1e-5):
  """GroupedBatchNorm's training-mode output as plain jnp (autodiff VJP)."""
  grouped = x.astype(jnp.float32).reshape((num_groups, -1) + x.shape[1:])
  axes = tuple(range(1, grouped.ndim - 1))
  mean = grouped.mean(axis=axes, keepdims=True)
  var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
  y = (grouped - mean) * jnp.reciprocal(jnp.sqrt(var + epsilon))
  return (y * scale + bias).reshape(x.shape).astype(x.dtype)


def module_bn(x, scale, bias, num_groups):
  bn = GroupedBatchNorm(num_groups=num_groups)
  stats = {'mean': jnp.zeros_like(scale), 'var': jnp.ones_like(scale)}
  y, _ = bn.apply({'params': {'scale': scale, 'bias': bias},
                   'batch_stats': stats}, x, mutable=['batch_stats'])
  return y


def bench_bn(batch, width, repeats, groups=8):
  """BN + ReLU forward and VJP: autodiff reference against the module."""
  rng = np.random.default_rng(0)
  c = int(64 * width)
  for size, ch in ((32, c), (16, 2 * c), (8, 4 * c), (4, 8 * c)):
    x = jnp.asarray(rng.standard_normal((batch, size, size, ch)) + 1, jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, ch), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(ch), jnp.float32)
    fns = {}
    for name, bn in (('autodiff', autodiff_bn), ('module', module_bn)):
      f = lambda x, s, b, bn=bn: jax.nn.relu(bn(x, s, b, groups))
      fns[f'{name}_fwd'] = jax.jit(lambda x, s, b, g, f=f: f(x, s, b))
      fns[f'{name}_vjp'] = jax.jit(
          lambda x, s, b, g, f=f: jax.vjp(f, x, s, b)[1](g))
    fns['copy'] = jax.jit(lambda x, s, b, g: x * 2)
    args = (x, scale, bias, g)
    for a, b in zip(jax.tree.leaves(fns['autodiff_vjp'](*args)),
                    jax.tree.leaves(fns['module_vjp'](*args))):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(a).max()))
    ms = interleaved_ms(fns, args, repeats)
    print(f'bn+relu {size}x{size}x{ch}: ' +
          ' '.join(f'{k}={v:6.1f}' for k, v in ms.items()), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--only', nargs='*', help='layer classes to run')
  parser.add_argument('--ops', nargs='*', help='subset of fwd dx dw')
  parser.add_argument('--no-bn', action='store_true')
  parser.add_argument('--no-cpu-tuning', action='store_true',
                      help='skip moco_jax.cpu_tuning.apply()')
  args = parser.parse_args()
  if not args.no_cpu_tuning:
    cpu_tuning.apply()
  bench_convs(args.batch, args.width, args.repeats, args.only, args.ops)
  if not args.no_bn:
    bench_bn(args.batch, args.width, args.repeats)


if __name__ == '__main__':
  main()
