"""The two uint8 views of a device-resident batch: gather the step's rows,
then a random-resized crop + flip per example (resize.py), inside shard_map.

Crop keys are drawn per global example index from (state.rng, step), as the
colour keys are (train_step.py), so one device gives what eight give and a
resumed run draws what an uninterrupted one would. Pure JAX.
"""
import jax

from moco_jax.augment import resize
from moco_jax.runtime.mesh import AXIS, device_rows

# fold_in constant that separates the crop keys from the step's other keys.
CROP_STREAM = 0x63726F70  # 'crop'


def crop_rngs(rng, step, view: int, global_batch: int):
  """(global_batch,) keys of one view's crops and flips at `step`: key i is
  the global batch's example i (fold_in(fold_in(fold_in(rng, step),
  CROP_STREAM), view), split global_batch ways)."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, step),
                                              CROP_STREAM), view)
  return jax.random.split(key, global_batch)


def one_view(images, indices, rng, step, view: int, *, image_size: int, crop_scale):
  """This device's crops of view `view`, inside shard_map over AXIS.

  Args:
    images: (n, H, W, 3) uint8, this device's copy of its process's split.
    indices: (N,) int32 rows of `images`, this device's part of the batch.
    rng, step: the keys' source (a state's rng and step before the step).
    view: 0 (query) or 1 (key); image_size: output side S;
    crop_scale: RandomResizedCrop's area range.

  Returns:
    (N, S, S, 3) uint8.
  """
  local = indices.shape[0]
  keys = device_rows(crop_rngs(rng, step, view, local * jax.lax.axis_size(AXIS)), local)
  return resize.random_resized_crop_flip(images[indices], keys, image_size,
                                         tuple(crop_scale))


def device_views(images, indices, rng, step, *, image_size: int, crop_scale):
  """(views_q, views_k), each (N, S, S, 3) uint8: one_view's views 0 and 1."""
  return tuple(one_view(images, indices, rng, step, view, image_size=image_size,
                        crop_scale=crop_scale) for view in (0, 1))
