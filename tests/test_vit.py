"""ViT backbone (against timm's published sizes, NumPy re-implementations of
the reference formulas) and the timm / MoCo v3 weight mapping."""
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moco_jax.models import vit as vit_lib
from moco_jax.weights import timm as timm_weights

# Tiny ViT for the numerical tests: 16×16 images, 4×4 patches (16 tokens + cls).
TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=4, image_size=16)


def param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_params(module, size):
  return jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))['params']


def timm_param_count(dim, depth, patch, image_size):
  """timm's VisionTransformer(num_classes=0) parameter count, pos_embed included.

  patch_embed.proj 3·p²·D + D; cls_token D; pos_embed (1 + N)·D; per block:
  norm1, norm2 2·2D, qkv 3D² + 3D, proj D² + D, fc1 4D² + 4D, fc2 4D² + D,
  i.e. 12D² + 13D; final norm 2D.
  """
  tokens = (image_size // patch)**2
  return (3 * patch * patch * dim + dim + dim + (1 + tokens) * dim
          + depth * (12 * dim * dim + 13 * dim) + 2 * dim)


# timm's published sizes without the classifier: ViT-S/16 21.7M, ViT-B/16
# 85.8M (vit_base_patch16_224 is 86,567,656 with its 768·1000 + 1000 head).
@pytest.mark.parametrize('arch, published', [('vit_small', 21_665_664),
                                             ('vit_base', 86_567_656 - 769_000)])
def test_parameter_counts_match_timm(arch, published):
  spec = vit_lib.ARCHS[arch]
  assert timm_param_count(spec.dim, spec.depth, spec.patch, 224) == published
  params = abstract_params(vit_lib.vit(arch), 224)
  pos_embed = (1 + 14 * 14) * spec.dim            # a constant here, not a param
  assert param_count(params) + pos_embed == published


def test_timm_names_and_shapes():
  params = abstract_params(vit_lib.vit('vit_small'), 224)
  assert params['patch_embed']['proj']['kernel'].shape == (16, 16, 3, 384)
  assert params['cls_token'].shape == (1, 1, 384)
  block = params['blocks_11']
  assert block['attn']['qkv']['kernel'].shape == (384, 3 * 384)
  assert set(block['attn']['qkv']) == {'kernel', 'bias'}
  assert block['mlp']['fc1']['kernel'].shape == (384, 4 * 384)
  assert set(block['norm1']) == {'scale', 'bias'}
  assert 'blocks_12' not in params and set(params['norm']) == {'scale', 'bias'}
  names = timm_weights.to_timm(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                            {'params': params}), 224)
  assert names['pos_embed'].shape == (1, 197, 384)
  assert {'blocks.0.attn.qkv.weight', 'blocks.0.attn.proj.bias', 'norm.weight',
          'blocks.11.mlp.fc2.weight', 'patch_embed.proj.bias'} <= set(names)
  assert names['patch_embed.proj.weight'].shape == (384, 3, 16, 16)


def test_archs_and_errors():
  for arch, spec in vit_lib.ARCHS.items():
    size = 224 if spec.patch == 16 else 32
    module = vit_lib.vit(arch, image_size=size)
    assert module.num_features == spec.dim
    assert spec.dim % 4 == 0 and spec.dim % spec.heads == 0
  with pytest.raises(ValueError, match='unknown model.arch .*vit_small'):
    vit_lib.vit('vit_huge')
  with pytest.raises(ValueError, match='not a multiple'):
    vit_lib.vit('vit_small', image_size=200)


def reference_sincos(h, w, dim, temperature=10000.):
  """NumPy transcription of MoCo v3's build_2d_sincos_position_embedding."""
  grid_w = np.arange(w, dtype=np.float32)
  grid_h = np.arange(h, dtype=np.float32)
  grid_w, grid_h = np.meshgrid(grid_w, grid_h, indexing='ij')   # torch default
  pos_dim = dim // 4
  omega = np.arange(pos_dim, dtype=np.float32) / pos_dim
  omega = 1. / (temperature**omega)
  out_w = np.einsum('m,d->md', grid_w.flatten(), omega)
  out_h = np.einsum('m,d->md', grid_h.flatten(), omega)
  pos_emb = np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h),
                            np.cos(out_h)], axis=1)[None]
  pe_token = np.zeros([1, 1, dim], np.float32)
  return np.concatenate([pe_token, pos_emb], axis=1)


