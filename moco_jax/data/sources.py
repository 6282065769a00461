"""Where the images come from: a TFDS dataset, or a folder of the user's images.

`data.dataset` is either a TFDS name (`cifar10`, `imagenet2012`, ...) read
from `data.data_dir`, or `folder:/path`: one subfolder per class holding
images TensorFlow can decode (JPEG, PNG, GIF, BMP), labels numbered by sorted
class-folder name. A folder's splits are its subfolders named like the split
(`/path/train`, `/path/val`); when `/path/<train_split>` does not exist the
folder itself is the training split.

For one split, `process_split` gives this process's part as a tf.data
dataset of small records plus `load`, which turns a record into
{'image': encoded bytes, 'label': int64}. Keeping `load` apart lets the
pipeline shuffle cheap records (file paths) and read a file only when an
example is used.
"""
import dataclasses
import functools
import os
from typing import Callable

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp')


class DatasetError(ValueError):
  """The configured dataset cannot be read (bad name, missing data_dir, …)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  data_dir: str | None
  num_examples: int   # in the described split, all processes together
  num_classes: int
  class_names: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class ProcessSplit:
  """This process's part of one split.

  records: tf.data.Dataset of records, in a fixed order.
  load: record -> {'image': scalar tf.string (encoded), 'label': int64}.
  num_examples: records in `records` (this process).
  split_examples: examples in the whole split (all processes).
  """
  records: tf.data.Dataset
  load: Callable[[dict], dict]
  num_examples: int
  split_examples: int


def is_folder(dataset: str) -> bool:
  return dataset.startswith(FOLDER_PREFIX)


def _data_dir(data_config) -> str | None:
  return data_config.data_dir or None


def dataset_info(data_config, split: str | None = None) -> DatasetInfo:
  """Checks that `split` (default: data.train_split) is readable; describes it.

  Raises:
    DatasetError with a one-line message naming the bad value.
  """
  split = split or data_config.train_split
  if is_folder(data_config.dataset):
    listing = _folder_split(data_config, split)
    return DatasetInfo(name=data_config.dataset, data_dir=listing.directory,
                       num_examples=len(listing.paths),
                       num_classes=len(listing.class_names),
                       class_names=listing.class_names)
  builder = _tfds_builder(data_config)
  num_examples = _tfds_split_size(builder, data_config, split)
  label = builder.info.features['label'] if 'label' in builder.info.features else None
  return DatasetInfo(name=data_config.dataset, data_dir=_data_dir(data_config),
                     num_examples=num_examples,
                     num_classes=getattr(label, 'num_classes', 0) or 0,
                     class_names=tuple(getattr(label, 'names', None) or ()))


def process_split(data_config, split: str, drop_remainder: bool) -> ProcessSplit:
  """This process's disjoint part of `split`.

  With drop_remainder every process gets the same number of examples (the
  last few of the split are unused); without it all examples are covered.
  """
  if is_folder(data_config.dataset):
    return _folder_process_split(data_config, split, drop_remainder)
  split_examples = _tfds_split_size(_tfds_builder(data_config), data_config, split)
  records = tfds.load(
      data_config.dataset, data_dir=_data_dir(data_config),
      split=tfds.split_for_jax_process(split, drop_remainder=drop_remainder),
      decoders={'image': tfds.decode.SkipDecoding()}, shuffle_files=False)

  def load(example):
    label = example['label'] if 'label' in example else tf.constant(-1, tf.int64)
    return {'image': example['image'], 'label': tf.cast(label, tf.int64)}

  return ProcessSplit(records=records, load=load,
                      num_examples=int(records.cardinality()),
                      split_examples=split_examples)


# ----------------------------------------------------------------------------
# TFDS


def _tfds_builder(data_config):
  name, data_dir = data_config.dataset, _data_dir(data_config)
  if data_dir is not None and not tf.io.gfile.isdir(data_dir):   # gs:// too
    raise DatasetError(f'data.data_dir {data_dir!r} does not exist')
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetError(
        f'unknown data.dataset {name!r}: neither a TFDS dataset name (e.g. '
        f'cifar10, imagenet2012) found in {data_dir or "TFDS data_dir"} nor '
        f'{FOLDER_PREFIX}/path/to/images') from None


def _tfds_split_size(builder, data_config, split: str) -> int:
  """Examples in `split` (TFDS slice syntax such as 'train[:10%]' allowed)."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    raise DatasetError(
        f'data.dataset {data_config.dataset!r} has no prepared split {split!r} '
        f'in {builder.data_dir} (available: {sorted(builder.info.splits) or "none"}; '
        f'prepare it with `tfds build {data_config.dataset} --data_dir=...`)') from None


