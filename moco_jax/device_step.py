"""The training step on a device-resident split: gather, crop, flip, then
the usual MoCo step, in one jitted program.

Every device holds its process's whole part of the training split (uint8,
(n, H, W, 3); data/device.py places it) and receives its share of the
step's example indices. It gathers its images, makes the two views with a
random-resized crop + flip per example (augment_resize.py) and runs
train_step.per_device_step on them. Crop keys are drawn per global example
index from (state.rng, step), as the colour keys are, so one device gives
what eight give and a resumed run draws what an uninterrupted one would.
No TensorFlow here.
"""
import functools

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import augment_resize, train_step
from moco_jax.runtime.mesh import AXIS

# fold_in constant that separates the crop keys from the step's other keys.
CROP_STREAM = 0x63726F70  # 'crop'


def crop_rngs(rng, step, view: int, global_batch: int):
  """(global_batch,) keys of one view's crops and flips at `step`: key i is
  the global batch's example i (fold_in(fold_in(fold_in(rng, step),
  CROP_STREAM), view), split global_batch ways)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, step),
                                              CROP_STREAM), view)
  return jax.random.split(key, global_batch)


def device_views(images, indices, rng, step, *, image_size: int, crop_scale):
  """This device's two uint8 views, inside shard_map over AXIS.

  Args:
    images: (n, H, W, 3) uint8, this device's copy of its process's split.
    indices: (N,) int32 rows of `images`, this device's part of the batch.
    rng, step: the state's rng and step (before this step).
    image_size: output side S; crop_scale: RandomResizedCrop's area range.

  Returns:
    (views_q, views_k), each (N, S, S, 3) uint8.
  """
  local = indices.shape[0]
  global_batch = local * jax.lax.axis_size(AXIS)
  start = jax.lax.axis_index(AXIS) * local
  batch = images[indices]
  views = []
  for view in (0, 1):
    keys = jax.lax.dynamic_slice_in_dim(
        crop_rngs(rng, step, view, global_batch), start, local, axis=0)
    views.append(augment_resize.random_resized_crop_flip(
        batch, keys, image_size, tuple(crop_scale)))
  return tuple(views)


def make_device_train_step(mesh: Mesh, *, image_size: int, crop_scale, **step_kwargs):
  """Jitted step(state, images, indices) -> (state, metrics).

  images: global (devices · n, H, W, 3) uint8 sharded over AXIS, each
  device's block its process's split (data/device.py); indices: global (B,)
  int32 sharded over AXIS (each process's local indices into its part).
  The state is replicated and donated. `step_kwargs`:
  train_step.per_device_step's keyword arguments.
  """
  def per_device(state, images, indices):
    views_q, views_k = device_views(images, indices, state.rng, state.step,
                                    image_size=image_size, crop_scale=crop_scale)
    return train_step.per_device_step(state, views_q, views_k, **step_kwargs)

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                         out_specs=(P(), P()), check_vma=False)
  replicated = NamedSharding(mesh, P())
  return jax.jit(mapped, donate_argnums=(0,), out_shardings=(replicated, replicated))


@functools.partial(jax.jit, static_argnames=('image_size', 'crop_scale', 'mesh'))
def _views_global(images, indices, rng, step, *, image_size, crop_scale, mesh):
  return jax.shard_map(
      functools.partial(device_views, image_size=image_size, crop_scale=crop_scale),
      mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()), out_specs=(P(AXIS), P(AXIS)),
      check_vma=False)(images, indices, rng, step)


def make_views(mesh: Mesh, *, image_size: int, crop_scale):
  """Jitted views(images, indices, rng, step) -> (views_q, views_k): the
  device input alone (benchmarks, tests), global arrays sharded over AXIS."""
  return functools.partial(_views_global, image_size=image_size,
                           crop_scale=tuple(crop_scale), mesh=mesh)


@functools.partial(jax.jit, static_argnames=('image_size', 'mesh'))
def _eval_images(images, indices, *, image_size, mesh):
  return jax.shard_map(
      lambda data, rows: augment_resize.resize_whole(data[rows], image_size),
      mesh=mesh, in_specs=(P(AXIS), P(AXIS)), out_specs=P(AXIS))(images, indices)


def make_eval_images(mesh: Mesh, image_size: int):
  """Jitted f(images, indices) -> (B, S, S, 3) uint8 sharded over AXIS: the
  rows resized whole to S (the evaluation transform of small images)."""
  return functools.partial(_eval_images, image_size=image_size, mesh=mesh)


@functools.partial(jax.jit, static_argnames=('image_size', 'crop_scale', 'mesh'))
def _one_view(images, indices, rng, step, *, image_size, crop_scale, mesh):
  def per_device(data, rows, rng, step):
    local = rows.shape[0]
    start = jax.lax.axis_index(AXIS) * local
    keys = jax.lax.dynamic_slice_in_dim(
        crop_rngs(rng, step, 0, local * jax.lax.axis_size(AXIS)), start, local, axis=0)
    return augment_resize.random_resized_crop_flip(data[rows], keys, image_size, crop_scale)
  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(AXIS), P(AXIS), P(), P()),
                       out_specs=P(AXIS), check_vma=False)(images, indices, rng, step)


def make_one_view(mesh: Mesh, *, image_size: int, crop_scale):
  """Jitted f(images, indices, rng, step) -> (B, S, S, 3) uint8: one
  random-resized crop + flip per example (linear evaluation's training view)."""
  return functools.partial(_one_view, image_size=image_size,
                           crop_scale=tuple(crop_scale), mesh=mesh)
