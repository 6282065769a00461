"""Each training epoch is a uniformly random permutation of the split
(data/order.py), for folders and TFDS, and resuming stays exact."""
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import smoke_config
from moco_jax.data import order, pipeline

CLASSES, PER_CLASS, BATCH = 10, 100, 64


def chi2_critical(dof: int, z: float = 3.0902) -> float:
  """The chi-square distribution's upper quantile for standard-normal z
  (3.0902: p = 0.001), by the Wilson–Hilferty cube approximation (for 126
  degrees of freedom 180.85 against the tables' 180.80)."""
  return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def assert_classes_mixed(batches, steps):
  """The first batch holds >= 7 of 10 classes, and the (batch × class) counts
  of an epoch pass a chi-square test of independence at p = 0.001; a
  class-sorted order would give 1-2 classes per batch and a statistic in the
  thousands."""
  counts = np.array([np.bincount(next(batches)['label'], minlength=CLASSES)
                     for _ in range(steps)])
  print('class counts per batch:\n', counts)
  assert (counts[0] > 0).sum() >= 7
  expected = counts.sum(1, keepdims=True) * counts.sum(0, keepdims=True) / counts.sum()
  statistic = ((counts - expected) ** 2 / expected).sum()
  dof = (steps - 1) * (CLASSES - 1)
  print(f'chi-square {statistic:.1f} (critical {chi2_critical(dof):.1f}, dof {dof})')
  assert statistic < chi2_critical(dof)
  return counts


@pytest.fixture(scope='module')
def sorted_folder(tmp_path_factory):
  """10 class folders × 100 8×8 PNGs; listed sorted by class."""
  root = tmp_path_factory.mktemp('sorted') / 'images'
  rng = np.random.default_rng(0)
  for label in range(CLASSES):
    os.makedirs(root / f'class{label}')
    for index in range(PER_CLASS):
      pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / f'class{label}' / f'{index:03d}.png')
  return str(root)


@pytest.fixture(scope='module')
def sorted_tfds(tmp_path_factory):
  """The same as a TFDS dataset, its records sorted by class."""
  import tensorflow_datasets as tfds
  data_dir = tmp_path_factory.mktemp('sorted_tfds')
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(CLASSES), PER_CLASS).astype(np.int64)
  images = rng.integers(0, 256, (len(labels), 8, 8, 3), dtype=np.uint8)
  builder = tfds.dataset_builders.TfDataBuilder(
      name='sorted_images', version='1.0.0', data_dir=str(data_dir),
      split_datasets={'train': tf.data.Dataset.from_tensor_slices(
          {'image': images, 'label': labels})},
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(8, 8, 3)),
          'label': tfds.features.ClassLabel(num_classes=CLASSES)}))
  builder.download_and_prepare()
  return str(data_dir)


def data_config(source, location, cache=False):
  config = smoke_config(location if source == 'tfds' else '',
                        **{'data.image_size': 8, 'data.cache': cache})
  config.data.dataset = 'sorted_images' if source == 'tfds' else f'folder:{location}'
  if source == 'folder':
    config.data.train_split = '.'   # the folder itself: its subfolders are the classes
  return config.data


@pytest.mark.parametrize('source, cache', [('folder', False), ('folder', True),
                                           ('tfds', False)])
def test_an_epoch_mixes_the_classes(source, cache, sorted_folder, sorted_tfds):
  location = sorted_folder if source == 'folder' else sorted_tfds
  batches = pipeline.pretrain_batches(data_config(source, location, cache), BATCH, seed=0)
  steps = batches.steps_per_epoch
  assert steps == CLASSES * PER_CLASS // BATCH
  counts = assert_classes_mixed(batches, steps)
  # Each image at most once: no class over its 100 images.
  assert (counts.sum(0) <= PER_CLASS).all() and counts.sum() == steps * BATCH
  # The next epoch is a different order.
  second = np.array([np.bincount(next(batches)['label'], minlength=CLASSES)
                     for _ in range(steps)])
  assert not np.array_equal(counts, second)


def test_epoch_orders_are_permutations_keyed_by_seed_process_epoch(sorted_folder):
  config = data_config('folder', sorted_folder)
  split = pipeline.process_split(config, config.train_split, drop_remainder=True)

  def paths(seed, process, epoch, start=0):
    epochs = order.EpochOrder(config, split, seed, process)
    return [r['record']['path'] for r in epochs.records(epoch, start).as_numpy_iterator()]

  first = paths(0, 0, 0)
  assert sorted(first) == sorted(r['path'] for r in split.records.as_numpy_iterator())
  assert paths(0, 0, 0) == first                   # stateless
  assert paths(0, 0, 0, start=130) == first[130:]  # resume mid-epoch
  for other in (paths(1, 0, 0), paths(0, 1, 0), paths(0, 0, 1)):
    assert sorted(other) == sorted(first) and other != first


def test_a_tfds_split_too_large_for_memory_is_shuffled_approximately(
    sorted_tfds, monkeypatch, capsys):
  """Shuffled files + a buffer, with a warning; still stateless (resume exact)."""
  config = data_config('tfds', sorted_tfds)
  split = pipeline.process_split(config, config.train_split, drop_remainder=True)
  buffer = 200
  monkeypatch.setattr(order, 'IN_MEMORY_BYTES', buffer * split.record_bytes // split.num_examples)
  monkeypatch.setattr(order, '_warned', set())
  straight = pipeline.pretrain_batches(config, BATCH, seed=2)
  out = capsys.readouterr().out
  assert 'only approximates a uniform permutation' in out and f'{buffer}-record' in out
  reference = [next(straight) for _ in range(straight.steps_per_epoch + 2)]
  labels = np.concatenate([b['label'] for b in reference[:straight.steps_per_epoch]])
  assert len(np.unique(labels[:BATCH])) >= 3     # a buffer of ~200 spans 2-4 classes
  resumed = pipeline.pretrain_batches(config, BATCH, seed=2,
                                      start_step=straight.steps_per_epoch - 1)
  for expected in reference[-3:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_an_old_config_with_shuffle_buffer_still_works_and_warns(sorted_folder, capsys,
                                                                  monkeypatch):
  config = data_config('folder', sorted_folder)
  config.shuffle_buffer = 10
  monkeypatch.setattr(order, '_warned', set())
  batches = pipeline.pretrain_batches(config, BATCH, seed=0)
  assert 'data.shuffle_buffer is ignored' in capsys.readouterr().out
  assert (np.bincount(next(batches)['label'], minlength=CLASSES) > 0).sum() >= 7
