"""Experiment: everything derived from a pretraining config that the loop,
the evaluators and the benchmarks share (dataset size, steps, encoder,
optimiser, mesh, state initialisation, the compiled step)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax import device_step, optim, train_step
from moco_jax.config.checks import check_config
from moco_jax.config.normalization import MEAN_STD
from moco_jax.data import inputs
from moco_jax.models import build_encoder, frozen_params
from moco_jax.runtime.mesh import AXIS, make_mesh
from moco_jax.state import create_state


def compute_dtype(config):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.dtype]


def steps_per_epoch(config, info: inputs.DatasetInfo) -> int:
  """Full global batches per epoch (each process drops its remainder)."""
  processes = jax.process_count()
  local_batch = config.train.batch_size // processes
  return (info.num_examples // processes) // local_batch


def bn_layout(config, num_devices: int) -> dict:
  """How BN groups the global batch (config already checked).

  Returns:
    {'bn_groups': groups in the global batch (moco.bn_groups),
     'bn_groups_per_device': bn_groups / num_devices,
     'bn_group_size': samples per group, train.batch_size / bn_groups}.
  """
  groups = config.moco.bn_groups
  # max(.., 1): a ViT (no backbone BN) is not held to the group layout.
  return {'bn_groups': groups, 'bn_groups_per_device': max(groups // num_devices, 1),
          'bn_group_size': config.train.batch_size // groups}


def describe_bn(layout: dict, shuffle_bn: bool) -> str:
  """One start-up line, e.g. 'BN: 8 groups of 32 samples (8 per device), shuffle BN on'."""
  return (f'BN: {layout["bn_groups"]} groups of {layout["bn_group_size"]} samples '
          f'({layout["bn_groups_per_device"]} per device), '
          f'shuffle BN {"on" if shuffle_bn else "off"}')


def total_steps(config, epoch_steps: int) -> int:
  if config.train.num_steps > 0:
    return config.train.num_steps
  return config.train.num_epochs * epoch_steps


class Experiment:
  """Everything derived from a config that the loop and evaluators share."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None, info=None,
               on_device=None):
    """info, on_device: given instead of read from the dataset (the plan,
    moco_jax/plan.py, compiles for slices whose data is elsewhere)."""
    check_config(config, jax.device_count() if mesh is None else mesh.size)
    self.config = config
    self.info = info or inputs.dataset_info(config.data)
    self.mesh = mesh or make_mesh()
    # data.on_device: the split on the devices, cropped in the step.
    if on_device is None:
      self.on_device, self.data_placement = inputs.on_device(
          config.data, self.mesh,
          with_eval=config.eval.knn_every > 0 or config.eval.knn_at_start)
    else:
      self.on_device, self.data_placement = on_device, 'given'
    self.epoch_steps = steps_per_epoch(config, self.info)
    if self.epoch_steps == 0:
      raise inputs.DatasetError(
          f'train.batch_size={config.train.batch_size} is larger than the '
          f'{self.info.num_examples} training examples of {self.info.name!r}')
    self.total_steps = total_steps(config, self.epoch_steps)
    self.bn_layout = bn_layout(config, self.mesh.size)
    # The v3 heads' SyncBN averages statistics over the step's 'data' axis.
    self.encoder = build_encoder(config.model, self.bn_layout['bn_groups_per_device'],
                                 compute_dtype(config), config.model.conv_impl,
                                 image_size=config.data.image_size, axis_name=AXIS)
    self.schedule = optim.learning_rate_schedule(
        config.optim, config.train.batch_size, self.epoch_steps, self.total_steps)
    self.optimizer = optim.build_optimizer(config.optim, self.schedule,
                                           frozen_params(config.model))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def init_state(self):
    """A fresh replicated state from config.seed."""
    c = self.config
    init = functools.partial(
        create_state, self.encoder, self.optimizer, image_size=c.data.image_size,
        queue_size=c.moco.queue_size, dim=c.model.dim, bn_groups=self.bn_layout['bn_groups_per_device'])
    return jax.jit(init, out_shardings=self.replicated)(jax.random.PRNGKey(c.seed))

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, without computing it."""
    c = self.config
    shapes = jax.eval_shape(functools.partial(
        create_state, self.encoder, self.optimizer, image_size=c.data.image_size,
        queue_size=c.moco.queue_size, dim=c.model.dim, bn_groups=self.bn_layout['bn_groups_per_device']),
        jax.random.PRNGKey(c.seed))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=self.replicated), shapes)

  def train_step(self):
    """step(state, *self.step_inputs(batch)) -> (state, metrics)."""
    if not self.on_device:
      return self.jitted_step(on_device=False)
    step = self.jitted_step(on_device=True)
    images = self.train_batches_split().images
    return lambda state, indices: step(state, images, indices)

  def jitted_step(self, on_device: bool):
    """The jitted step of one input path: step(state, images_q, images_k) from
    the host, or step(state, split images, indices) on the device."""
    c = self.config
    mean, std = MEAN_STD[c.data.normalization]
    kwargs = dict(encoder=self.encoder, optimizer=self.optimizer,
                  schedule=self.schedule, moco_config=c.moco,
                  augment_config=dict(recipe=c.data.augment, mean=mean, std=std),
                  total_steps=self.total_steps)
    if not on_device:
      return train_step.make_train_step(self.mesh, **kwargs)
    return device_step.make_device_train_step(
        self.mesh, image_size=c.data.image_size, crop_scale=tuple(c.data.crop_scale),
        **kwargs)

  def compiled_train_step(self, state, inputs: tuple):
    """(step, FLOPs per device per step): the step compiled ahead of time for
    `state` and the step inputs `inputs` (self.step_inputs of a batch), and
    XLA's count of its FLOPs, the count moco_jax.plan reports for a slice
    (the achieved MFU of a real run is measured against it)."""
    from moco_jax.runtime import compiled_costs
    jitted = self.jitted_step(self.on_device)
    if not self.on_device:
      compiled = jitted.lower(state, *inputs).compile()
      step = compiled
    else:
      images = self.train_batches_split().images
      compiled = jitted.lower(state, images, *inputs).compile()
      step = lambda state, indices: compiled(state, images, indices)
    return step, compiled_costs.program_costs(compiled, self.mesh.size)['flops']

  def train_batches_split(self):
    """The device-resident training split (data.on_device only)."""
    from moco_jax.data import device
    return device.device_split(self.config.data, self.config.data.train_split,
                               self.mesh, drop_remainder=True)

  def train_batches(self, start_step: int = 0):
    """This process's pretraining input from `start_step` (data/inputs.py)."""
    c = self.config
    return inputs.train_batches(c.data, c.train.batch_size // jax.process_count(),
                                c.seed, start_step, self.mesh)

  def step_inputs(self, batch: dict) -> tuple:
    """One batch of `train_batches` -> the step's array arguments."""
    if self.on_device:
      return (self.to_global(batch['indices']),)
    return self.to_global(batch['images_q']), self.to_global(batch['images_k'])

  def to_global(self, local_batch):
    """Host (per-process) numpy batch -> global arrays sharded over 'data'."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)
