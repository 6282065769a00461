"""On-device colour augmentation for MoCo's two views, plus normalisation.

The host (tf.data) does the random-resized crop and horizontal flip and ships
uint8 crops of shape (N, H, W, 3). Here each example gets its own PRNG key and
goes through the colour part of a recipe, then mean/std normalisation:

  'v1'    RandomGrayscale(0.2) -> ColorJitter(0.4, 0.4, 0.4, 0.4)
  'v2'    ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8 -> RandomGrayscale(0.2)
      -> GaussianBlur(sigma ~ U[0.1, 2.0]) p 0.5
  'cifar' as 'v2' without the blur
  'v3'    ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8 -> RandomGrayscale(0.2)
      -> GaussianBlur p 1.0 (view 0) / 0.1 (view 1) -> Solarize p 0.2 (view 1)
  'none'  normalisation only

Ops follow torchvision's tensor semantics on float32 images in [0, 1]. The
single-image ops take (..., H, W, 3) arrays; sampling and application are split
(`sample_params` / `apply_params`) so tests can see every random decision.
No TensorFlow here: this runs on accelerator hosts.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.augment.normalization import MEAN_STD

RECIPES = ('v1', 'v2', 'v3', 'cifar', 'none')
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL and torchvision
_IMAGENET_MEAN, _IMAGENET_STD = MEAN_STD['imagenet']


# ----------------------------------------------------------------------------
# Single-image ops. `img` is float32 (..., H, W, 3) in [0, 1].


def grayscale(img):
  """Luma replicated to 3 channels: (..., H, W, 3) -> (..., H, W, 3)."""
  y = img @ jnp.asarray(LUMA, img.dtype)
  return jnp.repeat(y[..., None], 3, axis=-1)


def _blend(img1, img2, factor):
  return jnp.clip(factor * img1 + (1.0 - factor) * img2, 0.0, 1.0)


def adjust_brightness(img, factor):
  """Scale by `factor` (1 = identity), clipped to [0, 1]."""
  return _blend(img, jnp.zeros_like(img), factor)


def adjust_contrast(img, factor):
  """Blend with the mean of the grayscale image (one scalar per image)."""
  mean = jnp.mean(img @ jnp.asarray(LUMA, img.dtype), axis=(-2, -1), keepdims=True)
  return _blend(img, mean[..., None], factor)


def adjust_saturation(img, factor):
  """Blend with the grayscale image (0 = gray, 1 = identity)."""
  return _blend(img, grayscale(img), factor)


def rgb_to_hsv(rgb):
  """(..., 3) RGB in [0, 1] -> (..., 3) HSV, each in [0, 1] (torchvision's _rgb2hsv)."""
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc = jnp.max(rgb, axis=-1)
  minc = jnp.min(rgb, axis=-1)
  eqc = maxc == minc
  cr = maxc - minc
  s = cr / jnp.where(eqc, 1.0, maxc)
  cr_div = jnp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
  hr = jnp.where(maxc == r, bc - gc, 0.0)
  hg = jnp.where((maxc == g) & (maxc != r), 2.0 + rc - bc, 0.0)
  hb = jnp.where((maxc != g) & (maxc != r), 4.0 + gc - rc, 0.0)
  h = jnp.mod((hr + hg + hb) / 6.0 + 1.0, 1.0)
  return jnp.stack([h, s, maxc], axis=-1)


def hsv_to_rgb(hsv):
  """(..., 3) HSV in [0, 1] -> (..., 3) RGB (torchvision's _hsv2rgb)."""
  h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  i = jnp.mod(i.astype(jnp.int32), 6)
  p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
  q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
  t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
  # Sextant i picks (r, g, b) from these rows.
  table = jnp.stack([
    jnp.stack([v, q, p, p, t, v], axis=-1),
    jnp.stack([t, v, v, q, p, p], axis=-1),
    jnp.stack([p, p, t, v, v, q], axis=-1),
  ], axis=-2)  # (..., 3, 6)
  onehot = jax.nn.one_hot(i, 6, dtype=hsv.dtype)[..., None, :]
  return jnp.sum(table * onehot, axis=-1)


def adjust_hue(img, shift):
  """Rotate hue by `shift` turns (in [-0.5, 0.5]; 0 = identity)."""
  hsv = rgb_to_hsv(img)
  h = jnp.mod(hsv[..., 0] + shift, 1.0)
  return hsv_to_rgb(jnp.stack([h, hsv[..., 1], hsv[..., 2]], axis=-1))


def blur_kernel_size(side):
  """Odd kernel size ~10% of the image side (23 at 224), at least 3."""
  k = int(0.1 * side)
  return max(3, k + 1 - k % 2)


def gaussian_blur(img, sigma, ksize):
  """Separable Gaussian blur of one (H, W, 3) image with reflect padding.

  `sigma` may be traced (per example under vmap); `ksize` must be a static
  odd int with ksize // 2 < min(H, W) (reflect padding needs pad < side).
  """
  r = ksize // 2
  x = jnp.arange(-r, r + 1, dtype=img.dtype)
  w = jnp.exp(-0.5 * (x / sigma) ** 2)
  w = w / jnp.sum(w)
  h, wd = img.shape[0], img.shape[1]
  p = jnp.pad(img, ((r, r), (0, 0), (0, 0)), mode='reflect')
  img = sum(w[j] * p[j:j + h] for j in range(ksize))
  p = jnp.pad(img, ((0, 0), (r, r), (0, 0)), mode='reflect')
  return sum(w[j] * p[:, j:j + wd] for j in range(ksize))


def solarize(img, threshold=0.5):
  """Invert pixels >= threshold (PIL ImageOps.solarize at 128 on uint8)."""
  return jnp.where(img >= threshold, 1.0 - img, img)


# ----------------------------------------------------------------------------
# Recipes.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Static description of one view's colour pipeline."""
  jitter: tuple[float, float, float, float] | None  # (brightness, contrast, saturation, hue)
  p_jitter: float = 0.0
  p_gray: float = 0.0
  gray_first: bool = False  # v1 applies grayscale before jitter
  p_blur: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, 2.0)
  p_solarize: float = 0.0


