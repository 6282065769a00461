"""Measured step throughput of the MoCo train step, against a supervised step.

Builds the encoder, optimiser, state and jitted step straight from a config
(no TensorFlow/tfds: this runs on accelerator machines that have neither),
feeds synthetic uint8 images already on the device (sharded over 'data'),
and times in the same process, round-robin:

  moco        moco_jax.train_step.make_train_step: augment both views, f_q
              forward + backward, f_k forward (shuffle BN), InfoNCE against
              the queue, SGD/LARS/AdamW update, momentum update, enqueue.
  supervised  the same backbone (same BN groups, BN in train mode) + a linear
              classifier, cross-entropy, the same optimiser, on one view of
              the same batch (normalised, no colour augmentation).

Both are jitted with the state donated; times are medians over --steps steps
after --warmup steps, each ended by block_until_ready. Prints one JSON object
and writes it to --json.

  python benchmarks/step_throughput.py --config=configs/moco_v2_r50_imagenet.py \
      --config.dtype=bfloat16 --json=r50.json
  python benchmarks/step_throughput.py --config=configs/smoke.py --sweep=queue
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python benchmarks/step_throughput.py --config=configs/smoke.py --sweep=devices
  python benchmarks/step_throughput.py --config=configs/moco_v3_cpu.py --sweep=v2

MoCo v3 configs (moco.queue_size=0) time the same step with its v3 options.
--sweep=v2 on a v3 config adds, round-robin in the same process, the v2 step
on the same backbone (equal backbone FLOPs): v2's MLP head, a 4096-key
queue, constant momentum, asymmetric and symmetric loss; each entry's
v3_ratio is the v3 step's median over its own.
"""
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from moco_jax import optim, train_step
from moco_jax.augment import colour as augment
from moco_jax.config.checks import check_config
from moco_jax.experiment import build_encoder_and_optimizer, state_initializer
from moco_jax.models import is_vit
from moco_jax.runtime.mesh import AXIS, make_mesh, sharded_jit
from moco_jax.augment.normalization import MEAN_STD

import report  # benchmarks/ is on sys.path when run as a script

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=True)
flags.DEFINE_string('json', None, 'Also write the JSON result to this file.')
flags.DEFINE_integer('steps', 10, 'Timed steps per variant (median reported).')
flags.DEFINE_integer('warmup', 2, 'Untimed steps per variant after compiling.')
flags.DEFINE_enum('sweep', 'none', ['none', 'queue', 'bn_groups', 'devices', 'v2'],
                  'Extra measurements in the same process, listed under "sweep".')
flags.DEFINE_integer('num_classes', 1000, 'Classes of the supervised baseline.')
flags.mark_flags_as_required(['config'])

# Dense bfloat16 peak FLOP/s per chip, matched against device_kind.
PEAK_FLOPS = {'H100': 989e12, 'H200': 989e12, 'A100': 312e12,
              'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12}
# Fixed schedule length: the lr value does not change the step's cost.
STEPS_PER_EPOCH, TOTAL_STEPS = 100, 10_000


def peak_flops(device_kind: str):
  return next((v for k, v in PEAK_FLOPS.items() if k in device_kind), None)


class Classifier(nn.Module):
  """The supervised baseline: backbone -> linear classifier (float32 logits)."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = True):
    features = self.backbone(x, train=train)
    logits = nn.Dense(self.num_classes, dtype=self.backbone.dtype)(features)
    return logits.astype(jnp.float32)


def supervised_step(state, images, labels, *, model, optimizer, mean, std):
  """One supervised SGD step on this device's shard (pmean over 'data')."""
  x = augment.normalize(images, mean, std)

  def loss_fn(params):
    logits, new_vars = model.apply(
        {'params': params, 'batch_stats': state['batch_stats']}, x,
        train=True, mutable=['batch_stats'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), new_vars['batch_stats']

  (loss, batch_stats), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state['params'])
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state['opt_state'],
                                        state['params'])
  new_state = dict(params=optax.apply_updates(state['params'], updates),
                   batch_stats=jax.lax.pmean(batch_stats, AXIS),
                   opt_state=opt_state)
  return new_state, jax.lax.pmean(loss, AXIS)


def make_supervised_step(mesh, **kwargs):
  replicated = NamedSharding(mesh, P())
  return sharded_jit(functools.partial(supervised_step, **kwargs), mesh,
                     in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()),
                     donate=(0,), out_shardings=(replicated, replicated))


def compile_step(step, *args):
  """(compiled executable, seconds to lower and compile)."""
  start = time.perf_counter()
  compiled = step.lower(*args).compile()
  return compiled, time.perf_counter() - start


