"""The order of a training epoch: a uniformly random permutation of this
process's whole part of the split, drawn anew each epoch from (seed, process,
epoch), as the reference's DistributedSampler(shuffle=True).

Records are permuted through an index: folder records (path, label) are
always held in memory; a TFDS split's encoded images are read into memory
once when they fit in IN_MEMORY_BYTES (CIFAR-10: 110 MiB), or with
data.cache. A TFDS split larger than that cannot be read in a random order
(TFRecord files are sequential): its files are read in an order keyed by
(seed, process, epoch) through a shuffle buffer of IN_MEMORY_BYTES, an
approximate shuffle, with a warning.
"""
import numpy as np
import tensorflow as tf
from absl import logging

from moco_jax.data.permutation import epoch_permutation
from moco_jax.data.sources import ProcessSplit, is_folder, process_split

# Encoded images one process keeps in memory to permute a TFDS split exactly.
IN_MEMORY_BYTES = 4 << 30

_warned = set()


def _warn_once(message: str):
  if message not in _warned:
    _warned.add(message)
    logging.warning(message)
    print(f'warning: {message}', flush=True)


def _one_tensor_per_key(records: tf.data.Dataset, count: int) -> dict:
  """The whole dataset as one batch: {key: (count, ...) tensor}."""
  return records.batch(max(count, 1)).get_single_element()


class EpochOrder:
  """This process's training records, in a new random order each epoch.

  `records(epoch, start)` gives the epoch's records from position `start`
  on, each as {'position': int64 (in the epoch's order), 'record': ...};
  `load` turns a record into {'image': encoded, 'label': int64}.

  Attributes:
    num_examples: records per epoch.
    exact: False when the order is only approximately uniform (a TFDS split
      too large for memory; see the module docstring).
    unreadable: records dropped because they could not be read into memory
      (data.cache); 0 otherwise.
    unreadable_names: their paths (bytes) when known (folders).
  """

  def __init__(self, data_config, split: ProcessSplit, seed: int, process: int):
    self._data_config, self._seed, self._process = data_config, seed, process
    self.num_examples = split.num_examples
    self.unreadable, self.unreadable_names = 0, []
    folder = is_folder(data_config.dataset)
    record_bytes = split.record_bytes or 0
    self.exact = folder or data_config.cache or record_bytes <= IN_MEMORY_BYTES
    if 'shuffle_buffer' in data_config:
      _warn_once('data.shuffle_buffer is ignored: every epoch is a full random '
                 'permutation of the split; remove the key from the config')
    if not self.exact:
      self._buffer = max(1, int(IN_MEMORY_BYTES / (record_bytes / split.num_examples)))
      self.load = split.load
      _warn_once(
          f'data.dataset {data_config.dataset!r}: the {data_config.train_split} split '
          f'(~{record_bytes / 2**30:.0f} GiB for this process) exceeds the '
          f'{IN_MEMORY_BYTES / 2**30:.0f} GiB held in memory; each epoch reads its '
          f'files in a random order through a {self._buffer}-record shuffle buffer, '
          f'which only approximates a uniform permutation (a folder: dataset, or '
          f'data.cache=True with enough memory, is shuffled exactly; so is any size with '
          f'data.loader=grain on an array_record preparation, docs/input.md)')
      return
    if folder and not data_config.cache:
      self._table, self.load = _one_tensor_per_key(split.records, split.num_examples), split.load
    else:
      loaded = split.records.map(tf.autograph.experimental.do_not_convert(split.load),
                                   num_parallel_calls=tf.data.AUTOTUNE)
      self._table = _one_tensor_per_key(loaded.ignore_errors(), split.num_examples)
      self.unreadable = split.num_examples - int(tf.shape(self._table['label'])[0])
      if self.unreadable and 'path' in self._table:
        listed = _one_tensor_per_key(split.records, split.num_examples)['path'].numpy()
        self.unreadable_names = sorted(set(listed) - set(self._table['path'].numpy()))
      self.load = lambda record: record
    self._table_size = split.num_examples - self.unreadable

  def records(self, epoch: int, start: int) -> tf.data.Dataset:
    """The epoch's records from position `start` on."""
    if not self.exact:
      as_item = tf.autograph.experimental.do_not_convert(
          lambda position, record: {'position': position, 'record': record})
      return self._approximate(epoch).enumerate().skip(start).map(as_item)
    order = epoch_permutation(self._table_size, self._seed, self._process, epoch)[start:]
    table = {key: tf.gather(value, order) for key, value in self._table.items()}
    positions = tf.range(start, start + len(order), dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices({'position': positions, 'record': table})

  def names(self, epoch: int, positions) -> list[bytes]:
    """Names of the records at `positions` of `epoch`, for reports of
    unreadable files: a folder's file paths; else the record's index in this
    process's part (b'record 17'), or with an approximate order only its
    place (b'epoch 2 position 5')."""
    if not self.exact:
      return [b'epoch %d position %d' % (epoch, p) for p in positions]
    order = epoch_permutation(self._table_size, self._seed, self._process, epoch)
    indices = order[np.asarray(positions, np.int64)]
    if 'path' in self._table:
      paths = self._table['path'].numpy()
      return [bytes(paths[i]) for i in indices]
    return [b'record %d' % i for i in indices]

  def _approximate(self, epoch: int) -> tf.data.Dataset:
    key = _int_seed(self._seed, self._process, epoch)
    split = process_split(self._data_config, self._data_config.train_split,
                          drop_remainder=True, file_shuffle_seed=key)
    return split.records.shuffle(self._buffer, seed=key, reshuffle_each_iteration=False)


def _int_seed(seed: int, process: int, epoch: int) -> int:
  """A 31-bit seed for tf.data / TFDS, a function of (seed, process, epoch)."""
  entropy = np.random.SeedSequence([seed % 2**64, process, epoch])
  return int(entropy.generate_state(1, np.uint32)[0] >> 1)
