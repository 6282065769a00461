"""Experiment: everything derived from a pretraining config that the loop,
the evaluators and the benchmarks share (dataset size, steps, encoder,
optimiser, mesh, state initialisation, the compiled step)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax import optim, train_step
from moco_jax.config.checks import check_config
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.data import inputs
from moco_jax.data.info import DatasetError
from moco_jax.models import build_encoder, frozen_params
from moco_jax.models.encoder import is_vit
from moco_jax.runtime.mesh import AXIS, make_mesh
from moco_jax.state import create_state


def compute_dtype(config):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.dtype]


def steps_per_epoch(config, info: inputs.DatasetInfo) -> int:
  """Full global batches per epoch (each process drops its remainder).

  Raises:
    DatasetError: train.batch_size is larger than the split (no full batch).
  """
  processes = jax.process_count()
  local_batch = config.train.batch_size // processes
  steps = (info.num_examples // processes) // local_batch
  if steps == 0:
    raise DatasetError(
        f'train.batch_size={config.train.batch_size} is larger than the '
        f'{info.num_examples} training examples of {info.name!r}')
  return steps


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


def describe_bn(layout: dict, shuffle_bn: bool, model=None) -> str:
  """One start-up line, e.g. 'BN: 8 groups of 32 samples (8 per device), shuffle BN on'.

  model: the config's `model` section; a ViT backbone has no BN (the line
  says so instead of a group layout), and the v3 heads' BN is synchronised
  over the whole global batch (SyncBN)."""
  batch = layout['bn_groups'] * layout['bn_group_size']
  heads = (f'; the v3 heads: SyncBN over the global batch of {batch}'
           if model is not None and model.head == 'v3' else '')
  if model is not None and is_vit(model.arch):
    return f'BN: none in the ViT backbone{heads}'
  return (f'BN: {layout["bn_groups"]} groups of {layout["bn_group_size"]} samples '
          f'({layout["bn_groups_per_device"]} per device), '
          f'shuffle BN {"on" if shuffle_bn else "off"}{heads}')


def total_steps(config, epoch_steps: int) -> int:
  if config.train.num_steps > 0:
    return config.train.num_steps
  return config.train.num_epochs * epoch_steps


def build_encoder_and_optimizer(config, bn_groups_per_device: int, schedule,
                                axis_name: str | None = None):
  """(models.Encoder, optax optimiser) of a pretraining config: THE builder
  that training, the benchmarks and the checkpoint readers share.

  bn_groups_per_device: BN groups of one device's batch (training layout;
  1 to read a checkpoint: grouping never changes shapes). schedule: step ->
  lr (its values never change the optimiser state's structure). axis_name:
  the mapped axis the v3 heads' SyncBN averages over (None outside a step).
  """
  encoder = build_encoder(config.model, bn_groups_per_device, compute_dtype(config),
                          config.model.conv_impl, image_size=config.data.image_size,
                          axis_name=axis_name)
  optimizer = optim.build_optimizer(config.optim, schedule, frozen_params(config.model))
  return encoder, optimizer


def state_initializer(config, encoder, optimizer, bn_groups_per_device: int = 1):
  """rng -> a fresh MoCoState (state.create_state with the config's sizes)."""
  return functools.partial(
      create_state, encoder, optimizer, image_size=config.data.image_size,
      queue_size=config.moco.queue_size, dim=config.model.dim,
      bn_groups=bn_groups_per_device)


def abstract_state(config, sharding=None, *, encoder=None, optimizer=None,
                   bn_groups_per_device: int = 1):
  """Shapes, dtypes and shardings of a config's MoCoState, computing nothing:
  THE template every checkpoint restore reads into.

  Without encoder/optimizer it needs neither the dataset nor the run's
  devices (export, load_pretrained, tests): the encoder and optimiser of
  build_encoder_and_optimizer with one BN group and a constant schedule.
  sharding: of every leaf (default: the first CPU device).
  """
  if encoder is None:
    encoder, optimizer = build_encoder_and_optimizer(config, 1,
                                                     optax.constant_schedule(0.0))
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices(backend='cpu')[0])
  shapes = jax.eval_shape(state_initializer(config, encoder, optimizer,
                                            bn_groups_per_device),
                          jax.random.PRNGKey(config.seed))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)


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
    # data.on_device, decided once from every split the run reads (the eval
    # split only with kNN or few-shot): the input, the step and the
    # evaluators follow it. Given (on_device=...) by the plan, which compiles
    # for a slice whose data is elsewhere.
    self.reads_eval_split = (config.eval.knn_every > 0 or config.eval.knn_at_start
                             or config.eval.fewshot_every > 0)
    if on_device is None:
      self.on_device = inputs.on_device(
          config.data, self.mesh, with_eval=self.reads_eval_split)[0]
      # The host input, tf.data or Grain (data.loader), checked before any compile.
      self.loader = None if self.on_device else inputs.host_loader(config.data)
    else:
      self.on_device, self.loader = on_device, None
    self.epoch_steps = steps_per_epoch(config, self.info)
    self.total_steps = total_steps(config, self.epoch_steps)
    self.bn_layout = bn_layout(config, self.mesh.size)
    self.schedule = optim.learning_rate_schedule(
        config.optim, config.train.batch_size, self.epoch_steps, self.total_steps)
    # The v3 heads' SyncBN averages statistics over the step's 'data' axis.
    self.encoder, self.optimizer = build_encoder_and_optimizer(
        config, self.bn_layout['bn_groups_per_device'], self.schedule, axis_name=AXIS)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def init_state(self):
    """A fresh replicated state from config.seed."""
    init = state_initializer(self.config, self.encoder, self.optimizer,
                             self.bn_layout['bn_groups_per_device'])
    return jax.jit(init, out_shardings=self.replicated)(jax.random.PRNGKey(self.config.seed))

  def abstract_state(self):
    """Shapes, dtypes and shardings (replicated) of the state, without computing it."""
    return abstract_state(self.config, self.replicated, encoder=self.encoder,
                          optimizer=self.optimizer,
                          bn_groups_per_device=self.bn_layout['bn_groups_per_device'])

  def train_step(self):
    """step(state, *self.step_inputs(batch)) -> (state, metrics)."""
    if not self.on_device:
      return self.jitted_step(on_device=False)
    step = self.jitted_step(on_device=True)
    images = self.train_split.images
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
    if on_device:
      kwargs.update(device_input=True, image_size=c.data.image_size,
                    crop_scale=tuple(c.data.crop_scale))
    return train_step.make_train_step(self.mesh, **kwargs)

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
      images = self.train_split.images
      compiled = jitted.lower(state, images, *inputs).compile()
      step = lambda state, indices: compiled(state, images, indices)
    return step, compiled_costs.program_costs(compiled, self.mesh.size)['flops']

  @functools.cached_property
  def train_split(self):
    """The device-resident training split (data.on_device only), fetched
    once: the step and the input iterator share it."""
    assert self.on_device, 'the training split is on the devices only with data.on_device'
    return inputs.train_split_on_device(self.config.data, self.mesh)

  def train_batches(self, start_step: int = 0):
    """This process's pretraining input from `start_step` (data/inputs.py)."""
    c = self.config
    return inputs.train_batches(c.data, c.train.batch_size // jax.process_count(),
                                c.seed, start_step,
                                self.train_split if self.on_device else None,
                                self.loader)

  def step_inputs(self, batch: dict) -> tuple:
    """One batch of `train_batches` -> the step's array arguments."""
    if self.on_device:
      return (self.to_global(batch['indices']),)
    return self.to_global(batch['images_q']), self.to_global(batch['images_k'])

  def to_global(self, local_batch):
    """Host (per-process) numpy batch -> global arrays sharded over 'data'."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)