# ----------------------------------------------------------------------------
# Folders of images


@dataclasses.dataclass(frozen=True)
class _FolderListing:
  directory: str
  class_names: tuple[str, ...]   # of the training split: the label vocabulary
  paths: tuple[str, ...]         # sorted by class, then by path
  labels: tuple[int, ...]


def _folder_root(data_config) -> str:
  root = os.path.abspath(os.path.expanduser(data_config.dataset[len(FOLDER_PREFIX):]))
  if not os.path.isdir(root):
    raise DatasetError(f'data.dataset {data_config.dataset!r}: {root} is not a '
                       f'directory (expected {FOLDER_PREFIX}/path with one '
                       f'subfolder of images per class)')
  return root


def _split_directory(data_config, split: str) -> str:
  root = _folder_root(data_config)
  candidate = os.path.join(root, split)
  if os.path.isdir(candidate):
    return candidate
  if split == data_config.train_split:
    return root
  raise DatasetError(
      f'data.dataset {data_config.dataset!r} has no folder for split {split!r} '
      f'({candidate} does not exist; name an existing subfolder, e.g. '
      f'data.eval_split=val, or set eval.knn_every=0)')


def _folder_split(data_config, split: str) -> _FolderListing:
  directory = _split_directory(data_config, split)
  train_directory = _split_directory(data_config, data_config.train_split)
  class_names = _scan(train_directory)[0]
  names, files = _scan(directory)
  unknown = sorted(set(names) - set(class_names))
  if unknown:
    raise DatasetError(
        f'{directory} has class folders {unknown[:5]} that the training split '
        f'{train_directory} lacks')
  label_of = {name: index for index, name in enumerate(class_names)}
  paths, labels = [], []
  for name, class_files in zip(names, files):
    paths.extend(class_files)
    labels.extend([label_of[name]] * len(class_files))
  return _FolderListing(directory=directory, class_names=class_names,
                        paths=tuple(paths), labels=tuple(labels))


@functools.lru_cache(maxsize=16)
def _scan(directory: str) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
  """(sorted class names, per class the sorted image paths under it).

  Listing an ImageNet-sized tree takes seconds, so it is done once per
  directory and process.
  """
  def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('.')

  entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
  class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith('.')]
  loose = [e.name for e in entries if e.is_file() and is_image(e.name)]
  if not class_dirs:
    hint = (f'; found {len(loose)} images directly in it: move them into a '
            f'subfolder per class (one subfolder if unlabelled)' if loose else '')
    raise DatasetError(f'{directory} has no class subfolders{hint}')
  names, files = [], []
  for class_dir in class_dirs:
    found = []
    for parent, subdirs, filenames in os.walk(class_dir.path, followlinks=True):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
      found.extend(os.path.join(parent, f) for f in sorted(filenames) if is_image(f))
    names.append(class_dir.name)
    files.append(tuple(found))
  if not any(files):
    raise DatasetError(
        f'no images ({", ".join(IMAGE_EXTENSIONS)}) in the class subfolders of '
        f'{directory}')
  return tuple(names), tuple(files)


def _folder_process_split(data_config, split: str, drop_remainder: bool) -> ProcessSplit:
  listing = _folder_split(data_config, split)
  index, count = jax.process_index(), jax.process_count()
  paths, labels = listing.paths[index::count], listing.labels[index::count]
  if drop_remainder:
    per_process = len(listing.paths) // count
    paths, labels = paths[:per_process], labels[:per_process]
  records = tf.data.Dataset.from_tensor_slices(
      {'path': tf.constant(paths, tf.string), 'label': tf.constant(labels, tf.int64)})

  def load(record):
    return {'image': tf.io.read_file(record['path']), 'label': record['label']}

  return ProcessSplit(records=records, load=load, num_examples=len(paths),
                      split_examples=len(listing.paths))
