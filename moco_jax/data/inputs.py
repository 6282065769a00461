"""Which input a run uses, decided once: the host tf.data pipeline
(data/pipeline.py), the host Grain loader (data/grain_loader.py, by
data.loader) or a device-resident split (data/device.py), by
data.on_device and every split the run reads.

The caller (experiment.Experiment for pretraining, the evaluators for a
run of their own) calls `on_device` once and hands the answer, or the
device split it fetched, to the iterators below, which decide nothing.
Evaluation and labelled batches reach the evaluators as global arrays
sharded over 'data', from either path.

TensorFlow is imported only when the host pipeline or a TFDS/folder split
is used, so an `npz:` dataset with data.on_device needs no TensorFlow.
"""
import dataclasses

from moco_jax.data import device, npz, subset
from moco_jax.data.device_batches import (DeviceEvalBatches, DeviceLabelledBatches,
                                          DeviceTrainBatches, to_global_fn)
from moco_jax.data.info import DatasetInfo

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
  """(use device-resident splits, why): THE decision of a run, made once.
  with_eval: the run also reads data.eval_split (kNN, linear evaluation);
  see device.resolve_on_device."""
  splits = [data_config.train_split] + ([data_config.eval_split] if with_eval else [])
  return device.resolve_on_device(data_config, mesh, splits)


def train_split_on_device(data_config, mesh) -> device.DeviceSplit:
  """The training split on the devices (each process its part, remainder
  dropped): the pretraining step's and linear evaluation's data."""
  return device.device_split(data_config, data_config.train_split, mesh,
                             drop_remainder=True)


class GlobalBatches:
  """A host iterator whose batches' `keys` become global arrays sharded over
  'data' (jax.make_array_from_process_local_data); everything else (len,
  num_examples, skipped_images…) is the wrapped iterator's. Iterating gives a
  fresh pass of the wrapped iterable; next() advances the wrapped iterator."""

  def __init__(self, batches, mesh, keys):
    self._batches, self._keys, self._to_global = batches, keys, to_global_fn(mesh)

  def _convert(self, batch: dict) -> dict:
    return {key: self._to_global(batch[key]) for key in self._keys}

  def __len__(self) -> int:
    return len(self._batches)

  def __iter__(self):
    return (self._convert(batch) for batch in self._batches)

  def __next__(self) -> dict:
    return self._convert(next(self._batches))

  def __getattr__(self, name):
    return getattr(self._batches, name)


def train_batches(data_config, local_batch: int, seed: int, start_step: int,
                  split: device.DeviceSplit | None = None, loader: str | None = None):
  """Pretraining input: DeviceTrainBatches of `split` ({'indices'}) when the
  run's training split is on the devices, else the host's `loader`
  (pipeline.pretrain_batches or grain_loader.pretrain_batches: {'images_q',
  'images_k', 'label'}), this process's NumPy batches."""
  if split is not None:
    return DeviceTrainBatches(split, local_batch, seed, start_step)
  loader = loader or host_loader(data_config)
  _say_loader(data_config, loader)
  if loader == 'grain':
    from moco_jax.data import grain_loader
    return grain_loader.pretrain_batches(data_config, local_batch, seed, start_step)
  from moco_jax.data import pipeline
  return pipeline.pretrain_batches(data_config, local_batch, seed, start_step)


def host_loader(data_config) -> str:
  """'grain' or 'tf.data': the host input of data.loader
  (grain_loader.resolve_loader; DatasetError when it cannot be read so)."""
  from moco_jax.data import grain_loader
  return grain_loader.resolve_loader(data_config)


def _say_loader(data_config, loader: str):
  import jax
  if jax.process_index() == 0:
    print(f'input: {loader} (data.loader={data_config.get("loader", "auto")!r})',
          flush=True)


def eval_batches(data_config, split: str, local_batch: int, mesh, on_device: bool):
  """Evaluation input of `split`, batches of global arrays {'image', 'label',
  'mask'}: from the devices when the run's decision is on_device and
  data.image_size <= SMALL_IMAGE_SIZE, else from the host
  (pipeline.eval_batches)."""
  if on_device and data_config.image_size <= SMALL_IMAGE_SIZE:
    part = device.device_split(data_config, split, mesh, drop_remainder=False)
    return DeviceEvalBatches(part, local_batch, data_config.image_size, mesh)
  from moco_jax.data import pipeline
  return GlobalBatches(pipeline.eval_batches(data_config, split, local_batch), mesh,
                       ('image', 'label', 'mask'))


def labelled_batches(data_config, local_batch: int, seed: int, start_step: int, mesh,
                     on_device: bool):
  """Linear evaluation's training input (one crop + flip per image, labels),
  batches of global arrays {'image', 'label'}."""
  if on_device:
    return DeviceLabelledBatches(train_split_on_device(data_config, mesh), local_batch,
                                 seed, start_step, data_config, mesh)
  loader = host_loader(data_config)
  _say_loader(data_config, loader)
  if loader == 'grain':
    from moco_jax.data import grain_loader
    return GlobalBatches(grain_loader.labelled_batches(data_config, local_batch, seed,
                                                       start_step), mesh, ('image', 'label'))
  from moco_jax.data import pipeline
  return GlobalBatches(pipeline.labelled_batches(data_config, local_batch, seed,
                                                 start_step), mesh, ('image', 'label'))
