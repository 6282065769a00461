"""Where the images come from: a TFDS dataset, or a folder of the user's images.

`data.dataset` is either a TFDS name (`cifar10`, `imagenet2012`, ...) read
from `data.data_dir`, or `folder:/path`: one subfolder per class holding
images tf.io.decode_image reads (JPEG, PNG, GIF, BMP, WebP; the extension in
any case; file names in any byte encoding), labels numbered by sorted
class-folder name. Other files are ignored, counted in one start-up note. A folder's splits are its subfolders named like the split
(`/path/train`, `/path/val`); when `/path/<train_split>` does not exist the
folder itself is the training split.

For one split, `process_split` gives this process's part as a tf.data
dataset of small records plus `load`, which turns a record into
{'image': encoded bytes, 'label': int64}. Keeping `load` apart lets the
pipeline shuffle cheap records (file paths) and read a file only when an
example is used.
"""
import collections
import dataclasses
import functools
import os
from typing import Callable

import jax
import numpy as np

# TensorFlow logs every image it fails to decode (C++ warnings such as "Local
# rendezvous is aborting ... Unknown image file format"); unreadable files are
# reported once each by the pipeline instead. Only effective when TensorFlow
# is not imported yet; the CLIs set it too.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from moco_jax.data import subset as subset_lib  # noqa: E402
from moco_jax.data.info import DatasetError, DatasetInfo, process_part  # noqa: E402
from moco_jax.runtime import paths as path_layer  # noqa: E402  (`paths` is a local name below)

FOLDER_PREFIX = 'folder:'
# What tf.io.decode_image reads, compared case-insensitively.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp')
_IMAGE_EXTENSIONS_BYTES = tuple(ext.encode() for ext in IMAGE_EXTENSIONS)


@dataclasses.dataclass(frozen=True)
class ProcessSplit:
  """This process's part of one split.

  records: tf.data.Dataset of records, in a fixed order.
  load: record -> {'image': scalar tf.string (encoded), 'label': int64}.
  num_examples: records in `records` (this process).
  split_examples: examples in the whole split (all processes).
  record_bytes: about how many bytes this process's loaded records (encoded
    images) take; None where records are small and `load` reads the image
    (folders).
  """
  records: tf.data.Dataset
  load: Callable[[dict], dict]
  num_examples: int
  split_examples: int
  record_bytes: int | None = None


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


def process_split(data_config, split: str, drop_remainder: bool,
                  file_shuffle_seed: int | None = None) -> ProcessSplit:
  """This process's disjoint part of `split`.

  With drop_remainder every process gets the same number of examples (the
  last few of the split are unused); without it all examples are covered.
  file_shuffle_seed: TFDS only; read the part's files in an order keyed by
  this seed (records inside a file keep their order). Default: fixed order.
  """
  if is_folder(data_config.dataset):
    return _folder_process_split(data_config, split, drop_remainder)
  builder = _tfds_builder(data_config)
  split_examples = _tfds_split_size(builder, data_config, split)
  subset = subset_lib.subset_of(data_config, split)
  if subset is not None:   # data.labels_per_class: this process's part of it
    split_examples = len(subset)
    part = subset[process_part(len(subset), drop_remainder)]
    keep = np.zeros(_tfds_split_size(builder, data_config, split), bool)
    keep[part] = True
    keep = tf.constant(keep)
    records = tfds.load(data_config.dataset, data_dir=_data_dir(data_config),
                        split=split, decoders={'image': tfds.decode.SkipDecoding()},
                        shuffle_files=False)
    kept = tf.autograph.experimental.do_not_convert(lambda i, _: keep[i])
    record = tf.autograph.experimental.do_not_convert(lambda _, r: r)
    records = records.enumerate().filter(kept).map(record)
    records = records.apply(tf.data.experimental.assert_cardinality(len(part)))
  else:
    shuffle = {} if file_shuffle_seed is None else dict(
        read_config=tfds.ReadConfig(shuffle_seed=file_shuffle_seed, try_autocache=False))
    records = tfds.load(
        data_config.dataset, data_dir=_data_dir(data_config),
        split=tfds.split_for_jax_process(split, drop_remainder=drop_remainder),
        decoders={'image': tfds.decode.SkipDecoding()},
        shuffle_files=file_shuffle_seed is not None, **shuffle)

  def load(example):
    label = example['label'] if 'label' in example else tf.constant(-1, tf.int64)
    return {'image': example['image'], 'label': tf.cast(label, tf.int64)}

  num_examples = int(records.cardinality())
  # Per example, averaged over the prepared splits (a slice has no size).
  splits = builder.info.splits.values()
  bytes_per_example = (sum(s.num_bytes for s in splits)
                       / max(1, sum(s.num_examples for s in splits)))
  return ProcessSplit(records=records, load=load, num_examples=num_examples,
                      split_examples=split_examples,
                      record_bytes=int(num_examples * bytes_per_example))