@pytest.mark.parametrize('grid, dim', [(14, 384), (8, 64), (2, 8)])
def test_sincos_matches_reference_formula(grid, dim):
  ours = vit_lib.sincos_pos_embed(grid, grid, dim)
  assert ours.dtype == np.float32 and ours.shape == (1, 1 + grid * grid, dim)
  np.testing.assert_allclose(ours, reference_sincos(grid, grid, dim), atol=1e-6)
  assert not ours[0, 0].any()                       # the class slot is zero
  # Token m = row·grid + col (row-major patches): the first half encodes the
  # row, the second the column (ω_0 = 1).
  row, col, d = 1, grid - 1, dim // 4
  token = ours[0, 1 + row * grid + col]
  np.testing.assert_allclose(token[[0, d, 2 * d, 3 * d]],
                             [math.sin(row), math.cos(row), math.sin(col),
                              math.cos(col)], atol=1e-6)


def test_sincos_needs_multiple_of_four():
  with pytest.raises(ValueError, match='multiple of 4'):
    vit_lib.sincos_pos_embed(2, 2, 6)


def test_reference_initialisation_statistics():
  dim, patch = 96, 4
  module = vit_lib.ViT(patch_size=patch, embed_dim=dim, depth=1, num_heads=4,
                       image_size=16)
  params = jax.jit(module.init)(jax.random.PRNGKey(0),
                                jnp.zeros((1, 16, 16, 3)))['params']

  def check_uniform(x, bound):
    x = np.asarray(x)
    assert np.abs(x).max() <= bound
    assert np.abs(x).max() > 0.97 * bound
    assert np.std(x) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert abs(np.mean(x)) < 0.05 * bound

  block = params['blocks_0']
  qkv = np.asarray(block['attn']['qkv']['kernel'])
  for third in np.split(qkv, 3, axis=1):          # q, k, v: each (D, D) xavier
    check_uniform(third, math.sqrt(6 / (dim + dim)))
  check_uniform(block['attn']['proj']['kernel'], math.sqrt(6 / (dim + dim)))
  check_uniform(block['mlp']['fc1']['kernel'], math.sqrt(6 / (dim + 4 * dim)))
  check_uniform(block['mlp']['fc2']['kernel'], math.sqrt(6 / (4 * dim + dim)))
  check_uniform(params['patch_embed']['proj']['kernel'],
                math.sqrt(6 / (3 * patch * patch + dim)))
  cls_token = np.asarray(params['cls_token'])
  assert np.std(cls_token) == pytest.approx(1e-6, rel=0.3)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    keys = [k.key for k in path]
    if keys[-1] == 'bias':
      assert not np.asarray(leaf).any(), keys
    if keys[-1] == 'scale':
      np.testing.assert_array_equal(leaf, 1.)


def _loss(module, params, images):
  return jnp.sum(module.apply({'params': params}, images)**2)


@pytest.mark.parametrize('stop_grad', [True, False])
def test_stop_grad_conv1_zeroes_patch_embed_grads(stop_grad):
  module = vit_lib.ViT(**TINY, stop_grad_conv1=stop_grad)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  params = jax.jit(module.init)(jax.random.PRNGKey(0), images)['params']
  grads = jax.jit(jax.grad(lambda p: _loss(module, p, images)))(params)
  patch = grads['patch_embed']['proj']
  if stop_grad:
    assert not np.asarray(patch['kernel']).any()
    assert not np.asarray(patch['bias']).any()
  else:
    assert np.abs(np.asarray(patch['kernel'])).max() > 0
  assert np.abs(np.asarray(grads['blocks_0']['attn']['qkv']['kernel'])).max() > 0
  assert np.abs(np.asarray(grads['cls_token'])).max() > 0


# --- NumPy forward from timm-named arrays in PyTorch layouts -----------------

