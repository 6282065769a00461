"""Random-access training input with Grain: `data.loader = 'grain'`.

The host tf.data pipeline (data/pipeline.py) reads TFRecord files, which are
sequential: a split larger than order.IN_MEMORY_BYTES (4 GiB per process,
e.g. ImageNet) can only be shuffled approximately, and a resumed run re-reads
what it skips. A TFDS split prepared as `array_record` (or a `folder:` of
images) can be read at any index, so this loader visits every epoch in the
exact order of permutation.epoch_permutation(n, seed, process, epoch) at any
size, and a run resumed at step s reads nothing before step s's batch.

What a batch holds is the tf.data pipeline's, bit for bit: batch k of epoch e
is positions [k·B, (k+1)·B) of that permutation of this process's part of the
split (the part tfds.split_for_jax_process, or the folder's stride, gives),
and the image at position i gets its crop windows and flips from the seed
pipeline.example_seed(seed, e, i, process), decoded, cropped, resized and
flipped by the same TensorFlow ops (pipeline.random_views). An unreadable
image is replaced by a repeat of a readable one of its batch, as there.

Decode and crop run in Grain's worker processes (`data.worker_count`; 'auto'
from the host's cores; 0 runs them in threads of the training process). A
worker builds whole batches: the Grain dataset is the run's sequence of step
numbers from the resume step on, mapped to batches, so the input position
is the step number the orbax checkpoint already holds (state.step).

`resolve_loader` picks the loader once per run (data.loader 'auto': Grain
for an array_record preparation, tf.data otherwise) and raises a
one-line DatasetError when 'grain' is asked of a TFRecord-only preparation.
"""
import os
import signal

import jax
import numpy as np

from moco_jax.data.info import DatasetError
from moco_jax.data.permutation import epoch_permutation

LOADERS = ('auto', 'tf.data', 'grain')
# 'auto' workers: one per host core but one (the training process's), at most
# this many (each worker holds its own TensorFlow runtime, ~0.3 GiB).
MAX_AUTO_WORKERS = 64
# Batches each worker holds ready for the training loop. Host memory for
# input is about (workers + 1) x this x one batch (ImageNet, 256 images per
# host: 77 MB a batch).
WORKER_BUFFER = 1


def _is_folder(dataset: str) -> bool:
  from moco_jax.data.sources import FOLDER_PREFIX
  return dataset.startswith(FOLDER_PREFIX)


def conversion_command(version_dir) -> str:
  """The one-line conversion of a TFRecord preparation to array_record."""
  return (f'tfds convert_format --dataset_version_dir={version_dir} '
          f'--out_file_format=array_record')


def resolve_loader(data_config) -> str:
  """'grain' or 'tf.data': the loader of the training input of `data_config`.

  data.loader 'auto' picks Grain for a TFDS split prepared in array_record
  (tf.data could not read it, nor a TFRecord one over 4 GiB exactly), and
  tf.data otherwise: a `folder:` is already read in exact order and resumed
  without re-reading by tf.data (its records are file paths held in memory),
  which starts faster than Grain's worker processes.

  Raises:
    DatasetError (one line): an unknown data.loader; 'grain' for a TFDS
      dataset prepared only as TFRecord (with the conversion command);
      'tf.data' for one prepared only as array_record.
  """
  loader = data_config.get('loader', 'auto')
  if loader not in LOADERS:
    raise DatasetError(f'data.loader={loader!r} is not one of {", ".join(LOADERS)}')
  name = data_config.dataset
  if _is_folder(name):
    return 'grain' if loader == 'grain' else 'tf.data'
  from moco_jax.data import sources
  builder = sources._tfds_builder(data_config)
  formats = {f.value for f in builder.info.available_file_formats()}
  random_access = 'array_record' in formats
  if loader == 'grain' and not random_access:
    raise DatasetError(
        f'data.loader=\'grain\' needs random access, but data.dataset {name!r} is '
        f'prepared only as {"/".join(sorted(formats)) or "no format"} in '
        f'{builder.data_dir}; convert it once with `{conversion_command(builder.data_dir)}` '
        f'(or prepare it with `tfds build {name} --file_format=array_record`), or set '
        f'data.loader=tf.data')
  if loader == 'tf.data' and not formats & {'tfrecord'}:
    raise DatasetError(
        f'data.loader=\'tf.data\' reads TFRecord files, but data.dataset {name!r} is '
        f'prepared only as {"/".join(sorted(formats))} in {builder.data_dir}; set '
        f'data.loader=grain (or auto)')
  return 'tf.data' if loader == 'tf.data' or not random_access else 'grain'


def worker_count(data_config) -> int:
  """Grain worker processes: data.worker_count, or for 'auto' the host's
  cores less one (capped at MAX_AUTO_WORKERS). 0: threads of this process."""
  count = data_config.get('worker_count', 'auto')
  problem = worker_count_problem(count)
  if problem:
    raise DatasetError(problem)
  if count == 'auto':
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return max(0, min((cores or 1) - 1, MAX_AUTO_WORKERS))
  return count