def split_labels(dataset: str, data_dir: str, split: str) -> np.ndarray:
  """(N,) int64 labels of a whole TFDS or folder split, in record order.

  Raises:
    DatasetError: the dataset has no 'label' feature.
  """
  data_config = _LabelsConfig(dataset, data_dir, split)
  if is_folder(dataset):
    return np.asarray(_folder_split(data_config, split).labels, np.int64)
  builder = _tfds_builder(data_config)
  _tfds_split_size(builder, data_config, split)
  if 'label' not in builder.info.features:
    raise DatasetError(f'data.dataset {dataset!r} has no labels (no \'label\' '
                       f'feature): data.labels_per_class needs a labelled dataset')
  records = tfds.load(dataset, data_dir=data_dir or None, split=split,
                      decoders={'image': tfds.decode.SkipDecoding()})
  labels = records.map(tf.autograph.experimental.do_not_convert(lambda r: r['label']),
                       num_parallel_calls=tf.data.AUTOTUNE)
  return np.fromiter(labels.as_numpy_iterator(), np.int64)


@dataclasses.dataclass(frozen=True)
class _LabelsConfig:
  """The data-config keys that the readers below look at."""
  dataset: str
  data_dir: str
  train_split: str


# ----------------------------------------------------------------------------
# TFDS


def _tfds_builder(data_config):
  name, data_dir = data_config.dataset, _data_dir(data_config)
  if data_dir is not None and not tf.io.gfile.isdir(data_dir):   # gs:// too
    raise DatasetError(f'data.data_dir {data_dir!r} does not exist')
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as error:  # tfds raises ValueError, AssertionError, … for bad names
    # A name TFDS cannot parse ('cifar-10') needs no reason beyond the hint.
    first_line = str(error).splitlines()[0][:200] if str(error) else ''
    reason = ('' if isinstance(error, tfds.core.registered.DatasetNotFoundError)
              or 'Parsing builder name string' in first_line else f' ({first_line})')
    raise DatasetError(
        f'unknown data.dataset {name!r}{reason}: neither a TFDS dataset name '
        f'(e.g. cifar10, imagenet2012{_close_tfds_names(name)}) found in '
        f'{data_dir or "TFDS data_dir"} nor {FOLDER_PREFIX}/path/to/images') from None


def _close_tfds_names(name: str) -> str:
  """', or did you mean X' for a misspelt TFDS name ('cifar-10', 'CIFAR10')."""
  import difflib
  wanted = name.strip().lower().replace('-', '').replace('_', '')
  names = {n.replace('_', ''): n for n in tfds.list_builders(with_community_datasets=False)}
  base = name.split(':')[0].split('/')[0]
  close = difflib.get_close_matches(wanted.split(':')[0].split('/')[0], list(names), n=1)
  return f'; did you mean {names[close[0]]}?' if close and names[close[0]] != base else ''


def _tfds_split_size(builder, data_config, split: str) -> int:
  """Examples in `split` (TFDS slice syntax such as 'train[:10%]' allowed).

  Raises:
    DatasetError, one line: a split the dataset does not have (the fix is
    another name), a malformed or out-of-range slice (the fix is the slice),
    a slice that selects no example, or a dataset with nothing prepared (the
    only case `tfds build` fixes).
  """
  prepared = sorted(builder.info.splits)
  where = f'data.dataset {data_config.dataset!r} in {builder.data_dir}'
  try:
    size = builder.info.splits[split].num_examples
  except (KeyError, ValueError, AssertionError) as error:
    base = split.split('[')[0].split('+')[0].strip()
    if not prepared:
      raise DatasetError(
          f'{where} has no prepared split (asked for {split!r}): point '
          f'--config.data.data_dir at the folder that holds the prepared '
          f'{data_config.dataset}, or prepare it there with `tfds build '
          f'{data_config.dataset} --data_dir=DIR`') from None
    if base not in prepared:
      raise DatasetError(
          f'{where} has no prepared split {split!r} (its splits: '
          f'{", ".join(prepared)}); name one of them, e.g. {_split_flag(data_config, split)}='
          f'{([p for p in prepared if p != data_config.train_split] or prepared)[0]}') from None
    reason = ' '.join(str(error).split())
    reason = reason[reason.find('When'):] if 'When' in reason else reason[:160]
    raise DatasetError(
        f'split {split!r} of {where} is not a valid TFDS slice ({reason}); e.g. '
        f"{_split_flag(data_config, split)}='{base}[:10%]' or '{base}[:1000]'") from None
  if size <= 0:
    sizes = ', '.join(f'{name} {builder.info.splits[name].num_examples:,}' for name in prepared)
    raise DatasetError(
        f'split {split!r} of {where} selects no example ({sizes} examples); '
        f'choose a slice inside the split, e.g. '
        f'{_split_flag(data_config, split)}=\'{split.split("[")[0]}[:10%]\'')
  return size


