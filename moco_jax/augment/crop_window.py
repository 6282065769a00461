"""torchvision's RandomResizedCrop window, sampled on the device with jax.random.

The same distribution as the host-side sampler (moco_jax.data.crops) and
torchvision's `RandomResizedCrop.get_params`: up to `num_attempts` draws of
area ~ U(scale) · H · W and log aspect ratio ~ U(log ratio);
w = round(sqrt(area · ratio)), h = round(sqrt(area / ratio)); the first draw
with 0 < w <= W and 0 < h <= H is kept, its offsets uniform over every valid
position (edges included); when none fits, a centre crop with the image's
aspect ratio clamped to `ratio`. All attempts are drawn at once (no loop), so
it traces once inside jit; vmap it over a batch of keys.
"""
import math

import jax
import jax.numpy as jnp

RATIO = (3 / 4, 4 / 3)
NUM_ATTEMPTS = 10


def crop_windows(rng, image_hw, scale, ratio=RATIO, num_attempts: int = NUM_ATTEMPTS):
  """One RandomResizedCrop window of an image of size `image_hw`.

  Args:
    rng: a jax.random key (vmap over keys for a batch of windows).
    image_hw: (H, W) ints or int32 scalars (may be traced).
    scale: (low, high) area fraction, 0 < low <= high <= 1 (Python floats).
    ratio: (low, high) aspect ratio w / h, drawn log-uniformly.
    num_attempts: draws before the centre-crop fallback.

  Returns:
    (top, left, h, w): int32 scalars; the window is
    image[top:top + h, left:left + w].
  """
  height, width = (jnp.asarray(v, jnp.int32) for v in image_hw)
  height_f, width_f = height.astype(jnp.float32), width.astype(jnp.float32)
  # Rows: area fraction, log ratio, top and left offsets (all per attempt).
  u = jax.random.uniform(rng, (4, num_attempts), jnp.float32)
  area = height_f * width_f * (scale[0] + (scale[1] - scale[0]) * u[0])
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * u[1])
  # jnp.round rounds half to even, as Python's round in torchvision.
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  top = _uniform_below(u[2], height - h + 1)
  left = _uniform_below(u[3], width - w + 1)
  first = jnp.argmax(fits)

  in_ratio = width_f / height_f
  fallback_w = jnp.where(in_ratio > ratio[1],
                         jnp.round(height_f * ratio[1]).astype(jnp.int32), width)
  fallback_h = jnp.where(in_ratio < ratio[0],
                         jnp.round(width_f / ratio[0]).astype(jnp.int32), height)
  found = fits.any()
  return (jnp.where(found, top[first], (height - fallback_h) // 2),
          jnp.where(found, left[first], (width - fallback_w) // 2),
          jnp.where(found, h[first], fallback_h),
          jnp.where(found, w[first], fallback_w))


def _uniform_below(u, count):
  """floor(u · count) in {0, ..., count - 1} for u in [0, 1); 0 if count <= 0."""
  count = jnp.maximum(count, 1)
  index = jnp.floor(u * count.astype(jnp.float32)).astype(jnp.int32)
  return jnp.minimum(index, count - 1)
