"""Host-side input: TFDS → decode → two random crops + flips (uint8) → batches.

The colour part of the augmentation runs on the device (augment.py). The
order of examples and every crop are functions of (seed, epoch, position), so
a run resumed at step s sees exactly the batches an uninterrupted run would.
Each process reads its own disjoint part of the split
(tfds.split_for_jax_process) and yields its local share of the global batch.
"""
import dataclasses
import os
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# Keep TensorFlow off accelerators and quiet; JAX owns the devices.
tf.config.set_visible_devices([], 'GPU')


class DatasetError(ValueError):
  """The configured dataset cannot be read (bad name, missing data_dir, …)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  data_dir: str | None
  num_examples: int   # in the training split, all processes together
  num_classes: int


def _data_dir(data_config) -> str | None:
  return data_config.data_dir or None


def dataset_info(data_config) -> DatasetInfo:
  """Checks that the dataset is readable here and describes it.

  Raises:
    DatasetError with a one-line message naming the bad value.
  """
  name, data_dir = data_config.dataset, _data_dir(data_config)
  if data_dir is not None and not os.path.isdir(data_dir):
    raise DatasetError(f'data.data_dir {data_dir!r} does not exist')
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetError(
        f'unknown data.dataset {name!r}: not a TFDS dataset name (e.g. '
        f'cifar10, imagenet2012) found in {data_dir or "TFDS data_dir"}') from None
  splits = builder.info.splits
  if data_config.train_split not in splits:
    where = builder.data_dir
    raise DatasetError(
        f'data.dataset {name!r} has no prepared split '
        f'{data_config.train_split!r} in {where} (prepare it with '
        f'`tfds build {name} --data_dir=...`; available: {sorted(splits) or "none"})')
  label = builder.info.features['label'] if 'label' in builder.info.features else None
  return DatasetInfo(name=name, data_dir=data_dir,
                     num_examples=splits[data_config.train_split].num_examples,
                     num_classes=getattr(label, 'num_classes', 0) or 0)


def random_resized_crop(image, seed, image_size, scale):
  """torchvision RandomResizedCrop: area fraction in `scale`, aspect 3/4–4/3.

  image: (H, W, 3) uint8; seed: (2,) int32 stateless seed.
  Returns (image_size, image_size, 3) uint8.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
      seed=seed, min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=tuple(scale), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, size)
  resized = tf.image.resize(crop, (image_size, image_size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def _two_views(example, seed, data_config):
  """One example -> (view_q, view_k) uint8 crops, each randomly flipped."""
  image = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  views = []
  for view in range(2):
    crop = random_resized_crop(image, seeds[2 * view], data_config.image_size,
                               data_config.crop_scale)
    views.append(tf.image.stateless_random_flip_left_right(crop, seeds[2 * view + 1]))
  return views


def _load_split(data_config, split):
  return tfds.load(data_config.dataset, split=split,
                   data_dir=_data_dir(data_config),
                   decoders={'image': tfds.decode.SkipDecoding()},
                   shuffle_files=False)


def pretrain_batches(data_config, local_batch: int, seed: int,
                     start_step: int = 0) -> Iterator[dict]:
  """Endless iterator of this process's pretraining batches.

  Args:
    data_config: the `data` config section.
    local_batch: images per batch on this process (global batch /
      process_count).
    seed: the run's seed.
    start_step: batches already consumed (resume): iteration starts at the
      batch an uninterrupted run would see at this step.

  Yields:
    {'images_q': (local_batch, S, S, 3) uint8, 'images_k': same,
     'label': (local_batch,) int64} with S = data.image_size.
  """
  split = tfds.split_for_jax_process(data_config.train_split, drop_remainder=True)
  base = _load_split(data_config, split)
  num_local = int(base.cardinality())
  steps_per_epoch = num_local // local_batch
  if steps_per_epoch == 0:
    raise DatasetError(f'train.batch_size gives {local_batch} images per process '
                       f'but this process has only {num_local} examples')
  if data_config.cache:
    base = base.cache()
  epoch, skip = divmod(start_step, steps_per_epoch)
  while True:
    for batch in _epoch_dataset(base, data_config, local_batch, seed, epoch,
                                skip, steps_per_epoch).as_numpy_iterator():
      yield batch
    epoch, skip = epoch + 1, 0


def _epoch_dataset(base, data_config, local_batch, seed, epoch, skip,
                   steps_per_epoch) -> tf.data.Dataset:
  """One epoch's batches, starting after `skip` batches."""
  epoch_seed = tf.constant([seed, epoch], tf.int64)
  process_seed = jax.process_index() * 1_000_003 + seed
  ds = base.shuffle(data_config.shuffle_buffer,
                    seed=(process_seed * 100_003 + epoch) % 2**31,
                    reshuffle_each_iteration=False)
  ds = ds.take(steps_per_epoch * local_batch).enumerate()
  ds = ds.skip(skip * local_batch)

  def to_views(position, example):
    example_seed = tf.random.experimental.stateless_fold_in(
        epoch_seed, position + jax.process_index() * 2**40)
    images_q, images_k = _two_views(example, example_seed, data_config)
    return {'images_q': images_q, 'images_k': images_k,
            'label': example.get('label', tf.constant(-1, tf.int64))}

  ds = ds.map(to_views, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)
