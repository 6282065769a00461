"""Times a ResNet encoder's forward and gradient on CPU, against a baseline.

The working tree's models and, with --baseline REV, the git revision REV's
moco_jax/models/{fast_conv,batch_norm,resnet}.py are compiled in the same
process and timed round-robin, so that both see the same machine load. Prints
per variant the median wall and CPU (all threads) milliseconds of the jitted
forward pass and of the gradient of sum(out**2) wrt the params (the same
computations as the ad-hoc /tmp/prof3.py), the page faults and system CPU
milliseconds per call, and grad/fwd ratios. On a shared machine wall times
swing by 2x between runs; CPU times are steadier.

  python benchmarks/resnet_step.py --batch 128 --width 1.0 --baseline HEAD
"""
import argparse
import importlib
import resource
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.runtime import cpu_tuning
from moco_jax.models import encoder, heads

# The package re-exports the function `resnet` under the submodule's name.
resnet_lib = importlib.import_module('moco_jax.models.resnet')

MODELS = 'moco_jax/models/'


def load_baseline(rev):
  """The resnet module of git revision `rev`, with its fast_conv/batch_norm."""
  def source(name):
    return subprocess.run(['git', 'show', f'{rev}:{MODELS}{name}.py'],
                          check=True, capture_output=True, text=True).stdout

  def load(name, src, **inject):
    module = types.ModuleType(f'baseline_{name}')
    module.__dict__.update(inject)
    exec(compile(src, f'{rev}:{MODELS}{name}.py', 'exec'), module.__dict__)
    return module

  conv = load('fast_conv', source('fast_conv'))
  norm = load('batch_norm', source('batch_norm'))
  src = source('resnet')
  src = src.replace('from moco_jax.models import fast_conv\n', '')
  src = src.replace(
      'from moco_jax.models.batch_norm import GroupedBatchNorm\n', '')
  return load('resnet', src, fast_conv=conv,
              GroupedBatchNorm=norm.GroupedBatchNorm)


def build(resnet_module, args):
  # A --baseline revision may predate the rename of bn_splits to bn_groups.
  groups = ('bn_groups' if 'bn_groups' in resnet_module.ResNet.__dataclass_fields__
            else 'bn_splits')
  backbone = resnet_module.resnet(
      args.arch, width_multiplier=args.width, cifar_stem=True,
      conv_impl=args.conv_impl, **{groups: args.bn_groups})
  head = heads.ProjectionHead(kind='linear', dim=128,
                              hidden_dim=backbone.num_features)
  return encoder.Encoder(backbone=backbone, head=head)


def step_fns(enc, x):
  variables = enc.init(jax.random.PRNGKey(0), x[:8])
  stats = variables['batch_stats']

  def fwd(params, x):
    y, _ = enc.apply({'params': params, 'batch_stats': stats}, x,
                     mutable=['batch_stats'])
    return y

  grad = jax.grad(lambda p, x: jnp.sum(fwd(p, x)**2))
  return variables['params'], {'fwd': jax.jit(fwd), 'grad': jax.jit(grad)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--arch', default='resnet18')
  parser.add_argument('--bn_groups', type=int, default=8,
                      help='BN groups in the (one-device) batch')
  parser.add_argument('--conv_impl', default='fast')
  parser.add_argument('--baseline', help='git revision to compare against')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--check', action='store_true',
                      help='print the largest baseline/current difference')
  parser.add_argument('--cpu_tuning', action='store_true',
                      help='call moco_jax.cpu_tuning.apply() first')
  args = parser.parse_args()
  if args.cpu_tuning:
    print('cpu_tuning applied:', cpu_tuning.apply(), file=sys.stderr)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((args.batch, 32, 32, 3), np.float32))
  variants = {'current': resnet_lib}
  if args.baseline:
    variants = {'baseline': load_baseline(args.baseline), **variants}
  calls = {}
  for name, module in variants.items():
    params, fns = step_fns(build(module, args), x)
    for op, fn in fns.items():
      start = time.perf_counter()
      out = jax.block_until_ready(fn(params, x))
      print(f'{name}/{op}: compile+first run {time.perf_counter() - start:.1f}s',
            file=sys.stderr, flush=True)
      calls[f'{name}/{op}'] = (fn, params, out)
  if args.check and args.baseline:
    for op in ('fwd', 'grad'):
      want, got = calls[f'baseline/{op}'][2], calls[f'current/{op}'][2]
      worst = max(
          (float(jnp.abs(a - b).max()) / (float(jnp.abs(a).max()) + 1e-30),
           jax.tree_util.keystr(path))
          for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                                  jax.tree.leaves(got)))
      print(f'{op}: largest difference (relative to the leaf\'s max) '
            f'{worst[0]:.1e} at {worst[1]}', file=sys.stderr)

  stats = {key: {'wall': [], 'cpu': [], 'minflt': [], 'sys': []}
           for key in calls}
  for _ in range(args.repeats):
    for key, (fn, params, _) in calls.items():
      r0 = resource.getrusage(resource.RUSAGE_SELF)
      c0, w0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fn(params, x))
      w1, c1 = time.perf_counter(), time.process_time()
      r1 = resource.getrusage(resource.RUSAGE_SELF)
      s = stats[key]
      s['wall'].append(1e3 * (w1 - w0))
      s['cpu'].append(1e3 * (c1 - c0))
      s['minflt'].append(r1.ru_minflt - r0.ru_minflt)
      s['sys'].append(1e3 * (r1.ru_stime - r0.ru_stime))
  result = {key: {k: round(float(np.median(v))) for k, v in s.items()}
            for key, s in stats.items()}
  for name in variants:
    fwd, grad = result[f'{name}/fwd'], result[f'{name}/grad']
    result[f'{name}/grad_over_fwd'] = {
        k: round(grad[k] / max(fwd[k], 1), 2) for k in ('wall', 'cpu')}
  print(f'batch={args.batch} width={args.width} arch={args.arch} '
        f'conv_impl={args.conv_impl} cpu_tuning={args.cpu_tuning}')
  for key, value in result.items():
    print(f'  {key:24s} {value}')
  print(f'  maxrss_mb {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}')


if __name__ == '__main__':
  main()
