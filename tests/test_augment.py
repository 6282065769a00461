"""Tests for moco_jax.augment against NumPy / colorsys re-derivations."""
import colorsys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax.augment import colour as A
from moco_jax.augment.normalization import MEAN_STD

LUMA = np.array([0.299, 0.587, 0.114], np.float32)
MEAN, STD = (np.array(v, np.float32) for v in MEAN_STD['imagenet'])


def _imgs(n=8, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _float_imgs(n=8, size=16, seed=0):
    return _imgs(n, size, seed).astype(np.float32) / 255.0


def _keys(n, seed=0):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _within_binomial(flags, p, sigmas=5.0):
    flags = np.asarray(flags)
    n = flags.size
    frac = flags.mean()
    assert abs(frac - p) <= sigmas * np.sqrt(p * (1 - p) / n), (frac, p, n)


# ---- NumPy references (torchvision tensor semantics) -----------------------

def np_gray(x):
    return np.repeat((x @ LUMA)[..., None], 3, axis=-1)


def np_brightness(x, f):
    return np.clip(x * f, 0, 1)


def np_contrast(x, f):
    m = (x @ LUMA).mean()
    return np.clip(f * x + (1 - f) * m, 0, 1)


def np_saturation(x, f):
    return np.clip(f * x + (1 - f) * np_gray(x), 0, 1)


def np_hue(x, shift):
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        h, s, v = colorsys.rgb_to_hsv(*x[idx].astype(np.float64))
        out[idx] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def np_blur(x, sigma, k):
    r = k // 2
    t = np.arange(-r, r + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w2 = np.outer(w, w) / w.sum() ** 2
    p = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode='reflect')
    h, wd = x.shape[:2]
    out = np.zeros_like(x, dtype=np.float64)
    for i in range(k):
        for j in range(k):
            out += w2[i, j] * p[i:i + h, j:j + wd]
    return out


NP_OPS = (np_brightness, np_contrast, np_saturation, np_hue)  # index = order code


# ---- single ops -------------------------------------------------------------

def test_identity_factors():
    x = _float_imgs()
    np.testing.assert_allclose(A.adjust_hue(x, 0.0), x, atol=1e-5)
    np.testing.assert_allclose(A.adjust_saturation(x, 1.0), x, atol=1e-5)
    np.testing.assert_allclose(A.adjust_brightness(x, 1.0), x, atol=1e-5)
    np.testing.assert_allclose(A.adjust_contrast(x, 1.0), x, atol=1e-5)


@pytest.mark.parametrize('f', [0.6, 1.0, 1.37])
def test_brightness_contrast_saturation_match_numpy(f):
    x = _float_imgs(n=3)
    np.testing.assert_allclose(A.adjust_brightness(x, f), np_brightness(x, f), atol=1e-5)
    np.testing.assert_allclose(A.adjust_saturation(x, f), np_saturation(x, f), atol=1e-5)
    for i in range(3):  # contrast's mean is per image
        np.testing.assert_allclose(A.adjust_contrast(x[i], f), np_contrast(x[i], f), atol=1e-5)
    batched = A.adjust_contrast(x, f)
    np.testing.assert_allclose(batched[1], np_contrast(x[1], f), atol=1e-5)


def test_hsv_roundtrip_and_hue_match_colorsys():
    x = _float_imgs(n=1, size=6)[0]
    x[0, 0] = (0.5, 0.5, 0.5)  # gray pixel: hue undefined, must stay gray
    x[0, 1] = (1.0, 0.0, 0.0)
    hsv = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3).astype(np.float64)])
    np.testing.assert_allclose(A.rgb_to_hsv(x).reshape(-1, 3), hsv, atol=1e-5)
    np.testing.assert_allclose(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5)
    for shift in (-0.4, -0.1, 0.05, 0.25, 0.5):
        np.testing.assert_allclose(A.adjust_hue(x, shift), np_hue(x, shift), atol=1e-5)


def test_grayscale_luma_weights():
    x = _float_imgs()
    g = np.asarray(A.grayscale(x))
    assert g.shape == x.shape
    np.testing.assert_allclose(g[..., 0], x @ LUMA, atol=1e-6)
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    np.testing.assert_array_equal(g[..., 0], g[..., 2])


@pytest.mark.parametrize('sigma', [0.1, 0.7, 2.0])
def test_blur_matches_numpy(sigma):
    x = _float_imgs(n=1, size=12)[0]
    np.testing.assert_allclose(A.gaussian_blur(x, sigma, 5), np_blur(x, sigma, 5), atol=1e-5)
    const = np.full((12, 12, 3), 0.3, np.float32)
    np.testing.assert_allclose(A.gaussian_blur(const, sigma, 5), const, atol=1e-6)


