"""Datasets from folders of images, per-process splits, and the host-side crops."""
import io
import os

import jax
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import smoke_config
from moco_jax.data import sources
from moco_jax.data.info import DatasetError
from moco_jax.data import pipeline
from moco_jax.runtime.metric_writer import read_metrics

CLASSES = ('cat', 'dog', 'zebra')


def _save(path, array, fmt):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, format=fmt)


def build_image_folder(root, per_class=6, seed=0, corrupt=True):
  """A class-per-subfolder tree in every format, size and colour mode.

  Each class is a solid colour plus noise. Besides the images: a truncated
  JPEG (corrupt) in 'dog', a text file and a hidden file that must be
  ignored. Returns {'root', 'paths': valid images per class, 'corrupt'}.
  """
  rng = np.random.default_rng(seed)
  formats = [('JPEG', '.jpg'), ('PNG', '.png'), ('GIF', '.gif'), ('BMP', '.bmp'),
             ('JPEG', '.JPEG'), ('PNG', '.png')]
  paths = {}
  for label, name in enumerate(CLASSES):
    colour = np.array([80 * label, 255 - 80 * label, 128])
    paths[name] = []
    for index in range(per_class):
      height, width = rng.integers(12, 60, 2)
      rgb = np.clip(colour + rng.normal(0, 15, (height, width, 3)), 0, 255).astype(np.uint8)
      fmt, ext = formats[index % len(formats)]
      mode = index % 3
      if mode == 1:
        image = rgb.mean(-1).astype(np.uint8)                    # grayscale
      elif mode == 2 and fmt == 'PNG':
        image = np.dstack([rgb, np.full((height, width), 200, np.uint8)])  # RGBA
      else:
        image = rgb
      path = os.path.join(root, name, 'sub' if index == 4 else '', f'{index:02d}{ext}')
      _save(path, image, fmt)
      paths[name].append(path)
  corrupt_path = None
  if corrupt:
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(buffer, format='JPEG')
    corrupt_path = os.path.join(root, 'dog', 'zz_truncated.jpg')
    with open(corrupt_path, 'wb') as f:
      f.write(buffer.getvalue()[:100])
  with open(os.path.join(root, 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image')
  _save(os.path.join(root, 'cat', '.hidden.png'), np.zeros((4, 4, 3), np.uint8), 'PNG')
  return {'root': str(root), 'paths': paths, 'corrupt': corrupt_path}


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  return build_image_folder(tmp_path_factory.mktemp('folder') / 'images')


def folder_config(root, **overrides):
  # train_split '.': the folder itself, its subfolders the classes.
  config = smoke_config('', **{'data.train_split': '.', **overrides})
  config.data.dataset = f'folder:{root}'
  return config


def test_folder_listing_labels_and_formats(image_folder):
  config = folder_config(image_folder['root'])
  info = sources.dataset_info(config.data)
  assert info.class_names == CLASSES
  valid = sum(len(v) for v in image_folder['paths'].values())
  assert info.num_examples == valid + 1          # the corrupt file is listed
  split = sources.process_split(config.data, config.data.train_split, drop_remainder=False)
  records = list(split.records.as_numpy_iterator())
  got = {r['path'].decode(): int(r['label']) for r in records}
  expected = {p: CLASSES.index(name) for name, ps in image_folder['paths'].items()
              for p in ps}
  expected[image_folder['corrupt']] = CLASSES.index('dog')
  assert got == expected


def test_eval_batches_decode_every_format_and_skip_the_corrupt_file(image_folder):
  config = folder_config(image_folder['root'], **{'data.image_size': 16})
  batches = pipeline.eval_batches(config.data, config.data.train_split, 8)
  images, labels = [], []
  for batch in batches:
    images.append(batch['image'][batch['mask']])
    labels.append(batch['label'][batch['mask']])
  images, labels = np.concatenate(images), np.concatenate(labels)
  paths = image_folder['paths']
  assert len(images) == sum(len(v) for v in paths.values())      # corrupt skipped
  assert images.shape[1:] == (16, 16, 3) and images.dtype == np.uint8
  split = sources.process_split(config.data, config.data.train_split, drop_remainder=False)
  in_order = [r['path'].decode() for r in split.records.as_numpy_iterator()
              if r['path'].decode() != image_folder['corrupt']]
  # Each image against PIL's RGB conversion (grayscale replicated, alpha
  # dropped, GIF palette applied), per channel.
  for path, image, label in zip(in_order, images, labels):
    assert CLASSES[label] == os.path.relpath(path, image_folder['root']).split(os.sep)[0]
    reference = np.asarray(Image.open(path).convert('RGB').resize((16, 16)), np.float32)
    np.testing.assert_allclose(image.astype(np.float32).mean((0, 1)),
                               reference.mean((0, 1)), atol=6, err_msg=path)


def test_pretrain_batches_skip_and_count_the_corrupt_file(image_folder):
  config = folder_config(image_folder['root'], **{'data.image_size': 16})
  total = sources.dataset_info(config.data).num_examples   # 18 valid + 1
  batches = pipeline.pretrain_batches(config.data, 6, seed=0)
  assert batches.steps_per_epoch == total // 6 == 3
  epochs = 3
  seen, skipped = [], []
  for _ in range(epochs * batches.steps_per_epoch):
    seen.append(next(batches))
    skipped.append(batches.skipped_images)
  assert all(b['images_q'].shape == (6, 16, 16, 3) for b in seen)
  # An epoch uses 18 of the 19 files: the truncated JPEG unless the shuffle
  # puts it last. Its batch repeats one of its own 5 readable images. It is
  # counted once however many epochs try it, and named.
  repeats = [6 - len({image.tobytes() for image in batch['images_q']}) for batch in seen]
  assert set(repeats) <= {0, 1} and 1 <= sum(repeats) <= epochs
  assert batches.skipped_images == 1
  assert batches.unreadable_names == [image_folder['corrupt'].encode()]
  assert skipped == sorted(skipped) and skipped[repeats.index(1)] == 1
  labels = np.concatenate([b['label'] for b in seen[:3]])
  counts = np.bincount(labels, minlength=3)
  if not any(repeats[:3]):
    np.testing.assert_array_equal(counts, [6, 6, 6])        # each valid image once
  else:
    assert counts.sum() == 18 and counts[CLASSES.index('dog')] in (5, 6, 7)


def test_resumed_folder_batches_match_uninterrupted(image_folder):
  config = folder_config(image_folder['root'], **{'data.image_size': 16})
  straight = pipeline.pretrain_batches(config.data, 4, seed=3)
  reference = [next(straight) for _ in range(7)]    # crosses an epoch boundary
  resumed = pipeline.pretrain_batches(config.data, 4, seed=3, start_step=5)
  for expected in reference[5:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


def test_a_folder_of_unreadable_images_is_a_clear_error(tmp_path):
  for name in ('a', 'b'):
    (tmp_path / name).mkdir()
    for index in range(3):
      (tmp_path / name / f'{index}.jpg').write_bytes(b'not a jpeg')
  config = folder_config(str(tmp_path), **{'data.image_size': 16})
  batches = pipeline.pretrain_batches(config.data, 2, seed=0)
  with pytest.raises(DatasetError, match='no readable image among its 2'):
    next(batches)


@pytest.mark.parametrize('layout, message', [
    ('missing', 'is not a directory'),
    ('empty', 'has no class subfolders'),
    ('flat', 'found 2 images directly in it'),
    ('no_images', 'no images'),
])
def test_unusable_folders_are_clear_errors(tmp_path, layout, message):
  root = tmp_path / 'data'
  if layout != 'missing':
    root.mkdir()
  if layout == 'flat':
    for i in range(2):
      _save(str(root / f'{i}.png'), np.zeros((4, 4, 3), np.uint8), 'PNG')
  if layout == 'no_images':
    (root / 'cat').mkdir()
    (root / 'cat' / 'readme.txt').write_text('x')
  config = folder_config(str(root))
  with pytest.raises(DatasetError, match=message):
    sources.dataset_info(config.data)


def test_eval_split_subfolders(tmp_path):
  root = tmp_path / 'data'
  build_image_folder(root / 'train', per_class=2, corrupt=False)
  build_image_folder(root / 'val', per_class=1, seed=1, corrupt=False)
  config = folder_config(str(root), **{'data.train_split': 'train'})
  assert sources.dataset_info(config.data).num_examples == 6
  assert sources.dataset_info(config.data, 'val').num_examples == 3
  with pytest.raises(DatasetError, match="no folder for split 'validation'"):
    sources.dataset_info(config.data, 'validation')
  (root / 'val' / 'unicorn').mkdir()
  _save(str(root / 'val' / 'unicorn' / 'a.png'), np.zeros((4, 4, 3), np.uint8), 'PNG')
  sources._scan.cache_clear()
  with pytest.raises(DatasetError, match='unicorn'):
    sources.dataset_info(config.data, 'val')


@pytest.mark.parametrize('source', ['folder', 'tfds'])
def test_process_splits_are_disjoint_and_cover(source, image_folder, tiny_data_dir,
                                               monkeypatch):
  config = (folder_config(image_folder['root']) if source == 'folder'
            else smoke_config(tiny_data_dir))
  total = sources.dataset_info(config.data, config.data.train_split).num_examples
  processes = 3
  monkeypatch.setattr(jax, 'process_count', lambda: processes)

  def part(index, drop_remainder):
    monkeypatch.setattr(jax, 'process_index', lambda: index)
    split = sources.process_split(config.data, config.data.train_split, drop_remainder)
    records = [split.load(r) for r in split.records]
    assert len(records) == split.num_examples
    return [r['image'].numpy() for r in records]

  covering = [part(i, drop_remainder=False) for i in range(processes)]
  flat = [image for images in covering for image in images]
  assert len(flat) == total and len(set(flat)) == total   # each image once
  equal = [part(i, drop_remainder=True) for i in range(processes)]
  assert {len(images) for images in equal} == {total // processes}
  for i in range(processes):
    for j in range(i + 1, processes):
      assert not set(equal[i]) & set(equal[j])


# ---- host-side crops ----------------------------------------------------------

def test_fused_jpeg_crops_equal_decode_then_crop():
  rng = np.random.default_rng(0)
  smooth = tf.image.resize(rng.uniform(0, 255, (1, 12, 16, 3)), (150, 200)).numpy()[0]
  encoded = tf.io.encode_jpeg(smooth.astype(np.uint8), quality=90)
  seeds = tf.constant([[i, 7] for i in range(12)], tf.int32)
  fused = pipeline.decode_random_crops(encoded, seeds, 32, (0.2, 1.0), True)
  plain = pipeline.decode_random_crops(encoded, seeds, 32, (0.2, 1.0), False)
  difference = np.abs(fused.numpy().astype(int) - plain.numpy().astype(int))
  # libjpeg's chroma upsampling at the window's edge may differ by a level.
  assert difference.mean() < 0.5 and difference.max() <= 8


# The crop windows' distribution against torchvision's: tests/test_crops.py.


def test_flip_fraction_is_half():
  image = np.zeros((8, 8, 3), np.uint8)
  image[:, :4] = 255                       # left half white
  encoded = tf.io.encode_png(image)
  data = folder_config('/').data
  data.image_size, data.crop_scale = 8, (1.0, 1.0)
  # 600 seeds through a tf.data map (graph mode: eager op-by-op calls took ~35 s).
  views = tf.data.Dataset.range(600).map(
      lambda i: pipeline.random_views(encoded, tf.stack([i, tf.constant(0, tf.int64)]),
                                      data, 2)).batch(600).get_single_element()
  flipped = list(views[:, :, 0, 0, 0].numpy().reshape(-1) < 128)   # left column dark
  fraction, sigma = np.mean(flipped), np.sqrt(0.25 / len(flipped))
  assert abs(fraction - 0.5) < 4 * sigma


def test_cli_pretrains_on_a_folder_with_knn(tmp_path):
  from test_train import run_cli
  root = tmp_path / 'images'
  build_image_folder(root / 'train', per_class=6)
  build_image_folder(root / 'val', per_class=2, seed=1, corrupt=False)
  workdir = tmp_path / 'run'
  result = run_cli(workdir, '', f'--config.data.dataset=folder:{root}',
                   '--config.data.eval_split=val', '--config.eval.knn_every=1',
                   '--config.eval.knn_k=5', '--config.eval.batch_size=8')
  assert result.returncode == 0, result.stderr[-3000:]
  events = read_metrics(str(workdir))
  training = [e for e in events if 'loss' in e]
  assert [e['step'] for e in training] == [2, 4]
  assert np.isfinite(training[-1]['loss'])
  assert 0 <= training[-1]['skipped_images'] <= 1    # the truncated JPEG, once
  assert [e['step'] for e in events if 'knn_top1' in e] == [1, 2, 3, 4]


# ---- split-leak guard -----------------------------------------------------------

def test_a_missing_training_folder_is_an_error_not_the_parent(tmp_path):
  """Splits named otherwise (training/, val/): the parent would be trained on
  with 'training' and 'val' as its two classes, validation images included."""
  root = tmp_path / 'data'
  build_image_folder(root / 'training', per_class=2, corrupt=False)
  build_image_folder(root / 'val', per_class=1, seed=1, corrupt=False)
  config = folder_config(str(root), **{'data.train_split': 'train',
                                       'data.eval_split': 'val'})
  with pytest.raises(DatasetError) as error:
    sources.dataset_info(config.data)
  message = str(error.value)
  assert f"no folder for the training split 'train' ({root}/train does not exist; " \
         f"its subfolders: training, val)" in message
  assert '--config.data.train_split=NAME' in message and '\n' not in message
  config.data.train_split = 'training'                      # the fix it names
  assert sources.dataset_info(config.data).num_examples == 6


@pytest.mark.parametrize('eval_split', ['val', 'validation'])
def test_the_training_split_never_contains_the_evaluation_split(tmp_path, eval_split):
  root = tmp_path / 'data'
  build_image_folder(root / 'cats_and_dogs', per_class=2, corrupt=False)
  build_image_folder(root / eval_split, per_class=1, seed=1, corrupt=False)
  config = folder_config(str(root), **{'data.eval_split': eval_split})  # train_split '.'
  for split in ('.', eval_split):                            # whichever is read first
    sources._scan.cache_clear()
    with pytest.raises(DatasetError,
                       match=f"contains the evaluation split data.eval_split='{eval_split}'"):
      sources.dataset_info(config.data, split)
  # Deliberately the same split for both (kNN on the training images): allowed.
  config.data.eval_split = '.'
  assert sources.dataset_info(config.data).num_examples == 9
  # The CLI: one line, no workdir.
  from test_train import run_cli
  workdir = tmp_path / 'run'
  result = run_cli(workdir, '', f'--config.data.dataset=folder:{root}',
                   '--config.data.train_split=.', f'--config.data.eval_split={eval_split}')
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
  assert 'contains the evaluation split' in lines[0] and not workdir.exists()
