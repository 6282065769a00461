"""Host-side input: records -> decode -> two random crops + flips (uint8) -> batches.

The colour part of the augmentation runs on the device (augment.py). The
order of examples and every crop are functions of (seed, epoch, position), so
a run resumed at step s sees exactly the batches an uninterrupted run would.
Each process reads its own disjoint part of the split (data/sources.py) and
yields its local share of the global batch.

Images are decoded once and cropped twice; with data.fused_jpeg_crop a JPEG
is instead decoded only inside each crop window (decode_and_crop_jpeg), which
measured 0.8x as fast for MoCo's two crops and no faster for one
(BENCHMARKS.md). An image that cannot be read or decoded is skipped and
counted (`skipped_images`), never a crash.
"""
from typing import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf

from moco_jax.data.crops import crop_window
from moco_jax.data.order import EpochOrder
from moco_jax.data.info import DatasetError
from moco_jax.data.sources import process_split

# Keep TensorFlow off accelerators and quiet; JAX owns the devices.
tf.config.set_visible_devices([], 'GPU')


def _resize(image, image_size):
  resized = tf.image.resize(image, (image_size, image_size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def random_resized_crop(image, seed, image_size, scale):
  """A decoded image's random-resized crop.

  image: (H, W, 3) uint8; seed: (2,) int32 stateless seed.
  Returns (image_size, image_size, 3) uint8.
  """
  begin, size = crop_window(tf.shape(image), seed, scale)
  return _resize(tf.slice(image, begin, size), image_size)


def _decode(encoded):
  """Any format TF reads (grayscale, RGBA, first GIF frame) -> (H, W, 3) uint8."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode_random_crops(encoded, seeds, image_size, scale, fused_jpeg=False):
  """Random-resized crops of one encoded image, one per seed.

  encoded: scalar tf.string; seeds: (V, 2) stateless seeds.
  fused_jpeg: decode a JPEG only inside each crop window; otherwise decode
    once and crop V times.
  Returns (V, image_size, image_size, 3) uint8; identical windows either way.
  """
  num_views = seeds.shape[0]

  def decode_each_window():
    shape = tf.image.extract_jpeg_shape(encoded)
    crops = []
    for view in range(num_views):
      begin, size = crop_window(shape, seeds[view], scale)
      window = tf.stack([begin[0], begin[1], size[0], size[1]])
      crops.append(_resize(tf.image.decode_and_crop_jpeg(encoded, window, channels=3),
                           image_size))
    return tf.stack(crops)

  def decode_once():
    image = _decode(encoded)
    return tf.stack([random_resized_crop(image, seeds[view], image_size, scale)
                     for view in range(num_views)])

  if not fused_jpeg:
    return decode_once()
  return tf.cond(tf.io.is_jpeg(encoded), decode_each_window, decode_once)


def random_views(encoded, seed, data_config, num_views: int):
  """One encoded image -> (num_views, S, S, 3) uint8 random-resized crops,
  each randomly flipped; S = data.image_size. seed: (2,) stateless seed."""
  seeds = tf.random.experimental.stateless_split(seed, 2 * num_views)
  crop_seeds, flip_seeds = seeds[:num_views], seeds[num_views:]
  crops = decode_random_crops(encoded, crop_seeds, data_config.image_size,
                              data_config.crop_scale,
                              data_config.get('fused_jpeg_crop', False))
  return tf.stack([tf.image.stateless_random_flip_left_right(crops[view], flip_seeds[view])
                   for view in range(num_views)])


def example_seed(seed: int, epoch, position, process: int):
  """(2,) int64 stateless seed of the image at `position` of `epoch` on
  `process`: its crop windows and flips (random_views). Shared with the Grain
  loader (data/grain_loader.py), so both draw the same views."""
  epoch_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.experimental.stateless_fold_in(
      epoch_seed, tf.cast(position, tf.int64) + process * 2**40)


def _train_order(data_config, local_batch: int, seed: int) -> tuple[EpochOrder, int]:
  """(order, steps_per_epoch) of this process's training split."""
  split = process_split(data_config, data_config.train_split, drop_remainder=True)
  steps_per_epoch = split.num_examples // local_batch
  if steps_per_epoch == 0:
    raise DatasetError(f'train.batch_size gives {local_batch} images per process '
                       f'but this process has only {split.num_examples} examples')
  return EpochOrder(data_config, split, seed, jax.process_index()), steps_per_epoch


class TrainBatches:
  """Endless iterator of this process's augmented training batches.

  Epoch e visits the process's records in a uniformly random order drawn
  from (seed, process, e) (data/order.py) and turns the example at position
  i into views with a seed of (seed, e, process, i), so a run resumed at
  step s starts with the batch an uninterrupted run would see there.
  An unreadable image is skipped and replaced by a repeat of another image
  of its batch (batches stay aligned to positions, so resuming is exact); a
  batch with no readable image is a DatasetError.

  Attributes:
    skipped_images: distinct images (files) this process could not read or
      decode so far; `unreadable_names` names them.
  """

  def __init__(self, data_config, local_batch: int, seed: int, start_step: int,
               make_example: Callable):
    self._order, self.steps_per_epoch = _train_order(data_config, local_batch, seed)
    self._data_config, self._local_batch, self._seed = data_config, local_batch, seed
    self._make_example = make_example
    self.skipped_images = self._order.unreadable
    self._unreadable = set(self._order.unreadable_names)
    self._epoch, skip = divmod(start_step, self.steps_per_epoch)
    self._start_epoch(skip)

  def _start_epoch(self, skip: int):
    self._next_batch = skip
    self._batches = self._epoch_dataset(self._epoch, skip).as_numpy_iterator()

  def _epoch_dataset(self, epoch: int, skip: int) -> tf.data.Dataset:
    """The epoch's batches after the first `skip`.

    Batch k is made from the positions [k·B, (k+1)·B) of the epoch's order
    (B = local_batch), so a batch never depends on an earlier one and a
    resumed run needs no replay; the unreadable images of a window are
    replaced by repeats of its readable ones.
    """
    process, seed, batch = jax.process_index(), self._seed, self._local_batch
    records = self._order.records(epoch, skip * batch).take(
        (self.steps_per_epoch - skip) * batch)
    load, make_example = self._order.load, self._make_example

    # The dataset functions here and in order/sources/device hold no Python
    # control flow on tensors: tracing them as they are skips AutoGraph's
    # conversion, which took over 1 s of CPU per dataset (one per epoch).
    @tf.autograph.experimental.do_not_convert
    def to_example(item):
      position = item['position']
      example = load(item['record'])
      return dict(make_example(example, example_seed(seed, epoch, position, process)),
                  position=position)

    @tf.autograph.experimental.do_not_convert
    def window_batch(window):
      examples = tf.data.Dataset.from_tensor_slices(window).map(
          to_example, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
      return examples.batch(batch)     # nothing when no image is readable

    @tf.autograph.experimental.do_not_convert
    def fill(readable):
      count = tf.shape(readable['position'])[0]
      filled = {key: tf.gather(value, tf.range(batch) % count)
                for key, value in readable.items() if key != 'position'}
      return dict(filled, readable=count, window=readable['position'][0] // batch,
                  positions=readable['position'])

    ds = records.batch(batch, drop_remainder=True).interleave(
        window_batch, cycle_length=4, block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.map(fill).with_options(options).prefetch(tf.data.AUTOTUNE)

  def __iter__(self):
    return self

  def _note_unreadable(self, readable_positions):
    """Names the files of this window that were not readable; counts each
    file once however often it is tried."""
    start = self._next_batch * self._local_batch
    missing = sorted(set(range(start, start + self._local_batch))
                     - set(readable_positions.tolist()))
    if missing:
      self._unreadable.update(self._order.names(self._epoch, missing))
      self.skipped_images = (self._order.unreadable - len(self._order.unreadable_names)
                             + len(self._unreadable))

  @property
  def unreadable_names(self) -> list[bytes]:
    """The unreadable files (folders: paths as bytes; TFDS: record names),
    sorted."""
    return sorted(self._unreadable)

  def __next__(self) -> dict:
    try:
      batch = next(self._batches)
    except StopIteration:
      batch = None
    if batch is None and self._next_batch == self.steps_per_epoch:
      self._epoch += 1
      self._start_epoch(0)
      batch = next(self._batches, None)
    if batch is None or int(batch['window']) != self._next_batch:
      raise DatasetError(
          f'batch {self._next_batch} of epoch {self._epoch} of data.dataset '
          f'{self._data_config.dataset!r} has no readable image among its '
          f'{self._local_batch} ({self.skipped_images} unreadable so far)')
    self._note_unreadable(batch.pop('positions'))
    self._next_batch += 1
    del batch['window'], batch['readable']
    return batch


def pretrain_batches(data_config, local_batch: int, seed: int,
                     start_step: int = 0) -> TrainBatches:
  """Endless iterator of this process's pretraining batches (see TrainBatches).

  Args:
    data_config: the `data` config section.
    local_batch: images per batch on this process (global batch /
      process_count).
    seed: the run's seed.
    start_step: batches already consumed (resume).

  Yields:
    {'images_q': (local_batch, S, S, 3) uint8, 'images_k': same,
     'label': (local_batch,) int64} with S = data.image_size.
  """
  def two_views(example, example_seed):
    views = random_views(example['image'], example_seed, data_config, 2)
    return {'images_q': views[0], 'images_k': views[1], 'label': example['label']}

  return TrainBatches(data_config, local_batch, seed, start_step, two_views)


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
  the split (nothing dropped) and yields the same number of batches,
  `len(self)`, so that all processes run the same jitted steps; padding
  examples are zeros with mask False.

  Yields:
    {'image': (local_batch, S, S, 3) uint8, 'label': (local_batch,) int32,
     'mask': (local_batch,) bool}, S = data.image_size.
  """

  def __init__(self, data_config, split: str, local_batch: int):
    if local_batch <= 0:
      raise DatasetError(f'evaluation batch of {local_batch} images per process '
                         f'must be positive')
    part = process_split(data_config, split, drop_remainder=False)
    self.num_examples = part.split_examples  # all processes
    self.local_batch = local_batch
    self.image_size = data_config.image_size
    largest_part = -(-self.num_examples // jax.process_count())
    self._num_batches = -(-largest_part // local_batch)

    @tf.autograph.experimental.do_not_convert
    def transform(record):
      example = part.load(record)
      image = eval_transform(_decode(example['image']), data_config.image_size)
      image.set_shape((data_config.image_size, data_config.image_size, 3))
      return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

    # An unreadable image is left out (its batch is padded and masked).
    ds = part.records.map(transform, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
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
                     start_step: int = 0) -> TrainBatches:
  """Endless iterator of augmented, labelled training batches (linear eval).

  Same order and resume semantics as `pretrain_batches`, one view per image:
  RandomResizedCrop(data.image_size, data.crop_scale) + horizontal flip.

  Yields:
    {'image': (local_batch, S, S, 3) uint8, 'label': (local_batch,) int32}.
  """
  def one_view(example, example_seed):
    return {'image': random_views(example['image'], example_seed, data_config, 1)[0],
            'label': tf.cast(example['label'], tf.int32)}

  return TrainBatches(data_config, local_batch, seed, start_step, one_view)