def _split_flag(data_config, split: str) -> str:
  """The flag that set `split` (so the hint names what to change)."""
  key = 'train_split' if split == data_config.get('train_split') else 'eval_split'
  return f'--config.data.{key}'


# ----------------------------------------------------------------------------
# Folders of images


@dataclasses.dataclass(frozen=True)
class _FolderListing:
  directory: str
  class_names: tuple[str, ...]   # of the training split: the label vocabulary
  paths: tuple[bytes, ...]       # sorted by class, then by path
  labels: tuple[int, ...]


def _folder_root(data_config) -> str:
  root = path_layer.absolute(data_config.dataset[len(FOLDER_PREFIX):], expand_user=True)
  root = root.rstrip('/') or '/'
  if not path_layer.isdir(root):
    raise DatasetError(f'data.dataset {data_config.dataset!r}: {root} is not a '
                       f'directory (expected {FOLDER_PREFIX}/path with one '
                       f'subfolder of images per class)')
  return root


ROOT_SPLIT = '.'   # data.train_split/eval_split naming the folder itself


def _split_directory(data_config, split: str) -> str:
  """The folder of `split`: ROOT/<split>, which must exist ('.': ROOT itself).

  There is no fallback to ROOT for a missing training split: ROOT's
  subfolders would become classes, other splits among them (images of the
  evaluation split trained on as a class of their own, with no word).
  """
  root = _folder_root(data_config)
  candidate = root if split == ROOT_SPLIT else path_layer.join(root, split)
  if path_layer.isdir(candidate):
    return candidate
  subfolders = sorted(os.fsdecode(name) for name in _entries(root)[0]
                      if not name.startswith(b'.'))
  found = f'its subfolders: {", ".join(subfolders[:8])}{", …" if len(subfolders) > 8 else ""}'
  if split == data_config.train_split:
    raise DatasetError(
        f'data.dataset {data_config.dataset!r} has no folder for the training split '
        f'{split!r} ({candidate} does not exist; {found}): name the training '
        f'subfolder with --config.data.train_split=NAME, or train on the folder '
        f'itself with --config.data.train_split={ROOT_SPLIT} (its subfolders are '
        f'then the classes)')
  others = [name for name in subfolders if name != data_config.train_split]
  example = f'--config.data.eval_split={others[0]}' if others else 'an existing subfolder'
  raise DatasetError(
      f'data.dataset {data_config.dataset!r} has no folder for split {split!r} '
      f'({candidate} does not exist; {found}): name the evaluation subfolder '
      f'({example}); pretraining without kNN needs none (--config.eval.knn_every=0)')


def _check_no_split_inside_training(data_config, train_directory: str) -> None:
  """Refuses a training folder that holds another split's folder (which
  would be trained on as a class): the evaluation split, or any split named
  as a class folder of ROOT when training on ROOT itself."""
  others = {data_config.get('eval_split', '')} - {data_config.train_split, ''}
  root = _folder_root(data_config)
  for split in sorted(others):
    directory = root if split == ROOT_SPLIT else path_layer.join(root, split)
    inside = directory.startswith(train_directory.rstrip('/') + '/')
    if inside and path_layer.isdir(directory):
      raise DatasetError(
          f'the training split data.train_split={data_config.train_split!r} '
          f'({train_directory}) contains the evaluation split '
          f'data.eval_split={split!r} ({directory}): its images would be trained '
          f'on as a class of their own; keep the training images in a sibling '
          f'folder, e.g. {path_layer.join(root, "train")}, and set '
          f'--config.data.train_split=train')


def _folder_split(data_config, split: str) -> _FolderListing:
  directory = _split_directory(data_config, split)
  train_directory = _split_directory(data_config, data_config.train_split)
  _check_no_split_inside_training(data_config, train_directory)
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


def _is_image(name: bytes) -> bool:
  return name.lower().endswith(_IMAGE_EXTENSIONS_BYTES) and not name.startswith(b'.')


def _ignored_kind(name: bytes) -> str:
  """How a skipped file is counted: 'hidden' or its lower-case extension."""
  if name.startswith(b'.'):
    return 'hidden'
  extension = os.path.splitext(name)[1].lower()
  return os.fsdecode(extension) if extension else 'no extension'


