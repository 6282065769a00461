"""Evaluation input: the deterministic transform and padded, masked batches."""
import numpy as np
import tensorflow as tf

from conftest import smoke_config
from moco_jax.data import pipeline


def test_large_images_are_resized_then_center_cropped():
  image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
  got = pipeline.eval_transform(tf.constant(image), 224).numpy()
  # torchvision: Resize(256) -> 256 x int(400 * 256 / 300) = 256 x 341, crop 224.
  resized = tf.image.resize(image, (256, 341), antialias=True)
  want = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()
  np.testing.assert_array_equal(got, want[16:240, 58:282])


def test_small_images_are_used_whole():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(
      pipeline.eval_transform(tf.constant(image), 32).numpy(), image)


def test_every_example_once_in_padded_batches(tiny_data_dir):
  config = smoke_config(tiny_data_dir)
  batches = pipeline.eval_batches(config.data, 'test', 24)   # 32 examples
  assert len(batches) == 2
  for _ in range(2):  # iterable again, same content
    listed = list(batches)
    assert [b['mask'].sum() for b in listed] == [24, 8]
    assert all(b['image'].shape == (24, 16, 16, 3) for b in listed)
    assert not listed[1]['image'][8:].any()
  labels = np.concatenate([b['label'][b['mask']] for b in listed])
  assert labels.shape == (32,)
