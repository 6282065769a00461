"""Datasets stored as one .npz of uint8 images: `data.dataset = 'npz:/path/file.npz'`.

The file holds, for each split NAME, `NAME_images` (N, H, W, 3) uint8 and
`NAME_labels` (N,) integers (-1 for unlabelled), and optionally
`class_names` (C,) strings. Reading needs only NumPy (no TensorFlow), so a
machine with JAX alone can train on it with data.on_device. `export_npz`
writes such a file from a TFDS dataset (it imports TensorFlow lazily);
`python -m moco_jax.data.export_npz` is its command line.
"""
import functools
import io
import os

import numpy as np
from etils import epath

from moco_jax.data.info import DatasetError, DatasetInfo
from moco_jax.runtime import paths

NPZ_PREFIX = 'npz:'


def is_npz(dataset: str) -> bool:
  return dataset.startswith(NPZ_PREFIX)


def npz_path(dataset: str) -> str:
  return paths.absolute(dataset[len(NPZ_PREFIX):], expand_user=True)


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime: float):
  del mtime  # part of the cache key: a rewritten file is read again
  try:
    with np.load(io.BytesIO(paths.read_bytes(path)), allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (OSError, ValueError) as error:
    raise DatasetError(f'data.dataset npz:{path}: cannot read it as a .npz of uint8 '
                       f'images and labels ({str(error).splitlines()[0][:200]})') from None


def load_arrays(dataset: str) -> dict:
  """Every array of an npz: dataset, read once per file (kept in host memory)."""
  path = npz_path(dataset)
  if not paths.isfile(path):
    raise DatasetError(f'data.dataset {dataset!r}: {path} is not a file (expected '
                       f'{NPZ_PREFIX}/path/file.npz, written by python -m '
                       f'moco_jax.data.export_npz)')
  return _open(path, epath.Path(path).stat().mtime)


def splits(arrays: dict) -> list[str]:
  return sorted(key[:-len('_images')] for key in arrays if key.endswith('_images'))


def split_arrays(dataset: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images (N, H, W, 3) uint8, labels (N,) int32) of one split.

  Raises DatasetError naming the missing split or the bad array.
  """
  arrays = load_arrays(dataset)
  images, labels = arrays.get(f'{split}_images'), arrays.get(f'{split}_labels')
  if images is None or labels is None:
    raise DatasetError(f'data.dataset {dataset!r} has no split {split!r} (available: '
                       f'{", ".join(splits(arrays)) or "none"}; npz splits are whole: '
                       f'no TFDS slices such as train[:10%])')
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise DatasetError(f'data.dataset {dataset!r}: {split}_images is {images.dtype} '
                       f'{images.shape}; expected uint8 (N, H, W, 3)')
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise DatasetError(f'data.dataset {dataset!r}: {split}_labels is {labels.dtype} '
                       f'{labels.shape}; expected integers ({images.shape[0]},)')
  return images, labels.astype(np.int32)


def dataset_info(data_config, split: str | None = None) -> DatasetInfo:
  """The DatasetInfo of an npz: dataset's split (default data.train_split)."""
  split = split or data_config.train_split
  arrays = load_arrays(data_config.dataset)
  images, _ = split_arrays(data_config.dataset, split)
  if 'class_names' in arrays:
    class_names = tuple(str(name) for name in arrays['class_names'])
  else:
    largest = max(int(arrays[f'{s}_labels'].max(initial=-1)) for s in splits(arrays))
    class_names = tuple(str(c) for c in range(largest + 1))
  return DatasetInfo(name=data_config.dataset, data_dir=paths.dirname(
      npz_path(data_config.dataset)), num_examples=int(images.shape[0]),
                     num_classes=len(class_names), class_names=class_names)


def export_npz(dataset: str, data_dir: str | None, split_names, path: str) -> dict:
  """Decodes TFDS splits into one .npz (the format above); returns
  {split: examples}. Every image of a split must have the same size.

  Args:
    dataset: a TFDS name ('cifar10').
    data_dir: TFDS data_dir, or None for TFDS's default.
    split_names: e.g. ('train', 'test').
    path: the .npz to write (written to PATH.tmp, then renamed).
  """
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow_datasets as tfds
  builder = tfds.builder(dataset, data_dir=data_dir)
  arrays, counts = {}, {}
  for split in split_names:
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images, labels = data['image'], data.get('label')
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise DatasetError(f'{dataset} {split}: images of shape {images.shape}; '
                         f'expected (N, H, W, 3) of one size')
    if images.shape[-1] == 1:
      images = np.repeat(images, 3, axis=-1)
    arrays[f'{split}_images'] = images.astype(np.uint8)
    arrays[f'{split}_labels'] = (np.full(len(images), -1) if labels is None
                                 else labels).astype(np.int32)
    counts[split] = len(images)
  label = builder.info.features['label'] if 'label' in builder.info.features else None
  if getattr(label, 'names', None):
    arrays['class_names'] = np.array(label.names)
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  paths.write_bytes_atomic(path, buffer.getvalue())   # local or gs://
  return counts
