"""torchvision's RandomResizedCrop window, sampled with stateless TensorFlow ops.

The sampler of `torchvision.transforms.RandomResizedCrop.get_params`:
up to `num_attempts` draws of area ~ U(scale) · H · W and log aspect ratio
~ U(log ratio); w = round(sqrt(area · ratio)), h = round(sqrt(area / ratio));
the first draw with 0 < w <= W and 0 < h <= H is kept, its offsets uniform
over every valid position (edges included). When none fits: a centre crop
of the whole image with its aspect ratio clamped to `ratio`. The on-device
twin is moco_jax.augment.crop_window.crop_windows (same distribution).
"""
import math

import tensorflow as tf

from moco_jax.augment.crop_window import NUM_ATTEMPTS, RATIO


def crop_window(image_shape, seed, scale, ratio=RATIO, num_attempts: int = NUM_ATTEMPTS):
  """One RandomResizedCrop window, a pure function of (image_shape, seed).

  Args:
    image_shape: (3,) int32 tensor (H, W, C), e.g. tf.shape(image) or
      tf.image.extract_jpeg_shape(encoded).
    seed: (2,) int32/int64 stateless seed.
    scale: (low, high) area fraction, 0 < low <= high <= 1 (floats or a
      (2,) tensor).
    ratio: (low, high) aspect ratio w / h, drawn log-uniformly.
    num_attempts: draws before the centre-crop fallback.

  Returns:
    (begin, size), (3,) int32 each: [top, left, 0] and [h, w, -1], as
    tf.slice takes them (and tf.image.decode_and_crop_jpeg after picking
    [top, left, h, w]).
  """
  shape = tf.cast(image_shape, tf.int32)
  height, width = shape[0], shape[1]
  height_f, width_f = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
  # Rows: area fraction, log ratio, top and left offsets (all per attempt).
  u = tf.cast(tf.random.stateless_uniform([4, num_attempts], seed, dtype=tf.float32),
              tf.float64)
  low, high = tf.unstack(tf.cast(scale, tf.float64))
  area = height_f * width_f * (low + (high - low) * u[0])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_low + (log_high - log_low) * u[1])
  # tf.round rounds half to even, as Python's round in torchvision.
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = _uniform_below(u[2], height - h + 1)
  left = _uniform_below(u[3], width - w + 1)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  # Fallback: the image's own ratio clamped to the range, centred.
  in_ratio = width_f / height_f
  fallback_w = tf.where(in_ratio > ratio[1],
                        tf.cast(tf.round(height_f * ratio[1]), tf.int32), width)
  fallback_h = tf.where(in_ratio < ratio[0],
                        tf.cast(tf.round(width_f / ratio[0]), tf.int32), height)
  found = tf.reduce_any(fits)
  crop_h = tf.where(found, h[first], fallback_h)
  crop_w = tf.where(found, w[first], fallback_w)
  crop_top = tf.where(found, top[first], (height - fallback_h) // 2)
  crop_left = tf.where(found, left[first], (width - fallback_w) // 2)
  return (tf.stack([crop_top, crop_left, 0]), tf.stack([crop_h, crop_w, -1]))


def _uniform_below(u, count):
  """floor(u · count) in {0, ..., count - 1} for u in [0, 1); 0 if count <= 0."""
  count = tf.maximum(count, 1)
  index = tf.cast(tf.floor(u * tf.cast(count, tf.float64)), tf.int32)
  return tf.minimum(index, count - 1)
