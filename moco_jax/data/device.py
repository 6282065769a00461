"""Device-resident datasets (data.on_device): the split decoded once into a
uint8 array on the devices, batches drawn by index, cropped on the device.

Placement: every device holds its process's whole part of the split, a copy
per device (replicated within the process). A step then gathers its rows
locally with no communication: sharding the split over the 'data' axis would
make each step an all-to-all of the gathered images, and CIFAR-10's 150 MB
is small against an accelerator's memory. Multi-host: each process decodes
and places only its own part (data/sources.process_split), as the host path.

Order: epoch e visits this process's part in the order
permutation.epoch_permutation(n, seed, process, e), batch k being positions
[k·B, (k+1)·B): the host path's definition (data/order.py), so resume is
exact and both paths see the same examples at the same step.

TensorFlow is imported only to decode a TFDS or folder split; an `npz:`
split (data/npz.py) needs NumPy alone.
"""
import collections
import dataclasses
import os

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax.data import npz
from moco_jax.data import subset as subset_lib
from moco_jax.data.info import DatasetError, process_part
from moco_jax.runtime.mesh import AXIS

ON_DEVICE_VALUES = (True, False, 'auto')
DEFAULT_MAX_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class DeviceSplit:
  """This process's part of one split, on the devices.

  images: global (devices · n_padded, H, W, 3) uint8 sharded over AXIS; each
    device's block is its process's part (padded with zeros to the largest
    part when the parts differ).
  labels: (n_padded,) int32 NumPy, this process's part.
  num_examples: readable examples of this process's part (n <= n_padded).
  split_examples: examples of the whole split (all processes).
  unreadable: examples of this part that could not be decoded.
  """
  images: jax.Array
  labels: np.ndarray
  num_examples: int
  split_examples: int
  unreadable: int = 0