def flops_of(compiled):
  """FLOPs of one call from XLA's cost analysis (per device), or None."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get('flops') if cost else None
    return float(flops) if flops and flops > 0 else None
  except Exception:  # not every backend implements it
    return None


def program_bytes(compiled):
  """Arguments + outputs + temporaries of one executable, minus aliasing."""
  try:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes +
               m.temp_size_in_bytes - m.alias_size_in_bytes)
  except Exception:
    return None


class Bench:
  """One compiled, donated step and its state, steppable with timing."""

  def __init__(self, step, state, *inputs):
    self.compiled, self.compile_s = compile_step(step, state, *inputs)
    self.state, self.inputs, self.times = state, inputs, []

  def run(self, timed: bool):
    start = time.perf_counter()
    self.state, out = self.compiled(self.state, *self.inputs)
    jax.block_until_ready((self.state, out))
    if timed:
      self.times.append(time.perf_counter() - start)

  @property
  def median_ms(self):
    return 1e3 * statistics.median(self.times)


def build_moco(config, mesh):
  """Bench of the MoCo train step for `config` on `mesh`."""
  c = config
  if c.moco.bn_groups % mesh.size and not is_vit(c.model.arch):
    raise SystemExit(f'error: moco.bn_groups={c.moco.bn_groups} is not a multiple '
                     f'of the {mesh.size} devices')
  groups = max(c.moco.bn_groups // mesh.size, 1)   # per device
  schedule = optim.learning_rate_schedule(c.optim, c.train.batch_size,
                                          STEPS_PER_EPOCH, TOTAL_STEPS)
  encoder, optimizer = build_encoder_and_optimizer(c, groups, schedule, axis_name=AXIS)
  replicated = NamedSharding(mesh, P())
  init = state_initializer(c, encoder, optimizer, groups)
  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(c.seed))
  mean, std = MEAN_STD[c.data.normalization]
  step = train_step.make_train_step(
      mesh, encoder=encoder, optimizer=optimizer, schedule=schedule,
      moco_config=c.moco, augment_config=dict(recipe=c.data.augment,
                                              mean=mean, std=std),
      total_steps=TOTAL_STEPS)
  images_q, images_k = synthetic_images(c, mesh, 2)
  return Bench(step, state, images_q, images_k), (encoder, optimizer)


def build_supervised(config, mesh, encoder, optimizer):
  """Bench of the supervised step with `encoder`'s backbone."""
  c = config
  model = Classifier(backbone=encoder.backbone, num_classes=FLAGS.num_classes)
  replicated = NamedSharding(mesh, P())

  def init(rng):
    dummy = jnp.zeros((getattr(encoder.backbone, 'bn_groups', 1), c.data.image_size,
                       c.data.image_size, 3))
    variables = model.init(rng, dummy, train=True)
    return dict(params=variables['params'],
                batch_stats=variables.get('batch_stats', {}),  # a ViT has none
                opt_state=optimizer.init(variables['params']))

  state = jax.jit(init, out_shardings=replicated)(jax.random.PRNGKey(c.seed))
  mean, std = MEAN_STD[c.data.normalization]
  step = make_supervised_step(mesh, model=model, optimizer=optimizer,
                              mean=mean, std=std)
  (images,) = synthetic_images(c, mesh, 1)
  labels = np.random.default_rng(1).integers(
      0, FLAGS.num_classes, c.train.batch_size, dtype=np.int32)
  labels = jax.device_put(labels, NamedSharding(mesh, P(AXIS)))
  return Bench(step, state, images, labels)


def synthetic_images(config, mesh, count):
  """`count` device-resident (B, S, S, 3) uint8 batches sharded over 'data'."""
  size, batch = config.data.image_size, config.train.batch_size
  rng = np.random.default_rng(0)
  sharding = NamedSharding(mesh, P(AXIS))
  return [jax.device_put(rng.integers(0, 256, (batch, size, size, 3), np.uint8),
                         sharding) for _ in range(count)]


def time_round_robin(benches):
  """Warm-up, then alternate the benches step by step (same machine load)."""
  for _ in range(FLAGS.warmup):
    for bench in benches:
      bench.run(timed=False)
  for _ in range(FLAGS.steps):
    for bench in benches:
      bench.run(timed=True)


