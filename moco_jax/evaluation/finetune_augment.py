"""The fine-tuning recipe's batch-level regularisers, pure JAX on normalised images:
label smoothing, mixup, CutMix (timm's `Mixup`, mode 'batch', as DeiT uses it)
and random erasing (timm's `RandomErasing`, mode 'pixel', one box).

Each takes an explicit rng and acts on one device's batch, as timm's act on
one process's batch under DistributedDataParallel: mixing pairs image i with
image N - 1 - i of the same batch.
"""
import math

import jax
import jax.numpy as jnp

ERASE_AREA = (0.02, 1 / 3)       # timm RandomErasing's min_area, max_area
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_TRIES = 10


def smooth_one_hot(labels, num_classes: int, smoothing: float):
  """(N,) int -> (N, classes) float32: 1 - smoothing + smoothing/classes on
  the label, smoothing/classes elsewhere (timm's mixup_target)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _cutmix_box(rng, lam, height: int, width: int):
  """timm's rand_bbox: a box of about (1 - lam) of the image, centred
  uniformly, clipped to the image. Returns (top, bottom, left, right)."""
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * cut).astype(jnp.int32)
  cut_w = jnp.floor(width * cut).astype(jnp.int32)
  rng_y, rng_x = jax.random.split(rng)
  cy = jax.random.randint(rng_y, (), 0, height)
  cx = jax.random.randint(rng_x, (), 0, width)
  top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
  left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
  return top, bottom, left, right


def mix_batch(rng, images, labels, num_classes: int, mixup_alpha: float,
              cutmix_alpha: float, switch_prob: float, smoothing: float):
  """Mixup or CutMix of a batch with its reverse, and the soft targets.

  Args:
    rng: PRNG key.
    images: (N, H, W, C) float.
    labels: (N,) int.
    mixup_alpha, cutmix_alpha: Beta parameters; 0 turns that mix off. With
      both on, CutMix is chosen for a batch with probability switch_prob.
    smoothing: label smoothing of both targets.

  Returns:
    (images, targets (N, classes) float32); unchanged images and smoothed
    one-hot targets when both alphas are 0.
  """
  targets = smooth_one_hot(labels, num_classes, smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  rng_switch, rng_mixup, rng_cutmix, rng_box = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(rng_switch) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  lam_mixup = jax.random.beta(rng_mixup, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
  lam_cutmix = jax.random.beta(rng_cutmix, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
  flipped = images[::-1]
  _, height, width, _ = images.shape
  top, bottom, left, right = _cutmix_box(rng_box, lam_cutmix, height, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  # timm's correct_lam: the pasted box's true area after clipping.
  lam_box = 1.0 - (bottom - top) * (right - left) / (height * width)
  mixed = images * lam_mixup + flipped * (1.0 - lam_mixup)
  lam = jnp.where(use_cutmix, lam_box, lam_mixup).astype(jnp.float32)
  images = jnp.where(use_cutmix, cutmixed, mixed.astype(images.dtype))
  return images, targets * lam + targets[::-1] * (1.0 - lam)


def random_erasing(rng, images, probability: float):
  """timm's RandomErasing(probability, mode='pixel', max_count=1) per image:
  with `probability`, one box of area U(0.02, 1/3) of the image and log-uniform
  aspect in (0.3, 1/0.3) (first of 10 tries that fits) is filled with N(0, 1)
  noise per pixel and channel. images: (N, H, W, C) normalised float."""
  if probability <= 0:
    return images
  n, height, width, channels = images.shape
  rng_apply, rng_area, rng_aspect, rng_top, rng_left, rng_noise = jax.random.split(rng, 6)
  area = jax.random.uniform(rng_area, (n, ERASE_TRIES), minval=ERASE_AREA[0],
                            maxval=ERASE_AREA[1]) * height * width
  aspect = jnp.exp(jax.random.uniform(rng_aspect, (n, ERASE_TRIES),
                                      minval=ERASE_LOG_ASPECT[0],
                                      maxval=ERASE_LOG_ASPECT[1]))
  h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h < height) & (w < width)
  first = jnp.argmax(fits, axis=1)
  found = jnp.any(fits, axis=1) & (jax.random.uniform(rng_apply, (n,)) < probability)
  h = jnp.take_along_axis(h, first[:, None], 1)[:, 0]
  w = jnp.take_along_axis(w, first[:, None], 1)[:, 0]
  top = jnp.floor(jax.random.uniform(rng_top, (n,)) * (height - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(rng_left, (n,)) * (width - w + 1)).astype(jnp.int32)
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  box = ((rows >= top[:, None, None]) & (rows < (top + h)[:, None, None]) &
         (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None]) &
         found[:, None, None])
  noise = jax.random.normal(rng_noise, images.shape, jnp.float32).astype(images.dtype)
  return jnp.where(box[..., None], noise, images)
