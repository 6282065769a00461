"""Which input a run uses: the host tf.data pipeline (data/pipeline.py) or a
device-resident split (data/device.py), by data.on_device.

TensorFlow is imported only when the host pipeline or a TFDS/folder split
is used, so an `npz:` dataset with data.on_device needs no TensorFlow.
"""
import dataclasses

from moco_jax.data import device, npz, subset
from moco_jax.data.device_batches import (DeviceEvalBatches, DeviceLabelledBatches,
                                          DeviceTrainBatches)
from moco_jax.data.info import DatasetError, DatasetInfo  # noqa: F401 (DatasetError re-exported)

# Images up to this side are evaluated resized whole (pipeline.SMALL_IMAGE_SIZE);
# larger ones need the host's resize + centre crop.
SMALL_IMAGE_SIZE = 64


def dataset_info(data_config, split: str | None = None) -> DatasetInfo:
  """Describes `split` (default data.train_split); DatasetError if unreadable.
  With data.labels_per_class, the training split's num_examples is the
  subset's (data/subset.py)."""
  if npz.is_npz(data_config.dataset):
    info = npz.dataset_info(data_config, split)
  else:
    from moco_jax.data import sources
    info = sources.dataset_info(data_config, split)
  chosen = subset.subset_of(data_config, split or data_config.train_split)
  return info if chosen is None else dataclasses.replace(info, num_examples=len(chosen))


def on_device(data_config, mesh, with_eval: bool = True) -> tuple[bool, str]:
  """(use a device-resident training split, why); see device.resolve_on_device.
  with_eval: the run also reads data.eval_split (kNN)."""
  splits = [data_config.train_split] + ([data_config.eval_split] if with_eval else [])
  return device.resolve_on_device(data_config, mesh, splits)


def _global_fn(mesh):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  sharding = NamedSharding(mesh, P(device.AXIS))
  return lambda local: jax.make_array_from_process_local_data(sharding, local)


def train_batches(data_config, local_batch: int, seed: int, start_step: int, mesh):
  """Pretraining input: DeviceTrainBatches ({'indices'}) when on device, else
  pipeline.pretrain_batches ({'images_q', 'images_k', 'label'})."""
  if on_device(data_config, mesh)[0]:
    split = device.device_split(data_config, data_config.train_split, mesh,
                                drop_remainder=True)
    return DeviceTrainBatches(split, local_batch, seed, start_step)
  from moco_jax.data import pipeline
  return pipeline.pretrain_batches(data_config, local_batch, seed, start_step)


def eval_batches(data_config, split: str, local_batch: int, mesh):
  """Evaluation input of `split`: from the devices when data.on_device
  resolves to True and data.image_size <= SMALL_IMAGE_SIZE, else the host's
  (pipeline.eval_batches). Batches' 'image' is then a global jax.Array."""
  if data_config.image_size <= SMALL_IMAGE_SIZE and on_device(data_config, mesh)[0]:
    part = device.device_split(data_config, split, mesh, drop_remainder=False)
    return DeviceEvalBatches(part, local_batch, data_config.image_size, mesh,
                             _global_fn(mesh))
  from moco_jax.data import pipeline
  return pipeline.eval_batches(data_config, split, local_batch)


def labelled_batches(data_config, local_batch: int, seed: int, start_step: int, mesh):
  """Linear evaluation's training input (one crop + flip per image, labels)."""
  if on_device(data_config, mesh)[0]:
    split = device.device_split(data_config, data_config.train_split, mesh,
                                drop_remainder=True)
    return DeviceLabelledBatches(split, local_batch, seed, start_step, data_config,
                                 mesh, _global_fn(mesh))
  from moco_jax.data import pipeline
  return pipeline.labelled_batches(data_config, local_batch, seed, start_step)