def ignored_files_note(directory: str, ignored: collections.Counter) -> str:
  """One line counting the files of a folder dataset that are not images."""
  kinds = ', '.join(f'{count} {kind}' for kind, count in
                    sorted(ignored.items(), key=lambda item: (-item[1], item[0])))
  total = sum(ignored.values())
  return (f'note: {directory}: ignored {total} non-image file{"s" if total > 1 else ""} '
          f'({kinds}); images are the files tf.io.decode_image reads, ending in '
          f'{" ".join(IMAGE_EXTENSIONS)} (any case)')


@functools.lru_cache(maxsize=16)
def _scan(directory: str) -> tuple[tuple[str, ...], tuple[tuple[bytes, ...], ...]]:
  """(sorted class names, per class the sorted image paths under it).

  Paths are bytes, as the file system stores them, so names that are not
  valid UTF-8 (e.g. Latin-1 from an old archive) work. Prints one note
  counting the ignored files by extension. Listing an ImageNet-sized tree
  takes seconds, so it is done once per directory and process.
  """
  subdirs, loose = _entries(directory)
  class_dirs = [name for name in subdirs if not name.startswith(b'.')]
  if not class_dirs:
    images = sum(map(_is_image, loose))
    hint = (f'; found {images} images directly in it: move them into a '
            f'subfolder per class (one subfolder if unlabelled)' if images else '')
    raise DatasetError(f'{directory} has no class subfolders{hint}')
  ignored = collections.Counter(_ignored_kind(name) for name in loose)
  names, files = [], []
  for class_dir in class_dirs:
    found = []
    for parent, subdirs, filenames in _walk(directory, class_dir):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith(b'.'))
      for name in sorted(filenames):
        if _is_image(name):
          found.append(parent + b'/' + name)
        else:
          ignored[_ignored_kind(name)] += 1
    names.append(os.fsdecode(class_dir))
    files.append(tuple(found))
  if not any(files):
    raise DatasetError(
        f'no images ({", ".join(IMAGE_EXTENSIONS)}) in the class subfolders of '
        f'{directory}')
  if ignored and jax.process_index() == 0:
    print(ignored_files_note(directory, ignored), flush=True)
  return tuple(names), tuple(files)


def _entries(directory: str) -> tuple[list[bytes], list[bytes]]:
  """(subdirectory names, file names) of a directory, as bytes.

  Local: os.scandir on bytes (names that are not UTF-8 work). URLs (gs://):
  tf.io.gfile, which the input pipeline's tf.io.read_file also uses."""
  if path_layer.is_url(directory):
    _, subdirs, files = next(iter(tf.io.gfile.walk(directory)))
    return (sorted(d.rstrip('/').encode() for d in subdirs),
            sorted(f.encode() for f in files))
  entries = sorted(os.scandir(os.fsencode(directory)), key=lambda entry: entry.name)
  return ([e.name for e in entries if e.is_dir()], [e.name for e in entries if e.is_file()])


def _walk(directory: str, class_dir: bytes):
  """os.walk of directory/class_dir as bytes (parent, subdirs, files); the
  caller may prune subdirs in place."""
  if not path_layer.is_url(directory):
    yield from os.walk(os.path.join(os.fsencode(directory), class_dir), followlinks=True)
    return
  for parent, subdirs, files in tf.io.gfile.walk(f'{directory}/{os.fsdecode(class_dir)}'):
    names = [d.rstrip('/').encode() for d in subdirs]
    yield parent.rstrip('/').encode(), names, [f.encode() for f in files]
    subdirs[:] = [d for d in subdirs if d.rstrip('/').encode() in names]


def _folder_process_split(data_config, split: str, drop_remainder: bool) -> ProcessSplit:
  listing = _folder_split(data_config, split)
  index, count = jax.process_index(), jax.process_count()
  all_paths, all_labels = listing.paths, listing.labels
  subset = subset_lib.subset_of(data_config, split)
  if subset is not None:   # data.labels_per_class
    all_paths = tuple(all_paths[i] for i in subset)
    all_labels = tuple(all_labels[i] for i in subset)
  paths, labels = all_paths[index::count], all_labels[index::count]
  if drop_remainder:
    per_process = len(all_paths) // count
    paths, labels = paths[:per_process], labels[:per_process]
  records = tf.data.Dataset.from_tensor_slices(
      {'path': tf.constant(paths, tf.string), 'label': tf.constant(labels, tf.int64)})

  def load(record):
    # 'path' travels along so that an unreadable file can be named.
    return {'image': tf.io.read_file(record['path']), 'label': record['label'],
            'path': record['path']}

  return ProcessSplit(records=records, load=load, num_examples=len(paths),
                      split_examples=len(all_paths))