def get_recipe(recipe: str, view: int = 0) -> Recipe:
  """The `Recipe` for a name in RECIPES and view 0 or 1."""
  if recipe not in RECIPES:
    raise ValueError(f'Unknown augmentation recipe {recipe!r}; expected one of {RECIPES}.')
  if view not in (0, 1):
    raise ValueError(f'view must be 0 or 1, got {view!r}.')
  if recipe == 'v1':
    return Recipe(jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, p_gray=0.2, gray_first=True)
  if recipe == 'v2':
    return Recipe(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2, p_blur=0.5)
  if recipe == 'cifar':
    return Recipe(jitter=(0.4, 0.4, 0.4, 0.1), p_jitter=0.8, p_gray=0.2)
  if recipe == 'v3':
    return Recipe(jitter=(0.4, 0.4, 0.2, 0.1), p_jitter=0.8, p_gray=0.2,
            p_blur=(1.0, 0.1)[view], p_solarize=(0.0, 0.2)[view])
  return Recipe(jitter=None)


def _sample_one(key, rc: Recipe):
  """Per-example random decisions and parameters (scalars; identity values when an op is off)."""
  ks = jax.random.split(key, 10)
  b, c, s, h = rc.jitter or (0.0, 0.0, 0.0, 0.0)

  def u(k, lo, hi):
    return jax.random.uniform(k, (), jnp.float32, lo, hi)

  return {
    'jitter': jax.random.bernoulli(ks[0], rc.p_jitter),
    'brightness': u(ks[1], max(0.0, 1.0 - b), 1.0 + b),
    'contrast': u(ks[2], max(0.0, 1.0 - c), 1.0 + c),
    'saturation': u(ks[3], max(0.0, 1.0 - s), 1.0 + s),
    'hue': u(ks[4], -h, h),
    'order': jax.random.permutation(ks[5], 4).astype(jnp.int32),  # torchvision: randperm(4)
    'gray': jax.random.bernoulli(ks[6], rc.p_gray),
    'blur': jax.random.bernoulli(ks[7], rc.p_blur),
    'sigma': u(ks[8], *rc.blur_sigma),
    'solarize': jax.random.bernoulli(ks[9], rc.p_solarize),
  }


