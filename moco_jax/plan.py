"""Command line: a pod plan without a pod.

  python -m moco_jax.plan --config=configs/NAME.py --topology=v4-32 [--mfu=0.4,0.6]
      [--json] [--workdir=DIR] [--config.a.b=v ...]

Compiles, on this machine, with libtpu's real TPU compiler, the programs a
run would execute on the TPU slice --topology: the pretraining step exactly
as train_and_evaluate builds it for that device count (host crops, and the
split on the devices when it is of one image size and fits), the kNN feature
step and the linear-probe step; with --programs=...,finetune also the
fine-tuning step. For each it prints HBM per device
(arguments, temporaries, outputs, total against the chip's capacity), FLOPs
per device per step, its collectives with their sizes, the roofline lower
bound of the step time, and images/s per chip and per slice at the assumed
MFUs. A pretraining step that does not fit in HBM is refused in one line
naming the largest per-device batch that fits, found by compiling it and the
next valid batch (exit 2; nothing written).
--workdir: also write DIR/plan.json when the run fits. libtpu: pip install
-e ".[tpu]". Nothing runs on an accelerator: it compiles only.
"""
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags
from ml_collections import config_flags

from moco_jax.runtime import cli

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  cli.check_flagfiles(sys.argv)   # before config_flags reads them (one line, not a traceback)
  config_flags.DEFINE_config_file('config', None, 'Path to a pretraining config (a '
                                  'recipe in configs/).', lock_config=True)
  flags.DEFINE_string('topology', None, 'The TPU slice, e.g. v4-8, v4-32, v5e-256 '
                      '(v5litepod-256), v5p-8, v6e-16; or h100-8, h200-8 (one host of '
                      'GPUs, with jax-cuda12-plugin).')
  flags.DEFINE_list('mfu', ['0.4', '0.6'], 'Assumed model FLOP utilisations for the '
                    'images/s estimates (fractions of the chip\'s peak bf16 FLOP/s).')
  flags.DEFINE_bool('json', False, 'Print the plan as one JSON object instead of text.')
  flags.DEFINE_string('workdir', None, 'Optional: write DIR/plan.json when the run fits '
                      '(nothing is written when it does not).')
  flags.DEFINE_list('programs', list(DEFAULT_PROGRAMS),
                    'Which programs to compile: pretrain, knn, lincls, finetune (opt-in: '
                    'the fine-tuning step, a whole backward pass to compile).')


FLAG_NAMES = ('config', 'topology', 'mfu', 'json', 'workdir', 'programs')
PROGRAMS = ('pretrain', 'knn', 'lincls', 'finetune')
DEFAULT_PROGRAMS = PROGRAMS[:3]
# Splits the plan knows without the data (TFDS catalogue): train examples,
# classes, (H, W) when every image has that size.
CATALOGUE = {'imagenet2012': (1_281_167, 1000, None), 'cifar10': (50_000, 10, (32, 32)),
             'cifar100': (50_000, 100, (32, 32))}
EXIT_DOES_NOT_FIT = 2


class PlanError(ValueError):
  """A plan that cannot be made (bad topology, config or dataset), one line."""


def usage() -> str:
  return (f'{__doc__.strip()}\n\nrecipes (--config=...):\n{cli.recipe_list("pretrain")}\n\n'
          f'flags:\n{cli.flag_help(FLAGS, FLAG_NAMES)}')


def _problem():
  if not FLAGS.topology:
    return '--topology is required (e.g. --topology=v4-8)'
  try:
    mfus = [float(m) for m in FLAGS.mfu]
  except ValueError:
    return f'--mfu={",".join(FLAGS.mfu)} must be fractions such as 0.4,0.6'
  if not mfus or not all(0 < m <= 1 for m in mfus):
    return f'--mfu={",".join(FLAGS.mfu)} must be fractions in (0, 1]'
  unknown = [p for p in FLAGS.programs if p not in PROGRAMS]
  if unknown:
    return f'--programs: unknown {", ".join(unknown)}; valid: {", ".join(PROGRAMS)}'
  return None


def parse_flags(argv):
  return cli.parse_command_line(FLAGS, argv, usage, config_kind='pretrain',
                                problem=_problem)


# ----------------------------------------------------------------------------
# The plan (importable: tests and docs/pod_plan.md's table call these).