def peak_memory_bytes(device):
  try:
    stats = device.memory_stats()
  except Exception:
    return None
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def measure(config, mesh, supervised=True):
  """One result dict for `config` on `mesh`."""
  check_config(config, mesh.size)
  moco_bench, (encoder, optimizer) = build_moco(config, mesh)
  benches = [moco_bench]
  if supervised:
    benches.append(build_supervised(config, mesh, encoder, optimizer))
  time_round_robin(benches)
  device = mesh.devices.flat[0]
  moco_ms = moco_bench.median_ms
  flops = flops_of(moco_bench.compiled)
  peak = peak_flops(device.device_kind)
  result = dict(
      num_devices=int(mesh.size), batch_size=config.train.batch_size,
      queue_size=config.moco.queue_size, bn_groups=config.moco.bn_groups,
      images_per_sec=config.train.batch_size / (moco_ms / 1e3),
      moco_step_ms=moco_ms, compile_s=moco_bench.compile_s,
      flops_per_step_per_device=flops,
      program_bytes=program_bytes(moco_bench.compiled),
      peak_memory_bytes=peak_memory_bytes(device),
      mfu=flops / (moco_ms / 1e3) / peak if flops and peak else None,
      moco_step_ms_all=[round(1e3 * t, 2) for t in moco_bench.times])
  if supervised:
    sup = benches[1]
    result.update(supervised_step_ms=sup.median_ms,
                  supervised_compile_s=sup.compile_s,
                  ratio=moco_ms / sup.median_ms)
  del benches, moco_bench  # free the donated states before the next entry
  return result


def override(config, **changes):
  """A copy of `config` with dotted-name changes: override(c, **{'moco.bn_groups': 16})."""
  config = config.copy_and_resolve_references()
  for name, value in changes.items():
    *path, leaf = name.split('.')
    section = functools.reduce(getattr, path, config)
    setattr(section, leaf, value)
  return config


def sweep(config, kind):
  """The extra entries of --sweep (same process, one after the other)."""
  mesh = make_mesh()
  if kind == 'queue':
    batch = config.train.batch_size
    sizes = [k for k in (4096, 8192, 16384, 32768, 65536) if k % batch == 0]
    return [measure(override(config, **{'moco.queue_size': k}), mesh,
                    supervised=False) for k in sizes]
  if kind == 'bn_groups':   # 1, 2, 4, 8 groups per device
    local = config.train.batch_size // mesh.size
    return [measure(override(config, **{'moco.bn_groups': s * mesh.size}), mesh)
            for s in (1, 2, 4, 8) if local % s == 0]
  if kind == 'devices':
    # Same global batch and BN groups (moco.bn_groups counts the global
    # batch's), so both compute the same function (shuffle BN on one device).
    return [measure(config, make_mesh(jax.devices()[:1])), measure(config, mesh)]
  if kind == 'v2':
    return v2_beside_v3(config, mesh)
  return []


def v2_variants(config):
  """{name: config}: the v3 `config` and the v2 step on the same backbone."""
  batch = config.train.batch_size
  queue = max(4096 // (2 * batch), 1) * 2 * batch
  v2 = override(config, **{'model.head': 'mlp', 'model.head_hidden_dim': 0,
                           'model.dim': 128, 'model.predictor': False,
                           'moco.queue_size': queue,
                           'moco.momentum_schedule': 'constant',
                           'moco.symmetric': False})
  return {'v3': config, 'v2': v2,
          'v2_symmetric': override(v2, **{'moco.symmetric': True})}


def v2_beside_v3(config, mesh):
  """Median step times of v3 and v2 on the same backbone, round-robin."""
  if config.moco.queue_size != 0:
    raise SystemExit('error: --sweep=v2 needs a MoCo v3 config (moco.queue_size=0)')
  variants = v2_variants(config)
  benches = {}
  for name, c in variants.items():
    check_config(c, mesh.size)
    benches[name] = build_moco(c, mesh)[0]
  time_round_robin(list(benches.values()))
  v3_ms = benches['v3'].median_ms
  return [dict(variant=name, head=variants[name].model.head,
               queue_size=variants[name].moco.queue_size,
               symmetric=bool(variants[name].moco.symmetric),
               moco_step_ms=bench.median_ms,
               moco_step_ms_all=[round(1e3 * t, 2) for t in bench.times],
               v3_ratio=v3_ms / bench.median_ms)
          for name, bench in benches.items()]


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  mesh = make_mesh()
  result = dict(
      device=jax.devices()[0].device_kind, platform=jax.default_backend(),
      dtype=config.dtype, arch=config.model.arch,
      width_multiplier=config.model.width_multiplier,
      image_size=config.data.image_size, conv_impl=config.model.conv_impl,
      optimizer=config.optim.name, steps=FLAGS.steps, warmup=FLAGS.warmup,
      peak_flops=peak_flops(jax.devices()[0].device_kind),
      jax_version=jax.__version__)
  result.update(measure(config, mesh))
  if FLAGS.sweep != 'none':
    result['sweep_kind'] = FLAGS.sweep
    result['sweep'] = sweep(config, FLAGS.sweep)
  report.emit_json(result, FLAGS.json)


if __name__ == '__main__':
  app.run(main)
