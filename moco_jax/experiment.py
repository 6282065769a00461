"""Experiment: everything derived from a pretraining config that the loop,
the evaluators and the benchmarks share (dataset size, steps, encoder,
optimiser, mesh, state initialisation, the compiled step)."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax import optim, train_step
from moco_jax.config.checks import check_config
from moco_jax.config.normalization import MEAN_STD
from moco_jax.data import pipeline
from moco_jax.models import build_encoder
from moco_jax.runtime.mesh import AXIS, make_mesh
from moco_jax.state import create_state


def compute_dtype(config):
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[config.dtype]


def steps_per_epoch(config, info: pipeline.DatasetInfo) -> int:
  """Full global batches per epoch (each process drops its remainder)."""
  processes = jax.process_count()
  local_batch = config.train.batch_size // processes
  return (info.num_examples // processes) // local_batch


def total_steps(config, epoch_steps: int) -> int:
  if config.train.num_steps > 0:
    return config.train.num_steps
  return config.train.num_epochs * epoch_steps


class Experiment:
  """Everything derived from a config that the loop and evaluators share."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    check_config(config, jax.device_count() if mesh is None else mesh.size)
    self.config = config
    self.info = pipeline.dataset_info(config.data)
    self.mesh = mesh or make_mesh()
    self.epoch_steps = steps_per_epoch(config, self.info)
    if self.epoch_steps == 0:
      raise pipeline.DatasetError(
          f'train.batch_size={config.train.batch_size} is larger than the '
          f'{self.info.num_examples} training examples of {self.info.name!r}')
    self.total_steps = total_steps(config, self.epoch_steps)
    self.encoder = build_encoder(config.model, config.moco.bn_splits,
                                 compute_dtype(config), config.model.conv_impl)
    self.schedule = optim.learning_rate_schedule(
        config.optim, config.train.batch_size, self.epoch_steps, self.total_steps)
    self.optimizer = optim.build_optimizer(config.optim, self.schedule)
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def init_state(self):
    """A fresh replicated state from config.seed."""
    c = self.config
    init = functools.partial(
        create_state, self.encoder, self.optimizer, image_size=c.data.image_size,
        queue_size=c.moco.queue_size, dim=c.model.dim, bn_splits=c.moco.bn_splits)
    return jax.jit(init, out_shardings=self.replicated)(jax.random.PRNGKey(c.seed))

  def abstract_state(self):
    """Shapes, dtypes and shardings of the state, without computing it."""
    c = self.config
    shapes = jax.eval_shape(functools.partial(
        create_state, self.encoder, self.optimizer, image_size=c.data.image_size,
        queue_size=c.moco.queue_size, dim=c.model.dim, bn_splits=c.moco.bn_splits),
        jax.random.PRNGKey(c.seed))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=self.replicated), shapes)

  def train_step(self):
    c = self.config
    mean, std = MEAN_STD[c.data.normalization]
    return train_step.make_train_step(
        self.mesh, encoder=self.encoder, optimizer=self.optimizer,
        schedule=self.schedule, moco_config=c.moco,
        augment_config=dict(recipe=c.data.augment, mean=mean, std=std))

  def to_global(self, local_batch):
    """Host (per-process) numpy batch -> global arrays sharded over 'data'."""
    return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)