def dataset_facts(config):
  """(DatasetInfo, (H, W) or None) of data.train_split: read from the data
  when it is here, else from CATALOGUE."""
  from moco_jax.data import inputs
  try:
    info = inputs.dataset_info(config.data)
    from moco_jax.data import device
    shape = device._split_shape(config.data, config.data.train_split)
    return info, (tuple(shape[1:]) if shape else None)
  except Exception:  # not on this machine: the catalogue's numbers
    pass
  if config.data.dataset not in CATALOGUE:
    raise PlanError(f'data.dataset {config.data.dataset!r} is not readable here and '
                    f'not one of the datasets the plan knows ({", ".join(CATALOGUE)}); '
                    f'point data.data_dir at it')
  examples, classes, shape = CATALOGUE[config.data.dataset]
  from moco_jax.data.info import DatasetInfo
  return DatasetInfo(config.data.dataset, None, examples, classes, ()), shape


def slice_mesh(tpu_slice):
  """A one-axis 'data' mesh over the slice's (deviceless) TPU devices."""
  import numpy as np
  from jax.sharding import Mesh
  from moco_jax.runtime import accelerators
  from moco_jax.runtime.mesh import AXIS
  devices = accelerators.topology_devices(tpu_slice)
  return Mesh(np.array(devices), (AXIS,))


def _sds(shape, dtype, sharding):
  import jax
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _out_of_memory(error: Exception, batch_per_device: int) -> dict | None:
  """The costs of a program the compiler refused for HBM, or None for any
  other error. libtpu says e.g. 'RESOURCE_EXHAUSTED: Ran out of memory on
  HBM, the total memory required for HLO temporaries (110.16G) exceeds
  available HBM (15.75G)'."""
  import re
  message = ' '.join(str(error).split())
  if 'RESOURCE_EXHAUSTED' not in message:
    return None
  needed = re.search(r'\(([\d.]+)G\) exceeds', message)
  total = int(float(needed.group(1)) * 2**30) if needed else 0
  return {'fits': False, 'batch_per_device': batch_per_device, 'flops': 0.0,
          'memory': {'total': total, 'arguments': 0, 'outputs': 0, 'temporaries': total,
                     'aliased': 0, 'code': 0},
          'collectives': [], 'compiler': message[message.index('RESOURCE_EXHAUSTED'):]}


def _measure(jitted, args, tpu_slice, batch_per_device: int, mfus) -> dict:
  from moco_jax.runtime import compiled_costs
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as error:  # the TPU compiler refuses what cannot fit
    refused = _out_of_memory(error, batch_per_device)
    if refused is None:
      raise
    return refused
  costs = compiled_costs.program_costs(compiled, tpu_slice.chips)
  chip = tpu_slice.chip
  costs['roofline_s'] = compiled_costs.roofline_seconds(
      costs, chip.peak_flops, chip.hbm_bandwidth, chip.ici_bandwidth)
  costs['batch_per_device'] = batch_per_device
  costs['fits'] = costs['memory']['total'] <= chip.hbm_bytes
  per_image = costs['flops'] / batch_per_device if batch_per_device else 0.0
  costs['images_per_sec'] = {
      f'{m:g}': {'per_chip': m * chip.peak_flops / per_image if per_image else None,
                 'per_slice': (m * chip.peak_flops / per_image * tpu_slice.chips
                               if per_image else None)} for m in mfus}
  bound = costs['roofline_s']['bound']
  costs['images_per_sec_roofline_per_chip'] = batch_per_device / bound if bound else None
  return costs


def _on_target(config, mesh):
  """The config with model.conv_impl='auto' resolved for the mesh's devices,
  not for this machine's CPU backend (which would compile the CPU conv into a
  TPU program)."""
  from moco_jax.models import fast_conv
  impl = fast_conv.resolve(config.model.conv_impl, mesh.devices.flat[0].platform)
  if impl == config.model.conv_impl:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.conv_impl = impl
  return config


def _experiment(config, mesh, info):
  from moco_jax.config.checks import ConfigError
  from moco_jax.data.info import DatasetError
  from moco_jax.experiment import Experiment
  try:
    return Experiment(config, mesh, info=info, on_device=False)
  except (ConfigError, DatasetError) as error:
    raise PlanError(f'{error} (on {mesh.size} devices)') from None