def _decode_tf(data_config, split: str, drop_remainder: bool):
  """(images, labels, split_examples, unreadable) of a TFDS or folder split."""
  import tensorflow as tf
  from moco_jax.data import sources
  part = sources.process_split(data_config, split, drop_remainder)

  @tf.autograph.experimental.do_not_convert
  def decode(record):
    example = part.load(record)
    image = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
    return image, tf.cast(example['label'], tf.int32)

  decoded = part.records.map(decode, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  try:
    images, labels = decoded.batch(max(part.num_examples, 1)).get_single_element()
  except (tf.errors.InvalidArgumentError, tf.errors.OutOfRangeError) as error:
    raise DatasetError(
        f'data.dataset {data_config.dataset!r} {split}: data.on_device needs decodable '
        f'images of one size ({str(error).splitlines()[0][:160]}); use '
        f'data.on_device=False') from None
  images, labels = images.numpy(), labels.numpy()
  return images, labels, part.split_examples, part.num_examples - len(images)


def _load(data_config, split: str, drop_remainder: bool):
  if npz.is_npz(data_config.dataset):
    images, labels = npz.split_arrays(data_config.dataset, split)
    subset = subset_lib.subset_of(data_config, split)   # data.labels_per_class
    if subset is not None:
      images, labels = images[subset], labels[subset]
    part = process_part(len(images), drop_remainder)
    return images[part], labels[part], len(images), 0
  return _decode_tf(data_config, split, drop_remainder)


def place(images: np.ndarray, mesh) -> jax.Array:
  """(n, H, W, 3) -> global (mesh.size · n, H, W, 3) sharded over AXIS, a
  copy of `images` on each of this process's devices."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  shape = (mesh.size * images.shape[0],) + images.shape[1:]
  return jax.make_array_from_single_device_arrays(
      shape, NamedSharding(mesh, P(AXIS)), [jax.device_put(images, d) for d in local])


_CACHE = collections.OrderedDict()
_CACHE_SIZE = 3   # the training split, the kNN bank and queries of one run


def device_split(data_config, split: str, mesh, drop_remainder: bool) -> DeviceSplit:
  """This process's part of `split` on the mesh's devices, decoded once per
  (dataset, split, mesh): the training step and the evaluators share it.

  With drop_remainder every process has split_examples // processes
  examples; without, the parts cover the split and are padded to the
  largest (labels of padding rows are -1).
  """
  drop = drop_remainder and jax.process_count() > 1
  key = (data_config.dataset, data_config.get('data_dir', ''), split, drop,
         tuple(d.id for d in mesh.devices.flat), subset_lib.subset_key(data_config))
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  images, labels, split_examples, unreadable = _load(data_config, split, drop)
  if len(images) == 0:
    raise DatasetError(f'data.dataset {data_config.dataset!r} {split}: no readable '
                       f'image in this process\'s part')
  count = len(images)
  if not drop and jax.process_count() > 1:   # equal shapes on every process
    largest = -(-split_examples // jax.process_count())
    images = np.concatenate([images, np.zeros((largest - count,) + images.shape[1:],
                                              np.uint8)])
    labels = np.concatenate([labels, np.full(largest - count, -1, np.int32)])
  result = DeviceSplit(images=place(images, mesh), labels=labels.astype(np.int32),
                       num_examples=count, split_examples=split_examples,
                       unreadable=unreadable)
  _CACHE[key] = result
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return result


# ----------------------------------------------------------------------------
# data.on_device: True, False or 'auto'.
# data.on_device=True is refused when the splits need more than this fraction
# of a device's memory: the rest is the least the model, optimiser state and
# activations need to run at all.
FORCED_MAX_FRACTION = 0.9


def _split_shape(data_config, split: str):
  """(examples, H, W) of a split, or None when its images' size is unknown
  or varies (folders, TFDS images without a fixed shape)."""
  if npz.is_npz(data_config.dataset):
    images, _ = npz.split_arrays(data_config.dataset, split)
    return images.shape[:3]
  from moco_jax.data import sources
  if sources.is_folder(data_config.dataset):
    return None
  builder = sources._tfds_builder(data_config)
  shape = builder.info.features['image'].shape if 'image' in builder.info.features else None
  if shape is None or None in shape[:2]:
    return None
  return (sources._tfds_split_size(builder, data_config, split),) + tuple(shape[:2])


def device_memory_bytes(mesh) -> int:
  """Memory of one of the mesh's devices; on CPU, host RAM shared by the
  process's devices."""
  device = mesh.devices.flat[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  ram = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return ram // max(1, len(jax.local_devices()))


def resolve_on_device(data_config, mesh, splits) -> tuple[bool, str]:
  """(use device-resident data, why) for data.on_device and the splits the
  run reads.

  'auto' picks it when every split's images share one size and they fit in
  data.on_device_max_fraction of one device's memory (each device holds its
  process's part of every split).

  Raises:
    DatasetError: an npz: dataset with data.on_device=False or too large
      for 'auto', or a bad data.on_device value.
  """
  value = data_config.get('on_device', False)
  if value not in ON_DEVICE_VALUES:
    raise DatasetError(f'data.on_device={value!r} is not one of True, False, \'auto\'')
  is_npz = npz.is_npz(data_config.dataset)
  if value is False:
    if is_npz:
      raise DatasetError(f'data.dataset {data_config.dataset!r} is read to the devices '
                         f'only: set data.on_device=True or \'auto\'')
    return False, 'data.on_device=False'
  shapes = [_split_shape(data_config, split) for split in splits]
  known = all(shape is not None for shape in shapes)
  need = (sum(n * h * w * 3 for n, h, w in shapes) // jax.process_count() + 1
          if known else 0)
  have = device_memory_bytes(mesh)
  if value is True:
    if known and need > FORCED_MAX_FRACTION * have:
      raise DatasetError(
          f'data.on_device=True: the splits {", ".join(splits)} take '
          f'{need / 2**30:.2f} GiB per device, more than {FORCED_MAX_FRACTION:g} of the '
          f'device\'s {have / 2**30:.2f} GiB; set data.on_device=False (or \'auto\', '
          f'which decides by data.on_device_max_fraction)')
    return True, 'data.on_device=True'
  if not known:
    return False, 'auto: image sizes unknown or mixed'
  fraction = data_config.get('on_device_max_fraction', DEFAULT_MAX_FRACTION)
  if need > fraction * have:
    why = (f'the splits take {need / 2**20:.0f} MiB per device, more than '
           f'{fraction:g} of {have / 2**30:.1f} GiB (data.on_device_max_fraction)')
    if is_npz:
      raise DatasetError(f'data.dataset {data_config.dataset!r}: {why}; npz: data '
                         f'is only read to the devices')
    return False, f'auto: {why}'
  return True, f'auto: {need / 2**20:.0f} MiB per device'
