"""RandomResizedCrop windows (host: data/crops.py, device: augment/crop_window.py)
against torchvision's `RandomResizedCrop.get_params`, re-derived in NumPy
(and torchvision itself where installed)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import moco_jax
from moco_jax.augment import crop_window as augment_crop
from moco_jax.data import crops, pipeline

COUNT = 20_000
# (height, width, scale): CIFAR at RandomResizedCrop's default scale, and an
# ImageNet-like landscape image at MoCo's.
CASES = [(32, 32, (0.08, 1.0)), (375, 500, (0.2, 1.0))]
CASE_IDS = ['32x32', '375x500']


def torchvision_reference(height, width, scale, count, seed=0):
  """(count, 4) [top, left, h, w]: get_params transcribed to NumPy, one
  window at a time: 10 tries of area ~ U(scale)·H·W and
  log-ratio ~ U(log 3/4, log 4/3), keep the first that fits with offsets
  uniform on {0..H-h} × {0..W-w}; else the centre crop, ratio clamped."""
  rng = np.random.default_rng(seed)
  low, high = np.log(3 / 4), np.log(4 / 3)
  windows = np.empty((count, 4), np.int64)
  for i in range(count):
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(low, high))
      w = int(round(np.sqrt(area * aspect)))
      h = int(round(np.sqrt(area / aspect)))
      if 0 < w <= width and 0 < h <= height:
        windows[i] = (rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w)
        break
    else:
      in_ratio = width / height
      if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
      elif in_ratio > 4 / 3:
        h, w = height, int(round(height * 4 / 3))
      else:
        h, w = height, width
      windows[i] = ((height - h) // 2, (width - w) // 2, h, w)
  return windows


@functools.lru_cache(maxsize=None)
def reference_windows(height, width, scale):
  return torchvision_reference(height, width, scale, COUNT)


@tf.function(reduce_retracing=True)
def _tf_sample(shape, seeds, scale):
  return tf.map_fn(lambda seed: pipeline.crop_window(shape, seed, scale), seeds,
                   fn_output_signature=(tf.int32, tf.int32))


def tf_windows(height, width, scale, count=COUNT):
  """(count, 4) [top, left, h, w] from crop_window with seeds (i, 1)."""
  seeds = tf.stack([tf.range(count, dtype=tf.int64), tf.ones(count, tf.int64)], 1)
  begin, size = _tf_sample(tf.constant([height, width, 3]), seeds,
                           tf.constant(scale, tf.float64))
  return np.concatenate([begin.numpy()[:, :2], size.numpy()[:, :2]], 1)


# The image size is traced: one compile per (count, scale).
_jax_sample = jax.jit(jax.vmap(augment_crop.crop_windows, in_axes=(0, None, None)),
                      static_argnums=2)


def jax_windows(height, width, scale, count=COUNT, seed=1):
  keys = jax.random.split(jax.random.key(seed), count)
  windows = _jax_sample(keys, (jnp.int32(height), jnp.int32(width)), scale)
  return np.stack([np.asarray(x) for x in windows], 1)


def statistics(windows, height, width):
  top, left, h, w = windows.T
  area = h * w / (height * width)
  log_ratio = np.log(w / h)
  return {'mean area': area.mean(),
          'area q10/50/90': np.quantile(area, [0.1, 0.5, 0.9]),
          'mean log(w/h)': log_ratio.mean(), 'std log(w/h)': log_ratio.std(),
          'edge share': np.mean((top + h == height) | (left + w == width))}


TOLERANCES = {'mean area': 0.01, 'area q10/50/90': 0.02, 'mean log(w/h)': 0.02,
              'std log(w/h)': 0.02, 'edge share': 0.02}


def assert_same_distribution(windows, reference, height, width):
  top, left, h, w = windows.T
  assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  got, expected = statistics(windows, height, width), statistics(reference, height, width)
  print({key: (np.round(got[key], 4), np.round(expected[key], 4)) for key in got})
  for key, tolerance in TOLERANCES.items():
    np.testing.assert_allclose(got[key], expected[key], atol=tolerance, err_msg=key)


@pytest.mark.parametrize('height, width, scale', CASES, ids=CASE_IDS)
@pytest.mark.parametrize('sampler', [tf_windows, jax_windows], ids=['tf', 'jax'])
def test_windows_follow_torchvision(sampler, height, width, scale):
  assert_same_distribution(sampler(height, width, scale),
                           reference_windows(height, width, scale), height, width)


@pytest.mark.parametrize('height, width, scale', CASES, ids=CASE_IDS)
def test_against_torchvision_itself(height, width, scale):
  transforms = pytest.importorskip('torchvision.transforms')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  image = torch.zeros(3, height, width)
  get_params = transforms.RandomResizedCrop.get_params
  torchvision = np.array([get_params(image, list(scale), [3 / 4, 4 / 3])
                          for _ in range(COUNT)])
  for windows in (reference_windows(height, width, scale),
                  tf_windows(height, width, scale), jax_windows(height, width, scale)):
    assert_same_distribution(windows, torchvision, height, width)


def test_fallback_is_the_ratio_clamped_centre_crop():
  """A crop of the whole area never fits a non-square image: every window is
  the fallback; a 7×7 image fits only when the ratio rounds to 1 (7×7 too)."""
  fallbacks = {(1, 100): (0, 49, 1, 1), (100, 1): (49, 0, 1, 1), (40, 20): (6, 0, 27, 20),
               (20, 40): (0, 6, 20, 27), (7, 7): (0, 0, 7, 7)}
  for (height, width), fallback in fallbacks.items():
    expected = np.tile(fallback, (50, 1))
    np.testing.assert_array_equal(torchvision_reference(height, width, (1.0, 1.0), 50),
                                  expected)   # the reference itself
    np.testing.assert_array_equal(tf_windows(height, width, (1.0, 1.0), count=50), expected)
    np.testing.assert_array_equal(jax_windows(height, width, (1.0, 1.0), count=50), expected)


def test_tf_windows_are_stateless():
  shape, scale = tf.constant([375, 500, 3]), (0.2, 1.0)
  windows = [[w.numpy() for w in pipeline.crop_window(shape, tf.constant([s, 9]), scale)]
             for s in (4, 4, 5)]
  np.testing.assert_array_equal(windows[0], windows[1])
  assert not np.array_equal(windows[0], windows[2])
  # The public names resolve to the same sampler.
  assert moco_jax.crop_window is pipeline.crop_window is crops.crop_window
  # Graph mode (as inside tf.data) gives the eager window.
  graph = tf.function(lambda seed: crops.crop_window(shape, seed, scale))(
      tf.constant([4, 9]))
  np.testing.assert_array_equal([w.numpy() for w in graph], windows[0])


def test_jax_windows_are_stateless_and_jit_safe():
  keys = jax.random.split(jax.random.key(7), 3)
  static = jax.jit(augment_crop.crop_windows, static_argnums=(1, 2))
  windows = [np.array(static(key, (375, 500), (0.2, 1.0))) for key in keys]
  assert all(x.dtype == jnp.int32 and x.shape == ()
             for x in static(keys[0], (375, 500), (0.2, 1.0)))
  # A traced image size (vmapped, one compile for every size) gives the same windows.
  np.testing.assert_array_equal(
      np.stack(_jax_sample(keys, (jnp.int32(375), jnp.int32(500)), (0.2, 1.0)), 1), windows)
  np.testing.assert_array_equal(np.array(static(keys[0], (375, 500), (0.2, 1.0))), windows[0])
  assert not np.array_equal(windows[0], windows[1])