def pretrain_programs(config, tpu_slice, mesh, info, image_shape, mfus,
                      paths=('host', 'device')) -> dict:
  """{'pretrain (host crops)': costs, 'pretrain (data on device)': costs}: the
  step of train_and_evaluate on both input paths (the device path only when
  the split has one image size and fits in data.on_device_max_fraction of
  HBM)."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moco_jax.runtime.mesh import AXIS
  config = _on_target(config, mesh)
  experiment = _experiment(config, mesh, info)
  state = experiment.abstract_state()
  batch, size = config.train.batch_size, config.data.image_size
  per_device = batch // mesh.size
  sharded = NamedSharding(mesh, P(AXIS))
  programs = {}
  if 'host' in paths:
    view = _sds((batch, size, size, 3), jnp.uint8, sharded)
    programs['pretrain (host crops)'] = _measure(
        experiment.jitted_step(on_device=False), (state, view, view), tpu_slice,
        per_device, mfus)
  if 'device' in paths:
    split_bytes = (info.num_examples // tpu_slice.hosts) * (
        image_shape[0] * image_shape[1] * 3 if image_shape else 0)
    limit = config.data.get('on_device_max_fraction', 0.25) * tpu_slice.chip.hbm_bytes
    if image_shape is None:
      programs['pretrain (data on device)'] = {'skipped': 'the images have no one size'}
    elif split_bytes > limit:
      programs['pretrain (data on device)'] = {
          'skipped': f'the split takes {split_bytes / 2**30:.1f} GiB per device, more '
                     f'than data.on_device_max_fraction of HBM'}
    else:
      rows = info.num_examples // tpu_slice.hosts
      images = _sds((mesh.size * rows,) + tuple(image_shape) + (3,), jnp.uint8, sharded)
      indices = _sds((batch,), jnp.int32, sharded)
      programs['pretrain (data on device)'] = _measure(
          experiment.jitted_step(on_device=True), (state, images, indices), tpu_slice,
          per_device, mfus)
  return programs


def eval_programs(config, tpu_slice, mesh, info, mfus, which=('knn', 'lincls')) -> dict:
  """The kNN feature step (eval.batch_size) and the linear-probe step
  (the linear-evaluation recipe's batch, 256) on the pretrained encoder."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moco_jax import optim
  from moco_jax.config.lincls import lincls_base_config
  from moco_jax.augment.normalization import MEAN_STD
  from moco_jax.evaluation import knn, linear
  from moco_jax.runtime.mesh import AXIS, sharded_jit
  config = _on_target(config, mesh)
  experiment = _experiment(config, mesh, info)
  state = experiment.abstract_state()
  mean, std = MEAN_STD[config.data.normalization]
  size = config.data.image_size
  sharded, replicated = NamedSharding(mesh, P(AXIS)), NamedSharding(mesh, P())
  programs = {}
  if 'knn' in which:
    model, _ = knn.feature_model(config)
    features = knn.features_fn(model, mean, std)
    use_head = knn.knn_features(config) == 'head'
    params = state.params if use_head else state.params['backbone']
    stats = state.batch_stats if use_head else state.batch_stats.get('backbone', {})
    step = sharded_jit(features, mesh, in_specs=(P(), P(), P(AXIS)), out_specs=P(AXIS),
                       check_vma=True)
    batch = config.eval.batch_size
    images = _sds((batch, size, size, 3), jnp.uint8, sharded)
    programs['kNN features'] = _measure(step, (params, stats, images), tpu_slice,
                                        batch // mesh.size, mfus)
  if 'lincls' in which:
    lin = lincls_base_config()
    batch = lin.train.batch_size
    schedule = optim.learning_rate_schedule(lin.optim, 256, 1000, 100_000)
    optimizer = optim.build_optimizer(lin.optim, schedule)
    head = linear.linear_head(info.num_classes)
    backbone = knn.backbone_from_config(config)
    logits = linear._logits_fn(backbone, head, mean, std)
    step = linear.make_train_step(mesh, logits, optimizer, schedule)

    def create(rng):
      params = head.init(rng, jnp.zeros((1, backbone.num_features)))['params']
      return linear.LinearState(params=params, opt_state=optimizer.init(params),
                                step=jnp.zeros((), jnp.int32))
    lin_state = jax.tree.map(lambda s: _sds(s.shape, s.dtype, replicated),
                             jax.eval_shape(create, jax.random.PRNGKey(0)))
    backbone_vars = {'params': state.params['backbone'],
                     'batch_stats': state.batch_stats.get('backbone', {})}
    if not backbone_vars['batch_stats']:
      backbone_vars.pop('batch_stats')
    images = _sds((batch, size, size, 3), jnp.uint8, sharded)
    labels = _sds((batch,), jnp.int32, sharded)
    programs['linear probe step'] = _measure(
        step, (lin_state, backbone_vars, images, labels), tpu_slice, batch // mesh.size,
        mfus)
  return programs


def finetune_program(config, tpu_slice, mesh, info, mfus) -> dict:
  """{'fine-tune step (batch N)': costs}: the training step of
  moco_jax.finetune (evaluation/finetune.py's Finetune.train_step, host
  crops) for the pretrained architecture, with the fine-tuning base recipe
  (config/finetune.py: SGD, batch 256) at the pretraining's image size,
  normalisation and dtype."""
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from moco_jax.config.checks import ConfigError
  from moco_jax.config.finetune import finetune_base_config
  from moco_jax.data.info import DatasetError
  from moco_jax.evaluation.finetune import Finetune
  from moco_jax.runtime.mesh import AXIS
  from moco_jax.weights import start_point
  config = _on_target(config, mesh)
  ft = finetune_base_config()
  ft.init = 'random'   # the architecture alone: no weights are read
  for key in ('arch', 'width_multiplier', 'cifar_stem', 'conv_impl'):
    ft.model[key] = config.model[key]
  ft.data.dataset, ft.data.image_size = config.data.dataset, config.data.image_size
  ft.data.normalization, ft.dtype = config.data.normalization, config.dtype
  try:
    run = Finetune.without_run(ft, info, start_point.resolve(ft, mesh), mesh)
  except (ConfigError, DatasetError) as error:
    raise PlanError(f'fine-tuning: {error} (on {mesh.size} devices)') from None
  batch, size = ft.train.batch_size, ft.data.image_size
  sharded = NamedSharding(mesh, P(AXIS))
  images = _sds((batch, size, size, 3), jnp.uint8, sharded)
  labels = _sds((batch,), jnp.int32, sharded)
  return {f'fine-tune step (batch {batch})': _measure(
      run.train_step(), (run.abstract, images, labels), tpu_slice, batch // mesh.size,
      mfus)}


def _with_batch(config, batch: int):
  """The config at another global batch (queue_size kept a valid multiple)."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.train.batch_size = batch
    keys = batch * (2 if config.moco.get('symmetric', False) else 1)
    if config.moco.queue_size > 0:
      config.moco.queue_size = max(keys, config.moco.queue_size // keys * keys)
  return config


def largest_fitting_batch(config, tpu_slice, mesh, info, image_shape, mfus,
                          too_big: dict) -> int | None:
  """The largest per-device batch whose host-input pretraining step fits in
  HBM, or None when even the smallest valid one does not. Valid: the global
  batch a multiple of moco.bn_groups. `too_big`: the costs of the requested
  batch (which does not fit).

  The answer is compiled, and so is the next valid batch, which does not fit
  (or is the requested one): the answer is the compiler's, not a model's.
  Which batches to compile is guided by HBM growing about linearly with the
  batch: each probe is where the line through the nearest fitting and the
  nearest refused probe meets the capacity (regula falsi), or the middle when
  two probes in a row did not halve the interval. A refused compile is quick
  (libtpu stops at the first stage that runs out); one that fits is not.
  """
  devices, groups = mesh.size, config.moco.bn_groups
  unit = 1
  while (unit * devices) % groups:
    unit += 1
  capacity = tpu_slice.chip.hbm_bytes

  def memory(units):
    probe = _with_batch(config, units * unit * devices)
    costs = pretrain_programs(probe, tpu_slice, mesh, info, image_shape, mfus,
                              paths=('host',))['pretrain (host crops)']
    return costs['fits'], costs['memory']['total']

  # In units; the low end fits, the high end does not, with their HBM.
  high, high_bytes = config.train.batch_size // devices // unit, too_big['memory']['total']
  if high <= 1:
    return None
  fits, low_bytes = memory(1)
  if not fits:
    return None
  low, slow = 1, 0
  while high - low > 1:
    if slow >= 2:
      probe = (low + high) // 2
    else:
      # A refused compile's figure is only libtpu's temporaries (a lower
      # bound): the line can only overshoot, towards a quick refusal.
      rise = max(high_bytes - low_bytes, 1)
      probe = low + int((capacity - low_bytes) / rise * (high - low))
      probe = min(high - 1, max(low + 1, probe))
    width = high - low
    fits, used = memory(probe)
    if fits:
      low, low_bytes = probe, used
    else:
      high, high_bytes = probe, max(used, capacity + 1)
    slow = slow + 1 if 2 * (high - low) > width else 0
  return low * unit


def make_plan(config, topology: str, mfus=(0.4, 0.6), programs=DEFAULT_PROGRAMS) -> dict:
  """The whole plan as a dict (what --json prints).

  Raises:
    PlanError: bad topology, config or dataset; accelerators.TopologyError
    (a PlanError too) for a missing libtpu.
  """
  from moco_jax.runtime import accelerators
  try:
    tpu_slice = accelerators.parse_slice(topology)
    mesh = slice_mesh(tpu_slice)
  except accelerators.TopologyError as error:
    raise PlanError(str(error)) from None
  except Exception as error:  # libtpu's own errors (JaxRuntimeError)
    raise PlanError(f'libtpu could not describe {topology}: '
                    f'{" ".join(str(error).split())}') from None
  info, image_shape = dataset_facts(config)
  chip = tpu_slice.chip
  plan = {
      'topology': {'name': tpu_slice.name, 'libtpu_topology': tpu_slice.topology,
                   'chips': tpu_slice.chips, 'hosts': tpu_slice.hosts,
                   'hbm_bytes_per_chip': chip.hbm_bytes,
                   'peak_bf16_flops_per_chip': chip.peak_flops,
                   'hbm_bandwidth': chip.hbm_bandwidth,
                   'ici_bandwidth_per_chip': chip.ici_bandwidth, 'source': chip.source},
      'config': {'arch': config.model.arch, 'batch_size': config.train.batch_size,
                 'batch_per_device': config.train.batch_size // mesh.size,
                 'queue_size': config.moco.queue_size,
                 'image_size': config.data.image_size, 'dtype': config.dtype,
                 'shuffle_bn': bool(config.moco.shuffle_bn),
                 'shuffle_bn_mode': config.moco.get('shuffle_bn_mode', 'statistics'),
                 'dataset': info.name, 'train_examples': info.num_examples},
      'mfus': list(mfus), 'programs': {},
  }
  if 'pretrain' in programs:
    # The host path first: when it does not fit, nothing else is compiled.
    plan['programs'].update(pretrain_programs(config, tpu_slice, mesh, info,
                                              image_shape, mfus, paths=('host',)))
    host = plan['programs']['pretrain (host crops)']
    if host['fits']:
      plan['programs'].update(pretrain_programs(config, tpu_slice, mesh, info,
                                                image_shape, mfus, paths=('device',)))
    if not host['fits']:
      plan['fits'] = False
      fitting = largest_fitting_batch(config, tpu_slice, mesh, info, image_shape, mfus, host)
      plan['largest_fitting_batch_per_device'] = fitting
      if fitting:   # the queue the search kept a multiple of that batch
        plan['largest_fitting_queue_size'] = _with_batch(
            config, fitting * mesh.size).moco.queue_size
      return plan
  plan['programs'].update(eval_programs(
      config, tpu_slice, mesh, info, mfus, [p for p in programs if p in ('knn', 'lincls')]))
  if 'finetune' in programs:
    plan['programs'].update(finetune_program(config, tpu_slice, mesh, info, mfus))
  plan['fits'] = all(p.get('fits', True) for p in plan['programs'].values())
  return plan


def refusal(plan: dict) -> str:
  """One line for a run that does not fit."""
  host = plan['programs']['pretrain (host crops)']
  t, c = plan['topology'], plan['config']
  fitting = plan.get('largest_fitting_batch_per_device')
  if fitting:
    flags = f'--config.train.batch_size={fitting * t["chips"]}'
    queue = plan['largest_fitting_queue_size']   # a multiple of that batch's keys
    if queue != c['queue_size']:
      flags += f' --config.moco.queue_size={queue}'
    fix = f'the largest per-device batch that fits is {fitting} ({flags})'
  else:
    fix = 'not even the smallest valid per-device batch fits: use a larger slice'
  return (f'train.batch_size={c["batch_size"]} ({c["batch_per_device"]} per device) '
          f'needs {"at least " if "compiler" in host else ""}'
          f'{host["memory"]["total"] / 2**30:.2f} GiB of HBM per device on '
          f'{t["name"]}, which has {t["hbm_bytes_per_chip"] / 2**30:.0f} GiB; {fix}')


def _size(n: float) -> str:
  for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= scale:
      return f'{n / scale:.2f} {unit}'
  return f'{n:.0f} B'


def _flops(n: float) -> str:
  return f'{n / 1e12:.3f} TFLOPs' if n >= 1e11 else f'{n / 1e9:.3f} GFLOPs'


def describe(plan: dict) -> str:
  """The plan as text, a few lines per program."""
  t, c = plan['topology'], plan['config']
  lines = [f'plan: {c["arch"]} on {t["name"]} ({t["libtpu_topology"]}: {t["chips"]} '
           f'chips, {t["hosts"]} host{"s" if t["hosts"] > 1 else ""}, '
           f'{t["hbm_bytes_per_chip"] / 2**30:.0f} GiB HBM and '
           f'{t["peak_bf16_flops_per_chip"] / 1e12:.0f} TFLOP/s bf16 per chip, from '
           f'{t["source"]}); global batch {c["batch_size"]} ({c["batch_per_device"]} '
           f'per chip), {c["image_size"]}px, {c["dtype"]}, shuffle BN '
           f'{("by " + c["shuffle_bn_mode"]) if c["shuffle_bn"] else "off"}']
  for name, p in plan['programs'].items():
    if 'skipped' in p:
      lines.append(f'{name}: not compiled: {p["skipped"]}')
      continue
    if 'compiler' in p:
      lines.append(f'{name}: DOES NOT FIT: {p["compiler"]}')
      continue
    m = p['memory']
    lines.append(
        f'{name}: HBM per device {_size(m["total"])} of '
        f'{t["hbm_bytes_per_chip"] / 2**30:.0f} GiB{"" if p["fits"] else " (DOES NOT FIT)"} '
        f'(arguments {_size(m["arguments"])}, temporaries {_size(m["temporaries"])}, '
        f'outputs {_size(m["outputs"])}, donated {_size(m["aliased"])}); '
        + (f'{_flops(p["flops"])} per device per step' if p['flops'] else
           'FLOPs not counted (XLA gives no cost analysis for a GPU it cannot see)'))
    by_op = {}
    for coll in p['collectives']:
      entry = by_op.setdefault(coll['op'], [0, 0.0, 0, ''])
      entry[0] += 1
      entry[1] += coll['bytes_per_chip']
      if coll['bytes'] > entry[2]:
        entry[2], entry[3] = coll['bytes'], coll['shape']
    total = sum(e[1] for e in by_op.values())
    parts = [f'{op} ×{n} {_size(moved)} (largest {shape})'
             for op, (n, moved, _, shape) in sorted(by_op.items())]
    lines.append(f'  collectives: {_size(total)} per chip per step'
                 + (': ' + '; '.join(parts) if parts else ''))
    r = p['roofline_s']
    rates = '; '.join(f'at {float(mfu):.0%} MFU {v["per_chip"]:,.0f} images/s per chip, '
                      f'{v["per_slice"]:,.0f} per slice'
                      for mfu, v in p['images_per_sec'].items() if v['per_chip'])
    lines.append(f'  roofline ≥ {r["bound"] * 1e3:.2f} ms per step (compute '
                 f'{r["compute"] * 1e3:.2f}, memory {r["memory"] * 1e3:.2f}, collectives '
                 f'{r["collectives"] * 1e3:.2f} ms); {rates}')
  return '\n'.join(lines)


def main(argv):
  del argv
  try:
    FLAGS.config.seed
  except Exception as error:
    cli.fail(f'invalid --config: {cli.error_line(error)}')
  from moco_jax.runtime import accelerators
  gpu = FLAGS.topology.strip().lower().startswith(accelerators.GPUS)
  if not gpu and not accelerators.libtpu_installed():
    cli.fail(f'the plan compiles for TPUs with libtpu, which is not installed: '
             f'{accelerators.INSTALL_LIBTPU}')
  mfus = [float(m) for m in FLAGS.mfu]
  import jax
  # A program compiled for a described slice cannot be read back from JAX's
  # persistent cache (libtpu: 'PjRtCompiler must be constructed with a
  # Client'), and each try warns on stderr, which holds one line at most.
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    plan = make_plan(FLAGS.config, FLAGS.topology, mfus, tuple(FLAGS.programs))
  except PlanError as error:
    cli.fail(error)
  if not plan['fits'] and 'largest_fitting_batch_per_device' in plan:
    cli.fail(refusal(plan), code=EXIT_DOES_NOT_FIT)
  print(json.dumps(plan, indent=1) if FLAGS.json else describe(plan), flush=True)
  if FLAGS.workdir:
    from moco_jax.runtime import paths
    paths.makedirs(FLAGS.workdir)
    paths.write_bytes_atomic(paths.join(FLAGS.workdir, 'plan.json'),
                             json.dumps(plan, indent=1).encode())
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
  sys.exit(0)
