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


def _process_train_split(data_config, local_batch: int):
  """This process's part of the training split (cached if configured) and
  the number of full local batches in it per epoch."""
  split = tfds.split_for_jax_process(data_config.train_split, drop_remainder=True)
  base = _load_split(data_config, split)
  num_local = int(base.cardinality())
  steps_per_epoch = num_local // local_batch
  if steps_per_epoch == 0:
    raise DatasetError(f'train.batch_size gives {local_batch} images per process '
                       f'but this process has only {num_local} examples')
  if data_config.cache:
    base = base.cache()
  return base, steps_per_epoch


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
  base, steps_per_epoch = _process_train_split(data_config, local_batch)
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


# ----------------------------------------------------------------------------
# Evaluation input: deterministic, every example once, padded and masked.

# Images larger than this are evaluated as ImageNet is: resize the shorter side
# to image_size / 0.875 (224 -> 256), then center crop image_size.
SMALL_IMAGE_SIZE = 64


def eval_transform(image, image_size: int):
  """The deterministic evaluation view of one decoded image.

  Small images (image_size <= 64, e.g. CIFAR) are resized whole to
  image_size (a no-op at their own size); larger ones get torchvision's
  Resize(round(image_size / 0.875)) + CenterCrop(image_size).

  image: (H, W, 3) uint8. Returns (image_size, image_size, 3) uint8.
  """
  if image_size <= SMALL_IMAGE_SIZE:
    resized = tf.image.resize(image, (image_size, image_size), antialias=True)
  else:
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    short = round(image_size / 0.875)
    # torchvision: the shorter side becomes `short`, the longer int(long * r).
    scale = short / tf.reduce_min(shape)
    new_shape = tf.where(shape == tf.reduce_min(shape), float(short),
                         tf.floor(shape * scale))
    resized = tf.image.resize(image, tf.cast(new_shape, tf.int32), antialias=True)
    height, width = tf.unstack(tf.shape(resized)[:2])
    top = tf.cast(tf.round((height - image_size) / 2), tf.int32)
    left = tf.cast(tf.round((width - image_size) / 2), tf.int32)
    resized = tf.slice(resized, [top, left, 0], [image_size, image_size, 3])
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


class EvalBatches:
  """Every example of a split once, in a fixed order, in padded batches.

  Iterable any number of times (with data.cache the decoded, resized images
  are kept in memory after the first pass). Each process reads its part of
  the split (tfds.split_for_jax_process, nothing dropped) and yields the same
  number of batches, `len(self)`, so that all processes run the same jitted
  steps; padding examples are zeros with mask False.

  Yields:
    {'image': (local_batch, S, S, 3) uint8, 'label': (local_batch,) int32,
     'mask': (local_batch,) bool}, S = data.image_size.
  """

  def __init__(self, data_config, split: str, local_batch: int):
    if local_batch <= 0:
      raise DatasetError(f'evaluation batch of {local_batch} images per process '
                         f'must be positive')
    builder = tfds.builder(data_config.dataset, data_dir=_data_dir(data_config))
    if split not in builder.info.splits:
      raise DatasetError(
          f'data.dataset {data_config.dataset!r} has no prepared split {split!r} '
          f'(available: {sorted(builder.info.splits) or "none"})')
    self.num_examples = builder.info.splits[split].num_examples  # all processes
    self.local_batch = local_batch
    self.image_size = data_config.image_size
    largest_part = -(-self.num_examples // jax.process_count())
    self._num_batches = -(-largest_part // local_batch)
    ds = _load_split(data_config, tfds.split_for_jax_process(
        split, drop_remainder=False))

    def transform(example):
      image = tf.io.decode_image(example['image'], channels=3,
                                 expand_animations=False)
      image = eval_transform(image, data_config.image_size)
      image.set_shape((data_config.image_size, data_config.image_size, 3))
      return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    if data_config.cache:
      ds = ds.cache()
    options = tf.data.Options()
    options.deterministic = True
    self._dataset = ds.batch(local_batch).with_options(options).prefetch(
        tf.data.AUTOTUNE)

  def __len__(self) -> int:
    return self._num_batches

  def __iter__(self) -> Iterator[dict]:
    produced = 0
    for batch in self._dataset.as_numpy_iterator():
      yield _pad_batch(batch, self.local_batch)
      produced += 1
    empty = {'image': np.zeros((0, self.image_size, self.image_size, 3), np.uint8),
             'label': np.zeros((0,), np.int32)}
    for _ in range(produced, self._num_batches):
      yield _pad_batch(empty, self.local_batch)


def _pad_batch(batch: dict, size: int) -> dict:
  """Pads a batch's leading axis with zeros to `size`; adds 'mask'."""
  count = len(batch['label'])
  pad = lambda x: np.concatenate([x, np.zeros((size - count,) + x.shape[1:], x.dtype)])
  padded = {key: pad(value) for key, value in batch.items()}
  padded['mask'] = np.arange(size) < count
  return padded


def eval_batches(data_config, split: str, local_batch: int) -> EvalBatches:
  """This process's evaluation batches of `split`; see EvalBatches."""
  return EvalBatches(data_config, split, local_batch)


# ----------------------------------------------------------------------------
# Linear evaluation input: one random-resized crop + flip per image, labels.


def labelled_batches(data_config, local_batch: int, seed: int,
                     start_step: int = 0) -> Iterator[dict]:
  """Endless iterator of augmented, labelled training batches (linear eval).

  Same order and resume semantics as `pretrain_batches`, one view per image:
  RandomResizedCrop(data.image_size, data.crop_scale) + horizontal flip.

  Yields:
    {'image': (local_batch, S, S, 3) uint8, 'label': (local_batch,) int32}.
  """
  base, steps_per_epoch = _process_train_split(data_config, local_batch)
  epoch, skip = divmod(start_step, steps_per_epoch)
  process = jax.process_index()
  while True:
    epoch_seed = tf.constant([seed, epoch], tf.int64)

    def crop(position, example):
      example_seed = tf.random.experimental.stateless_fold_in(
          epoch_seed, position + process * 2**40)
      crop_seed, flip_seed = tf.unstack(
          tf.random.experimental.stateless_split(example_seed, 2))
      image = tf.io.decode_image(example['image'], channels=3,
                                 expand_animations=False)
      image = random_resized_crop(image, crop_seed, data_config.image_size,
                                  data_config.crop_scale)
      image = tf.image.stateless_random_flip_left_right(image, flip_seed)
      return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

    ds = base.shuffle(data_config.shuffle_buffer,
                      seed=((process * 1_000_003 + seed) * 100_003 + epoch) % 2**31,
                      reshuffle_each_iteration=False)
    ds = ds.take(steps_per_epoch * local_batch).enumerate().skip(skip * local_batch)
    ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.batch(local_batch, drop_remainder=True).with_options(options)
    yield from ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()
    epoch, skip = epoch + 1, 0