def np_layer_norm(x, weight, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * weight + bias


def np_linear(x, sd, name):
  return x @ sd[f'{name}.weight'].T + sd[f'{name}.bias']


def np_gelu(x):
  return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def np_block(x, sd, prefix, heads):
  """timm's Block.forward on (B, N, D) float64, transcribed."""
  b, n, d = x.shape
  y = np_layer_norm(x, sd[f'{prefix}.norm1.weight'], sd[f'{prefix}.norm1.bias'])
  qkv = np_linear(y, sd, f'{prefix}.attn.qkv').reshape(b, n, 3, heads, d // heads)
  q, k, v = qkv.transpose(2, 0, 3, 1, 4)            # (B, heads, N, hd) each
  attn = (q * (d // heads)**-0.5) @ k.transpose(0, 1, 3, 2)
  attn = np.exp(attn - attn.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
  x = x + np_linear(y, sd, f'{prefix}.attn.proj')
  y = np_layer_norm(x, sd[f'{prefix}.norm2.weight'], sd[f'{prefix}.norm2.bias'])
  y = np_linear(np_gelu(np_linear(y, sd, f'{prefix}.mlp.fc1')), sd,
                f'{prefix}.mlp.fc2')
  return x + y


def np_vit(images_nchw, sd, patch, depth, heads):
  """timm's VisionTransformer.forward (token pool, no head), transcribed."""
  weight, bias = sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias']
  b, c, h, w = images_nchw.shape
  gh, gw = h // patch, w // patch
  tokens = np.zeros((b, weight.shape[0], gh, gw))
  for i in range(gh):                          # Conv2d(kernel p, stride p)
    for j in range(gw):
      window = images_nchw[:, :, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
      tokens[:, :, i, j] = np.einsum('bchw,ochw->bo', window, weight) + bias
  x = tokens.reshape(b, -1, gh * gw).transpose(0, 2, 1)     # flatten(2).transpose(1, 2)
  cls = np.broadcast_to(sd['cls_token'], (b, 1, x.shape[-1]))
  x = np.concatenate([cls, x], 1) + sd['pos_embed']
  for i in range(depth):
    x = np_block(x, sd, f'blocks.{i}', heads)
  return np_layer_norm(x, sd['norm.weight'], sd['norm.bias'])[:, 0]


def _random_vit_variables(module, seed=0):
  """Init, then random non-trivial biases, LN affines and cls token."""
  return jax.jit(lambda: _perturb(module.init(
      jax.random.PRNGKey(seed),
      jnp.zeros((1, module.image_size, module.image_size, 3))), seed + 1))()


def _perturb(variables, seed):
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_block_matches_numpy_transcription():
  dim, heads = 16, 2
  block = vit_lib.Block(num_heads=heads)
  x = np.random.default_rng(0).normal(size=(2, 5, dim)).astype(np.float32)
  variables = jax.jit(lambda: _perturb(block.init(jax.random.PRNGKey(0), x), 1))()
  ours = np.asarray(jax.jit(block.apply)(variables, x))
  sd = {f'b.{k}': v.astype(np.float64)
        for k, v in timm_weights.to_state_dict(variables).items()}
  np.testing.assert_allclose(ours, np_block(x.astype(np.float64), sd, 'b', heads),
                             atol=1e-5, rtol=1e-5)


def test_vit_forward_matches_numpy_transcription():
  module = vit_lib.ViT(**TINY)
  variables = _random_vit_variables(module)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(module.apply)(variables, images))
  assert ours.shape == (2, TINY['embed_dim']) and ours.dtype == np.float32
  sd = {k: v.astype(np.float64) for k, v in timm_weights.to_timm(variables, 16).items()}
  ref = np_vit(images.transpose(0, 3, 1, 2).astype(np.float64), sd,
               TINY['patch_size'], TINY['depth'], TINY['num_heads'])
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_output():
  module = vit_lib.ViT(**TINY)
  variables = _random_vit_variables(module)
  images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  out32 = jax.jit(module.apply)(variables, images)
  bf16 = vit_lib.ViT(**TINY, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), images)
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {np.dtype(np.float32)}
  out16 = jax.jit(bf16.apply)(variables, images)
  assert out16.dtype == jnp.float32
  np.testing.assert_allclose(out16, out32, atol=0.1)
  assert float(jnp.max(jnp.abs(out16 - out32))) > 0       # really ran in bf16


# --- timm weights ------------------------------------------------------------

def test_to_timm_from_timm_round_trip_is_exact():
  module = vit_lib.ViT(**TINY)
  variables = _random_vit_variables(module)
  flat = timm_weights.to_timm(variables, image_size=16)
  assert flat['blocks.1.attn.qkv.weight'].shape == (96, 32)
  assert flat['patch_embed.proj.weight'].shape == (32, 3, 4, 4)
  assert flat['cls_token'].shape == (1, 1, 32)
  template = jax.eval_shape(lambda: variables)
  back = timm_weights.from_timm(flat, template, image_size=16)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))
  assert jax.tree.structure(back) == jax.tree.structure(variables)


def test_from_timm_errors_name_bad_keys():
  module = vit_lib.ViT(**TINY)
  variables = _random_vit_variables(module)
  template = jax.eval_shape(lambda: variables)
  flat = timm_weights.to_timm(variables, image_size=16)
  bad = dict(flat)
  del bad['blocks.0.attn.qkv.weight'], bad['blocks.0.attn.qkv.bias']
  bad['head.weight'] = np.zeros((10, 32))
  bad['norm.weight'] = np.zeros(31)
  with pytest.raises(ValueError) as error:
    timm_weights.from_timm(bad, template, what='vit.pth')
  message = str(error.value)
  assert '\n' not in message
  assert 'missing 2: blocks.0.attn.qkv.{weight,bias}' in message
  assert 'unexpected 1: head.weight' in message
  assert 'wrong shape 1: norm.weight (31,) (model: (32,))' in message
  learned = dict(flat, pos_embed=flat['pos_embed'] + 0.01)
  with pytest.raises(ValueError, match='not the fixed 2-D sin-cos'):
    timm_weights.from_timm(learned, template)
  with pytest.raises(ValueError,
                     match=r'pos_embed has shape \(1, 17, 32\).*\(1, 65, 32\)'):
    timm_weights.from_timm(flat, template, image_size=32)
  no_pos = {k: v for k, v in flat.items() if k != 'pos_embed'}
  timm_weights.from_timm(no_pos, template)                  # optional


def test_from_moco_v3_checkpoint_splits_parts():
  rng = np.random.default_rng(0)
  backbone = {'cls_token': rng.normal(size=(1, 1, 8)), 'norm.weight': np.ones(8)}
  head = {'head.0.weight': rng.normal(size=(16, 8)), 'head.1.running_var': np.ones(16),
          'head.7.running_mean': np.zeros(4)}
  pred = {'predictor.0.weight': rng.normal(size=(16, 4)),
          'predictor.1.num_batches_tracked': np.array(3)}
  flat = {}
  for encoder in ('base_encoder', 'momentum_encoder'):
    flat.update({f'module.{encoder}.{k}': v for k, v in {**backbone, **head}.items()})
  flat.update({f'module.{k}': v for k, v in pred.items()})
  parts = timm_weights.from_moco_v3_checkpoint(flat)
  assert parts['kind'] == 'vit'
  for name in ('backbone', 'momentum_backbone'):
    assert set(parts[name]) == set(backbone)
  for name in ('projector', 'momentum_projector'):
    assert set(parts[name]) == set(head)
  assert set(parts['predictor']) == set(pred)
  np.testing.assert_array_equal(parts['projector']['head.0.weight'],
                                head['head.0.weight'])
  resnet = {'base_encoder.conv1.weight': np.zeros((4, 3, 7, 7)),
            'base_encoder.fc.0.weight': np.zeros((8, 4)),
            'predictor.0.weight': np.zeros((8, 8))}
  parts = timm_weights.from_moco_v3_checkpoint(resnet)     # no 'module.' prefix
  assert parts['kind'] == 'resnet' and set(parts['projector']) == {'fc.0.weight'}
  assert set(parts['backbone']) == {'conv1.weight'}
  with pytest.raises(ValueError, match='unexpected 1: module.queue'):
    timm_weights.from_moco_v3_checkpoint({**flat, 'module.queue': np.zeros(3)})
  with pytest.raises(ValueError, match='without a projector'):
    timm_weights.from_moco_v3_checkpoint({'module.base_encoder.norm.weight': np.ones(2)})


# --- optional: timm itself ---------------------------------------------------

@pytest.mark.skipif(not (importlib.util.find_spec('torch')
                         and importlib.util.find_spec('timm')),
                    reason='needs torch and timm')
def test_timm_vision_transformer_matches_flax():
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  cfg = dict(patch_size=4, embed_dim=64, depth=2, num_heads=4, image_size=32)
  module = vit_lib.ViT(**cfg)
  variables = _random_vit_variables(module)
  model = vision_transformer.VisionTransformer(
      img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4,
      qkv_bias=True, num_classes=0, class_token=True, global_pool='token').eval()
  state = {k: torch.from_numpy(np.array(v))
           for k, v in timm_weights.to_timm(variables, 32).items()}
  model.load_state_dict(state, strict=True)
  images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(jax.jit(module.apply)(variables, images))
  diff = float(np.abs(ours - theirs).max())
  print(f'timm VisionTransformer vs Flax ViT: max |diff| {diff:.3g}')
  assert diff < 1e-5
  back = timm_weights.from_timm({k: v.numpy() for k, v in model.state_dict().items()},
                                jax.eval_shape(lambda: variables), image_size=32)
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))