def _color_jitter(img, prm):
  """Brightness/contrast/saturation/hue in the per-example order `prm['order']`."""
  ops = (
    lambda x: adjust_brightness(x, prm['brightness']),
    lambda x: adjust_contrast(x, prm['contrast']),
    lambda x: adjust_saturation(x, prm['saturation']),
    lambda x: adjust_hue(x, prm['hue']),
  )
  # A loop rather than 4 unrolled switches: under vmap each switch computes all
  # 4 branches, so unrolling would compile 16 ops (4 hue conversions).
  return jax.lax.fori_loop(0, 4, lambda i, x: jax.lax.switch(prm['order'][i], ops, x), img)


def _apply_one(img, prm, rc: Recipe):
  """Colour pipeline on one float (H, W, 3) image in [0, 1]."""
  def gray(x):
    return jnp.where(prm['gray'], grayscale(x), x) if rc.p_gray > 0 else x

  if rc.gray_first:
    img = gray(img)
  if rc.jitter is not None and rc.p_jitter > 0:
    img = jnp.where(prm['jitter'], _color_jitter(img, prm), img)
  if not rc.gray_first:
    img = gray(img)
  if rc.p_blur > 0:
    k = blur_kernel_size(min(img.shape[0], img.shape[1]))
    img = jnp.where(prm['blur'], gaussian_blur(img, prm['sigma'], k), img)
  if rc.p_solarize > 0:
    img = jnp.where(prm['solarize'], solarize(img), img)
  return img


def sample_params(example_rngs, recipe, view=0):
  """Per-example decisions for `recipe`/`view`: dict of (N,) arrays ('order' is (N, 4)).

  Keys: jitter, gray, blur, solarize (bool: op applied); brightness, contrast,
  saturation, hue, sigma (float32); order (int32 permutation of
  0=brightness, 1=contrast, 2=saturation, 3=hue). Disabled ops have p = 0.
  """
  rc = get_recipe(recipe, view)
  return jax.vmap(lambda k: _sample_one(k, rc))(example_rngs)


def apply_params(images, params, recipe, view=0):
  """Colour ops of `recipe` with explicit `params` (from `sample_params`).

  images: float32 (N, H, W, 3) in [0, 1] -> float32 (N, H, W, 3) in [0, 1].
  """
  rc = get_recipe(recipe, view)
  return jax.vmap(lambda x, p: _apply_one(x, p, rc))(images, params)


def normalize(images, mean=_IMAGENET_MEAN, std=_IMAGENET_STD):
  """uint8 or float images in [0, 255], (..., 3) -> float32 (x / 255 - mean) / std."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


@functools.partial(jax.jit, static_argnames=('recipe', 'view', 'mean', 'std'))
def _augment_batch(images, example_rngs, recipe, view, mean, std):
  x = images.astype(jnp.float32) / 255.0
  if recipe != 'none':
    x = apply_params(x, sample_params(example_rngs, recipe, view), recipe, view)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment_batch(images, example_rngs, recipe, view=0, mean=_IMAGENET_MEAN, std=_IMAGENET_STD):
  """Colour-augment and normalise one view of a batch.

  images: uint8 (N, H, W, 3). example_rngs: N PRNG keys (raw uint32 (N, 2) or
  typed (N,)), one per example. recipe: one of RECIPES. view: 0 or 1 (only
  'v3' differs by view). Returns float32 (N, H, W, 3), ((x/255 - mean)/std).
  """
  get_recipe(recipe, view)  # validate eagerly, outside jit
  mean = tuple(float(m) for m in np.asarray(mean).reshape(-1))
  std = tuple(float(s) for s in np.asarray(std).reshape(-1))
  return _augment_batch(images, example_rngs, recipe=recipe, view=view, mean=mean, std=std)