def worker_count_problem(count) -> str | None:
  """A one-line problem with a data.worker_count value, or None."""
  if count == 'auto' or (isinstance(count, int) and not isinstance(count, bool)
                         and count >= 0):
    return None
  return f'data.worker_count={count!r} must be \'auto\' or an integer >= 0'


# ----------------------------------------------------------------------------
# This process's records, readable at any index (pickled into the workers).


class ProcessRecords:
  """Random access to this process's part of a split: the records
  pipeline's `process_split(..., drop_remainder=True)` yields, in its order.

  `read(i)` -> (encoded image bytes, label int); `name(i)` names record i
  for reports of unreadable images (a folder's path; else b'record i', as
  order.EpochOrder.names).
  """

  def __init__(self, data_config, split: str):
    self._paths = None
    if _is_folder(data_config.dataset):
      from moco_jax.data import sources
      part = sources.process_split(data_config, split, drop_remainder=True)
      table = part.records.batch(max(part.num_examples, 1)).get_single_element()
      self._paths = [bytes(p) for p in table['path'].numpy()]
      self._labels = table['label'].numpy().astype(np.int64)
      self.split_examples = part.split_examples
      return
    import tensorflow_datasets as tfds
    self._source = tfds.data_source(
        data_config.dataset, data_dir=data_config.data_dir or None, download=False,
        split=tfds.split_for_jax_process(split, drop_remainder=True),
        decoders={'image': tfds.decode.SkipDecoding()})
    from moco_jax.data import sources
    builder = sources._tfds_builder(data_config)
    self.split_examples = sources._tfds_split_size(builder, data_config, split)

  def __len__(self) -> int:
    return len(self._paths) if self._paths is not None else len(self._source)

  def read(self, index: int) -> tuple[bytes, int]:
    if self._paths is not None:
      from moco_jax.runtime import paths
      return paths.read_bytes(os.fsdecode(self._paths[index])), int(self._labels[index])
    example = self._source[index]
    return example['image'], int(example.get('label', -1))

  def name(self, index: int) -> bytes:
    return self._paths[index] if self._paths is not None else b'record %d' % index


# ----------------------------------------------------------------------------
# Batches, built in the workers.


class _Views:
  """(encoded, epoch, position) -> (V, S, S, 3) uint8: the tf.data
  pipeline's views of the image at `position` of `epoch`, traced once per
  process into a tf.function (TensorFlow objects do not pickle)."""

  def __init__(self, data_config, seed: int, process: int, num_views: int):
    self._config = {'image_size': data_config.image_size,
                    'crop_scale': tuple(data_config.crop_scale),
                    'fused_jpeg_crop': data_config.get('fused_jpeg_crop', False)}
    self._seed, self._process, self._num_views = seed, process, num_views
    self._function = None

  def __getstate__(self):
    return dict(self.__dict__, _function=None)

  def _build(self):
    import ml_collections
    import tensorflow as tf
    from moco_jax.data import pipeline
    config = ml_collections.ConfigDict(self._config)
    seed, process, num_views = self._seed, self._process, self._num_views

    @tf.function(input_signature=[tf.TensorSpec([], tf.string),
                                  tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)])
    def views(encoded, epoch, position):
      example_seed = pipeline.example_seed(seed, epoch, position, process)
      return pipeline.random_views(encoded, example_seed, config, num_views)

    return views

  def __call__(self, encoded: bytes, epoch: int, position: int) -> np.ndarray:
    if self._function is None:
      self._function = self._build()
    return self._function(encoded, epoch, position).numpy()


class MakeBatch:
  """Step number -> this process's batch of that step (a Grain map).

  Returns {view keys: (B, V or nothing, S, S, 3) uint8, 'label': (B,),
  'readable': int, 'unreadable': (u,) int64 record indices}; a batch with
  no readable image has readable 0 and zero images.
  """

  def __init__(self, records: ProcessRecords, views: _Views, local_batch: int,
               steps_per_epoch: int, seed: int, process: int, keys: tuple, label_dtype):
    self.records, self._views = records, views
    self._local_batch, self.steps_per_epoch = local_batch, steps_per_epoch
    self._seed, self._process, self._keys = seed, process, keys
    self._label_dtype = label_dtype
    self._order = (None, None)

  def order(self, epoch: int) -> np.ndarray:
    """The epoch's permutation of this process's records (cached)."""
    if self._order[0] != epoch:
      self._order = (epoch, epoch_permutation(len(self.records), self._seed,
                                              self._process, epoch))
    return self._order[1]

  def __call__(self, step: int) -> dict:
    epoch, window = divmod(int(step), self.steps_per_epoch)
    start = window * self._local_batch
    indices = self.order(epoch)[start:start + self._local_batch]
    views, labels, unreadable = [], [], []
    for position, index in enumerate(indices, start):
      try:
        encoded, label = self.records.read(int(index))
        views.append(self._views(encoded, epoch, position))
        labels.append(label)
      except Exception:  # noqa: BLE001 (any unreadable or undecodable file, as tf.data's ignore_errors)
        unreadable.append(int(index))
    readable = len(views)
    if readable:
      # As pipeline.TrainBatches: the readable images, repeated in order.
      fill = np.arange(self._local_batch) % readable
      stacked = np.stack(views)[fill]
      labels = np.asarray(labels, self._label_dtype)[fill]
    else:
      size = self._views._config['image_size']
      stacked = np.zeros((self._local_batch, len(self._keys), size, size, 3), np.uint8)
      labels = np.zeros((self._local_batch,), self._label_dtype)
    batch = {key: stacked[:, view] for view, key in enumerate(self._keys)}
    return dict(batch, label=labels, readable=np.int64(readable),
                unreadable=np.asarray(unreadable, np.int64))


