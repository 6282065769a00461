"""Batches of a device-resident split (data/device.py): indices for the
training step, gathered (and cropped) images for the evaluators, and the
jitted device programs that gather them.

The training iterator yields only this process's example indices; the step
gathers and crops on the device (train_step.make_train_step). The
evaluators' iterators yield global arrays sharded over 'data', as
inputs.GlobalBatches makes of the host pipeline's batches, so an evaluator
takes either.
"""
import functools
from typing import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax.augment import resize, views
from moco_jax.data.device import DeviceSplit
from moco_jax.data.info import DatasetError
from moco_jax.data.permutation import epoch_permutation
from moco_jax.runtime.mesh import AXIS, sharded_jit


@functools.lru_cache(maxsize=None)
def make_views(mesh, *, image_size: int, crop_scale):
  """Jitted views(images, indices, rng, step) -> (views_q, views_k): the
  pretraining step's device input alone (benchmarks, tests), global arrays
  sharded over AXIS."""
  per_device = functools.partial(views.device_views, image_size=image_size,
                                 crop_scale=tuple(crop_scale))
  return sharded_jit(per_device, mesh, in_specs=(P(AXIS), P(AXIS), P(), P()),
                     out_specs=(P(AXIS), P(AXIS)))


@functools.lru_cache(maxsize=None)
def make_eval_images(mesh, image_size: int):
  """Jitted f(images, indices) -> (B, S, S, 3) uint8 sharded over AXIS: the
  rows resized whole to S (the evaluation transform of small images)."""
  return sharded_jit(lambda data, rows: resize.resize_whole(data[rows], image_size),
                     mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS),
                     check_vma=True)


@functools.lru_cache(maxsize=None)
def make_one_view(mesh, *, image_size: int, crop_scale):
  """Jitted f(images, indices, rng, step) -> (B, S, S, 3) uint8: one
  random-resized crop + flip per example (linear evaluation's training view,
  view 0's keys)."""
  per_device = functools.partial(views.one_view, view=0, image_size=image_size,
                                 crop_scale=tuple(crop_scale))
  return sharded_jit(per_device, mesh, in_specs=(P(AXIS), P(AXIS), P(), P()),
                     out_specs=P(AXIS))


def to_global_fn(mesh):
  """local (per-process) NumPy array -> global array sharded over AXIS."""
  sharding = NamedSharding(mesh, P(AXIS))
  return lambda local: jax.make_array_from_process_local_data(sharding, local)


class DeviceTrainBatches:
  """Endless iterator of this process's training indices.

  Batch k of epoch e is positions [k·B, (k+1)·B) of
  epoch_permutation(n, seed, process, e) (B = local_batch), as the host
  path's TrainBatches, so a run resumed at step s starts where an
  uninterrupted run is.

  Yields:
    {'indices': (local_batch,) int32 rows of the process's part}.
  """

  def __init__(self, split: DeviceSplit, local_batch: int, seed: int, start_step: int = 0):
    self.split, self._local_batch, self._seed = split, local_batch, seed
    self.steps_per_epoch = split.num_examples // local_batch
    if self.steps_per_epoch == 0:
      raise DatasetError(f'train.batch_size gives {local_batch} images per process '
                         f'but this process has only {split.num_examples} examples')
    self.skipped_images = split.unreadable
    self.unreadable_names: list[bytes] = []
    self._step = start_step
    self._order = (None, None)

  def order(self, epoch: int) -> np.ndarray:
    if self._order[0] != epoch:
      self._order = (epoch, epoch_permutation(self.split.num_examples, self._seed,
                                              jax.process_index(), epoch))
    return self._order[1]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    epoch, batch = divmod(self._step, self.steps_per_epoch)
    start = batch * self._local_batch
    indices = self.order(epoch)[start:start + self._local_batch].astype(np.int32)
    self._step += 1
    return {'indices': indices}


class DeviceEvalBatches:
  """Every example of a device-resident split once, in padded batches, as
  pipeline.EvalBatches (same length on every process; padding masked).

  Yields:
    global arrays sharded over 'data': {'image': (global_batch, S, S, 3) uint8
    (the small-image evaluation transform: resized whole to S),
    'label': (global_batch,) int32, 'mask': (global_batch,) bool}.
  """

  def __init__(self, split: DeviceSplit, local_batch: int, image_size: int, mesh):
    if local_batch <= 0:
      raise DatasetError(f'evaluation batch of {local_batch} images per process '
                         f'must be positive')
    self.split, self.local_batch, self._to_global = split, local_batch, to_global_fn(mesh)
    self.num_examples = split.split_examples
    largest = -(-split.split_examples // jax.process_count())
    self._num_batches = -(-largest // local_batch)
    self._images = make_eval_images(mesh, image_size)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict]:
    rows = len(self.split.labels)
    for b in range(self._num_batches):
      positions = np.arange(b * self.local_batch, (b + 1) * self.local_batch)
      mask = positions < self.split.num_examples
      indices = np.minimum(positions, rows - 1).astype(np.int32)
      yield {'image': self._images(self.split.images, self._to_global(indices)),
             'label': self._to_global(
                 np.where(mask, self.split.labels[indices], 0).astype(np.int32)),
             'mask': self._to_global(mask)}


class DeviceLabelledBatches(DeviceTrainBatches):
  """Linear evaluation's training batches from a device-resident split: one
  random-resized crop + flip per image, made on the device; crops keyed by
  (PRNGKey(seed), step, global example index).

  Yields:
    global arrays sharded over 'data': {'image': (global_batch, S, S, 3)
    uint8, 'label': (global_batch,) int32}.
  """

  def __init__(self, split: DeviceSplit, local_batch: int, seed: int, start_step: int,
               data_config, mesh):
    super().__init__(split, local_batch, seed, start_step)
    self._rng = jax.random.PRNGKey(seed)
    self._to_global = to_global_fn(mesh)
    self._view = make_one_view(mesh, image_size=data_config.image_size,
                               crop_scale=tuple(data_config.crop_scale))

  def __next__(self) -> dict:
    step = self._step
    indices = super().__next__()['indices']
    image = self._view(self.split.images, self._to_global(indices), self._rng,
                       np.int32(step))
    return {'image': image, 'label': self._to_global(self.split.labels[indices])}
