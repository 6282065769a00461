"""Random-resized crop + horizontal flip on the device, per example.

torchvision's RandomResizedCrop: a window from `crop_window.crop_windows`,
cut out and resized to S×S with antialiased bilinear interpolation (PIL's
and torchvision's `antialias=True`: a triangle filter whose support widens
by the downscaling factor, weights renormalised inside the window), then
RandomHorizontalFlip(0.5). Window sizes vary per example, which jit cannot
slice, so each axis is resampled by an (S, H) weight matrix that is zero
outside the window: out = Wy · image · Wxᵀ, the crop and the resize in two
small matmuls, a flip being Wx with its rows reversed. Pixels outside the
window never contribute (as cropping first, unlike jax.image.scale_and_translate
on the whole image, whose kernel reaches across the window's border).
Pure JAX, no TensorFlow: this runs inside the jitted step.
"""
import jax
import jax.numpy as jnp

from moco_jax.augment import crop_window


def axis_weights(start, size, in_len: int, out_len: int):
  """(out_len, in_len) float32: antialiased bilinear resampling of the input
  pixels [start, start + size) to out_len pixels (rows sum to 1).

  start, size: int32 scalars (may be traced), 0 <= start, start + size <= in_len.
  Output pixel i is centred at start + (i + 0.5)·size/out_len in input
  coordinates (pixel j spans [j, j + 1)), align_corners=False as torchvision.
  """
  scale = jnp.asarray(size, jnp.float32) / out_len
  support = jnp.maximum(scale, 1.0)   # the triangle widens when downscaling
  centres = jnp.asarray(start, jnp.float32) + (jnp.arange(out_len, dtype=jnp.float32) + 0.5) * scale
  pixels = jnp.arange(in_len)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels + 0.5 - centres[:, None]) / support)
  inside = (pixels >= start) & (pixels < start + size)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crop(image, window, size: int, flip=False):
  """One image's window resized to (size, size), optionally flipped.

  Args:
    image: (H, W, 3) uint8 (or float in [0, 255]).
    window: (top, left, h, w) int32 scalars.
    size: output side S.
    flip: bool scalar: mirror left-right.

  Returns:
    (S, S, 3) uint8, rounded half to even (as the host path's tf.round).
  """
  top, left, h, w = (jnp.asarray(v, jnp.int32) for v in window)
  rows = axis_weights(top, h, image.shape[0], size)
  cols = axis_weights(left, w, image.shape[1], size)
  cols = jnp.where(flip, cols[::-1], cols)
  highest = jax.lax.Precision.HIGHEST   # no bf16/TF32 passes: exact uint8 results
  x = image.astype(jnp.float32)
  x = jnp.einsum('hwc,tw->htc', x, cols, precision=highest)
  x = jnp.einsum('sh,htc->stc', rows, x, precision=highest)
  return jnp.round(jnp.clip(x, 0, 255)).astype(jnp.uint8)


def sample_views(example_rngs, image_hw, scale):
  """Each example's crop window and flip: (top, left, h, w) (N,) int32 each
  and flip (N,) bool; window from crop_window.crop_windows, flip ~ B(0.5).

  example_rngs: (N,) keys; image_hw: (H, W); scale: (low, high) floats.
  """
  def one(rng):
    crop_rng, flip_rng = jax.random.split(rng)
    return (crop_window.crop_windows(crop_rng, image_hw, scale),
            jax.random.bernoulli(flip_rng))
  return jax.vmap(one)(example_rngs)


def random_resized_crop_flip(images, example_rngs, size: int, scale):
  """RandomResizedCrop(size, scale) + RandomHorizontalFlip per example.

  Args:
    images: (N, H, W, 3) uint8, all of one size.
    example_rngs: (N,) keys, one per example.
    size: output side S.
    scale: (low, high) area fraction (Python floats).

  Returns:
    (N, S, S, 3) uint8.
  """
  windows, flips = sample_views(example_rngs, images.shape[1:3], scale)
  return jax.vmap(lambda image, window, flip: resized_crop(image, window, size, flip))(
      images, windows, flips)


def resize_whole(images, size: int):
  """(N, H, W, 3) uint8 -> (N, S, S, 3) uint8: every image resized whole
  (the evaluation transform of small images); a copy when H = W = S."""
  height, width = images.shape[1], images.shape[2]
  if (height, width) == (size, size):
    return images
  window = (jnp.int32(0), jnp.int32(0), jnp.int32(height), jnp.int32(width))
  return jax.vmap(lambda image: resized_crop(image, window, size))(images)