def _ignore_interrupts(worker_index: int, worker_count: int):
  """Workers leave SIGINT/SIGTERM to the training process, which saves and
  stops at a step boundary (runtime/preemption.py) and then ends them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


class GrainTrainBatches:
  """Endless iterator of this process's training batches read with Grain;
  the same batches as pipeline.TrainBatches (see the module docstring).

  Attributes:
    steps_per_epoch: batches per epoch of this process.
    skipped_images: distinct records that could not be read or decoded so
      far; `unreadable_names` names them.
    worker_count: Grain worker processes (0: threads of this process).
  """

  def __init__(self, data_config, local_batch: int, seed: int, start_step: int,
               keys: tuple, label_dtype, workers: int | None = None):
    import grain
    process = jax.process_index()
    records = ProcessRecords(data_config, data_config.train_split)
    self.steps_per_epoch = len(records) // local_batch
    if self.steps_per_epoch == 0:
      raise DatasetError(f'train.batch_size gives {local_batch} images per process '
                         f'but this process has only {len(records)} examples')
    self._data_config, self._local_batch = data_config, local_batch
    self._make = MakeBatch(records, _Views(data_config, seed, process, len(keys)),
                           local_batch, self.steps_per_epoch, seed, process, keys,
                           label_dtype)
    self.worker_count = worker_count(data_config) if workers is None else workers
    self._unreadable: set[int] = set()
    self.skipped_images = 0
    self._step = start_step
    # The run's steps from the resume step on; no run reaches the end.
    steps = grain.MapDataset.range(start_step, start_step + 2**50).map(self._make)
    if self.worker_count:
      from absl import flags
      if not flags.FLAGS.is_parsed():
        # Grain's workers read its absl flags; outside an absl app (Colab,
        # tests, benchmarks) nothing parsed them: use their defaults.
        flags.FLAGS.mark_as_parsed()
      dataset = steps.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
      dataset = dataset.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self.worker_count,
                                       per_worker_buffer_size=WORKER_BUFFER),
          worker_init_fn=_ignore_interrupts)
    else:
      threads = max(1, min(os.cpu_count() or 1, 8))
      dataset = steps.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=2 * threads))
    self._iterator = iter(dataset)

  def __iter__(self):
    return self

  @property
  def unreadable_names(self) -> list[bytes]:
    """The unreadable records' names (folders: paths as bytes), sorted."""
    return sorted(self._make.records.name(i) for i in self._unreadable)

  def __next__(self) -> dict:
    batch = next(self._iterator)
    epoch, window = divmod(self._step, self.steps_per_epoch)
    self._unreadable.update(batch.pop('unreadable').tolist())
    self.skipped_images = len(self._unreadable)
    if int(batch.pop('readable')) == 0:
      raise DatasetError(
          f'batch {window} of epoch {epoch} of data.dataset '
          f'{self._data_config.dataset!r} has no readable image among its '
          f'{self._local_batch} ({self.skipped_images} unreadable so far)')
    self._step += 1
    return batch

  def close(self):
    """Ends the worker processes (also done when the iterator is collected)."""
    close = getattr(self._iterator, 'close', None)
    if close is not None:
      close()


def pretrain_batches(data_config, local_batch: int, seed: int, start_step: int = 0,
                     workers: int | None = None) -> GrainTrainBatches:
  """pipeline.pretrain_batches read with Grain: {'images_q', 'images_k':
  (local_batch, S, S, 3) uint8, 'label': (local_batch,) int64}."""
  return GrainTrainBatches(data_config, local_batch, seed, start_step,
                           ('images_q', 'images_k'), np.int64, workers)


def labelled_batches(data_config, local_batch: int, seed: int, start_step: int = 0,
                     workers: int | None = None) -> GrainTrainBatches:
  """pipeline.labelled_batches read with Grain: {'image': (local_batch, S, S,
  3) uint8, 'label': (local_batch,) int32}."""
  return GrainTrainBatches(data_config, local_batch, seed, start_step, ('image',),
                           np.int32, workers)