def test_blur_kernel_size():
    assert A.blur_kernel_size(224) == 23
    assert A.blur_kernel_size(32) == 3
    assert A.blur_kernel_size(8) == 3
    assert all(A.blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_solarize():
    x = np.array([0.0, 0.2, 127 / 255, 128 / 255, 0.9, 1.0], np.float32)
    np.testing.assert_allclose(A.solarize(x), np.where(x >= 0.5, 1 - x, x))
    assert float(A.solarize(x)[3]) == pytest.approx(127 / 255)


# ---- sampled decisions --------------------------------------------------------

N_STAT = 2000


def test_v2_decision_statistics():
    p = jax.device_get(A.sample_params(_keys(N_STAT), 'v2'))
    _within_binomial(p['gray'], 0.2)
    _within_binomial(p['blur'], 0.5)
    _within_binomial(p['jitter'], 0.8)
    assert not p['solarize'].any()
    for name in ('brightness', 'contrast', 'saturation'):
        assert p[name].min() >= 0.6 and p[name].max() <= 1.4, name
        assert p[name].min() < 0.65 and p[name].max() > 1.35, name  # covers the range
    assert np.abs(p['hue']).max() <= 0.1 and np.abs(p['hue']).max() > 0.09
    assert p['sigma'].min() >= 0.1 and p['sigma'].max() <= 2.0
    # Order: each row a permutation; each op first about 1/4 of the time.
    np.testing.assert_array_equal(np.sort(p['order'], axis=1), np.tile(np.arange(4), (N_STAT, 1)))
    for op in range(4):
        _within_binomial(p['order'][:, 0] == op, 0.25)
    # Decisions are independent of each other (gray vs blur).
    _within_binomial(p['gray'][p['blur']], 0.2)


def test_other_recipes_decisions():
    keys = _keys(N_STAT, seed=1)
    v1 = jax.device_get(A.sample_params(keys, 'v1'))
    assert v1['jitter'].all() and not v1['blur'].any()
    _within_binomial(v1['gray'], 0.2)
    assert np.abs(v1['hue']).max() <= 0.4 and np.abs(v1['hue']).max() > 0.39
    cifar = jax.device_get(A.sample_params(keys, 'cifar'))
    assert not cifar['blur'].any() and not cifar['solarize'].any()
    _within_binomial(cifar['jitter'], 0.8)
    for view, p_blur, p_sol in ((0, 1.0, 0.0), (1, 0.1, 0.2)):
        v3 = jax.device_get(A.sample_params(keys, 'v3', view))
        assert v3['saturation'].min() >= 0.8 and v3['saturation'].max() <= 1.2
        _within_binomial(v3['gray'], 0.2)
        if p_blur == 1.0:
            assert v3['blur'].all()
        else:
            _within_binomial(v3['blur'], p_blur)
        if p_sol == 0.0:
            assert not v3['solarize'].any()
        else:
            _within_binomial(v3['solarize'], p_sol)
    none = jax.device_get(A.sample_params(keys, 'none'))
    assert not any(none[k].any() for k in ('jitter', 'gray', 'blur', 'solarize'))


# ---- applying decisions -------------------------------------------------------

def _unnormalize(y):
    return np.asarray(y) * STD + MEAN


def test_v2_outputs_follow_decisions():
    """Gray outputs are exactly the gray-flagged ones (~20%); blur/jitter change exactly the flagged ones."""
    imgs = _imgs(N_STAT, 8, seed=2)
    keys = _keys(N_STAT, seed=3)
    out = _unnormalize(A.augment_batch(imgs, keys, 'v2'))
    p = A.sample_params(keys, 'v2')
    is_gray = np.ptp(out, axis=-1).max(axis=(1, 2)) < 1e-5
    np.testing.assert_array_equal(is_gray, np.asarray(p['gray']))
    _within_binomial(is_gray, 0.2)

    x = imgs.astype(np.float32) / 255.0
    ref = np.asarray(A.apply_params(x, p, 'v2'))
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for flag in ('blur', 'jitter'):
        off = np.asarray(A.apply_params(x, {**p, flag: jnp.zeros_like(p[flag])}, 'v2'))
        changed = np.abs(off - ref).max(axis=(1, 2, 3)) > 1e-6
        flagged = np.asarray(p[flag])
        assert not (changed & ~flagged).any(), flag
        # A blur with sigma ~0.1 has weights exp(-50) off-centre: a no-op in float32.
        visible = flagged & (np.asarray(p['sigma']) > 0.3) if flag == 'blur' else flagged
        assert changed[visible].all(), flag
        _within_binomial(flagged, {'blur': 0.5, 'jitter': 0.8}[flag])


def test_v3_solarize_only_on_view1():
    imgs = _imgs(N_STAT, 8, seed=4)
    keys = _keys(N_STAT, seed=5)
    x = imgs.astype(np.float32) / 255.0
    for view in (0, 1):
        p = A.sample_params(keys, 'v3', view)
        out = np.asarray(A.apply_params(x, p, 'v3', view))
        off = np.asarray(A.apply_params(x, {**p, 'solarize': jnp.zeros_like(p['solarize'])}, 'v3', view))
        changed = np.abs(off - out).max(axis=(1, 2, 3)) > 1e-6
        flagged = np.asarray(p['solarize'])
        # Solarize is a no-op on an image with no pixel >= 0.5 (dark after jitter).
        np.testing.assert_array_equal(changed, flagged & (off.max(axis=(1, 2, 3)) >= 0.5))
        if view == 0:
            assert not changed.any()
        else:
            _within_binomial(flagged, 0.2)
            np.testing.assert_allclose(out[changed], np.where(off[changed] >= 0.5, 1 - off[changed], off[changed]),
                                       atol=1e-6)


def _manual_params(n, **kw):
    p = dict(jitter=True, gray=False, blur=False, solarize=False, brightness=1.0, contrast=1.0,
             saturation=1.0, hue=0.0, sigma=1.0, order=(0, 1, 2, 3))
    p.update(kw)
    return {k: jnp.broadcast_to(jnp.asarray(v), (n,) + np.shape(v)) for k, v in p.items()}


@pytest.mark.parametrize('order', [(0, 1, 2, 3), (3, 2, 1, 0), (2, 0, 3, 1)])
def test_jitter_applies_ops_in_sampled_order(order):
    x = _float_imgs(n=2, size=6, seed=6)
    factors = dict(brightness=1.3, contrast=0.7, saturation=1.35, hue=0.08)
    out = np.asarray(A.apply_params(x, _manual_params(2, order=order, **factors), 'cifar'))
    args = (factors['brightness'], factors['contrast'], factors['saturation'], factors['hue'])
    for i in range(2):
        ref = x[i]
        for op in order:
            ref = NP_OPS[op](ref, args[op]).astype(np.float32)
        np.testing.assert_allclose(out[i], ref, atol=1e-5)


def test_v1_grayscale_before_jitter_and_all_off_is_identity():
    x = _float_imgs(n=2, size=6, seed=7)
    out = np.asarray(A.apply_params(x, _manual_params(2, gray=True, brightness=1.2, contrast=0.8), 'v1'))
    ref = np_contrast(np_brightness(np_gray(x[0]), 1.2), 0.8)
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    for recipe in ('v2', 'v3'):
        p = _manual_params(2, jitter=False, brightness=1.4, hue=0.1)
        np.testing.assert_allclose(A.apply_params(x, p, recipe), x, atol=1e-6)


# ---- end to end -----------------------------------------------------------

@pytest.mark.parametrize('recipe,view', [('v1', 0), ('v2', 0), ('cifar', 0), ('v3', 0), ('v3', 1), ('none', 0)])
def test_shapes_dtype_determinism(recipe, view):
    imgs = _imgs()
    out1 = A.augment_batch(imgs, _keys(8), recipe, view)
    out2 = A.augment_batch(imgs, _keys(8), recipe, view)
    assert out1.dtype == jnp.float32 and out1.shape == imgs.shape
    np.testing.assert_array_equal(out1, out2)
    if recipe != 'none':
        out3 = A.augment_batch(imgs, _keys(8, seed=1), recipe, view)
        assert np.abs(np.asarray(out1) - np.asarray(out3)).max(axis=(1, 2, 3)).min() > 1e-4
        # Same image, different keys -> different outputs (one rng per example).
        same = np.repeat(imgs[:1], 8, axis=0)
        o = np.asarray(A.augment_batch(same, _keys(8, seed=2), recipe, view))
        assert np.abs(o - o[:1]).max(axis=(1, 2, 3))[1:].min() > 1e-4


def test_none_is_plain_normalisation():
    imgs = _imgs()
    for name, (mean, std) in MEAN_STD.items():
        ref = (imgs.astype(np.float32) / 255.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
        np.testing.assert_allclose(A.augment_batch(imgs, _keys(8), 'none', mean=mean, std=std), ref,
                                   atol=1e-5, err_msg=name)
        np.testing.assert_allclose(A.normalize(imgs, mean, std), ref, atol=1e-5)
        np.testing.assert_allclose(A.normalize(imgs.astype(np.float32), mean, std), ref, atol=1e-5)
    assert A.normalize(imgs, *MEAN_STD['imagenet']).dtype == jnp.float32


def test_typed_keys_and_inside_jit():
    imgs = _imgs()
    raw = _keys(8)
    typed = jax.random.wrap_key_data(raw)
    ref = np.asarray(A.augment_batch(imgs, raw, 'v2'))
    np.testing.assert_array_equal(A.augment_batch(imgs, typed, 'v2'), ref)
    jitted = jax.jit(lambda im, k: A.augment_batch(im, k, 'v2'))
    np.testing.assert_allclose(jitted(imgs, raw), ref, atol=1e-6)


def test_unknown_recipe_raises():
    with pytest.raises(ValueError, match=r"'v9'.*v1.*v2.*v3.*cifar.*none"):
        A.augment_batch(_imgs(), _keys(8), 'v9')
    with pytest.raises(ValueError, match='v9'):
        A.sample_params(_keys(8), 'v9')
    with pytest.raises(ValueError, match='view'):
        A.augment_batch(_imgs(), _keys(8), 'v3', view=2)
