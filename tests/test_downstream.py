"""The downstream Flax API (weights/backbone.py) and the examples/ programs.

Intermediate maps against independent facts (strides, the pooled features
as the mean of C5, a ViT token that depends on its patch alone), the NNX
bridge against linen, and the three example programs run as a user would.
"""
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import moco_jax
from cli_runner import python
from moco_jax.models import build_encoder, resnet
from moco_jax.models.vit import ViT, vit
from moco_jax.weights import backbone as backbone_lib
from moco_jax.weights import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(arch='resnet18', image_size=16):
  vit_model = arch.startswith('vit')
  return ml_collections.ConfigDict(dict(
      model=dict(arch=arch, width_multiplier=0.125, cifar_stem=not vit_model,
                 head='v3' if vit_model else 'mlp', head_hidden_dim=16, dim=8),
      data=dict(image_size=image_size, normalization='cifar10')))


def perturbed(variables, seed=1):
  """Every array moved off its initial value (BN statistics included), so
  that loading the wrong array cannot go unnoticed."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [
      np.asarray(leaf + 0.1 * jnp.abs(jax.random.normal(key, leaf.shape)))
      for leaf, key in zip(leaves, keys)])


def calibrated(encoder, variables, steps=40):
  """BN running statistics moved to the activations' own (train-mode passes
  over noise images), as a trained network's are: the initial mean 0 / var 1
  let a ResNet's eval-mode activations grow by orders of magnitude."""
  images = jax.random.normal(jax.random.PRNGKey(5), (32, 16, 16, 3))
  update = jax.jit(lambda v: encoder.apply(v, images, train=True, mutable=['batch_stats'])[1])
  for _ in range(steps):
    variables = dict(variables, batch_stats=update(variables)['batch_stats'])
  return variables


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  """{arch: (path, encoder variables)} of tiny Flax exports."""
  out = {}
  for arch in ('resnet18', 'vit_cpu'):
    config = tiny_config(arch)
    encoder = build_encoder(config.model, image_size=16)
    variables = calibrated(encoder, perturbed(encoder.init(
        jax.random.PRNGKey(0), jnp.zeros((2, 16, 16, 3)), train=False)))
    path = str(tmp_path_factory.mktemp('export') / f'{arch}.msgpack')
    export.save_flax(path, config, 7, variables)
    out[arch] = path, variables
  return out


def test_resnet_intermediate_maps_have_the_stage_strides():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  for cifar_stem, strides, arch, widths in (
      (False, (4, 8, 16, 32), 'resnet50', (32, 64, 128, 256)),
      (True, (1, 2, 4, 8), 'resnet18', (8, 16, 32, 64))):
    model = resnet(arch, width_multiplier=0.125, cifar_stem=cifar_stem)
    variables = model.init(jax.random.PRNGKey(0), images, train=False)
    maps = model.apply(variables, images, train=False, intermediates=True)
    assert sorted(maps) == ['C2', 'C3', 'C4', 'C5', 'pooled']
    for name, stride, width in zip(('C2', 'C3', 'C4', 'C5'), strides, widths):
      assert maps[name].shape == (2, 32 // stride, 32 // stride, width), (arch, name)
    pooled = model.apply(variables, images, train=False)
    assert pooled.shape == (2, model.num_features)
    np.testing.assert_array_equal(maps['pooled'], pooled)
    np.testing.assert_allclose(np.asarray(maps['C5']).mean(axis=(1, 2)), pooled,
                               rtol=1e-5, atol=1e-6)


def test_vit_intermediates_are_the_token_grid_and_the_class_token():
  model = vit('vit_cpu', image_size=32)        # patch 8: a 4x4 grid of D 128
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), images, train=False)
  out = model.apply(variables, images, train=False, intermediates=True)
  assert out['patch_tokens'].shape == (2, 4, 4, 128)
  np.testing.assert_allclose(out['cls'], model.apply(variables, images, train=False),
                             rtol=1e-5, atol=1e-6)   # LayerNorm of 1 vs 17 tokens
  # Without blocks a token sees its own patch only: changing the pixels of
  # patch (row 1, column 2) must change grid cell [1, 2] and no other.
  shallow = ViT(patch_size=8, embed_dim=16, depth=0, num_heads=2, image_size=32)
  shallow_vars = shallow.init(jax.random.PRNGKey(1), images)
  changed = images.at[:, 8:16, 16:24].add(1.0)
  grid = lambda x: np.asarray(shallow.apply(shallow_vars, x, intermediates=True)['patch_tokens'])
  moved = np.abs(grid(changed) - grid(images)).max(axis=(0, 3)) > 1e-6
  assert moved.tolist() == [[r == 1 and c == 2 for c in range(4)] for r in range(4)]


def test_load_flax_backbone_returns_the_module_variables_and_input_facts(exports):
  path, variables = exports['resnet18']
  loaded = moco_jax.load_flax_backbone(path)
  assert isinstance(loaded, moco_jax.Backbone)
  assert (loaded.arch, loaded.image_size, loaded.num_features, loaded.step) == (
      'resnet18', 16, 64, 7)
  assert loaded.mean == (0.4914, 0.4822, 0.4465) and loaded.std == (0.2023, 0.1994, 0.2010)
  module, unpacked = loaded                      # the old (module, variables) form
  assert module is loaded.module and unpacked is loaded.variables
  for collection in ('params', 'batch_stats'):
    for got, want in zip(jax.tree.leaves(loaded.variables[collection]),
                         jax.tree.leaves(variables[collection]['backbone'])):
      np.testing.assert_array_equal(got, want)
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  by_hand = (pixels / 255.0 - np.array(loaded.mean)) / np.array(loaded.std)
  np.testing.assert_allclose(loaded.normalize(pixels), by_hand, rtol=1e-5, atol=1e-5)
  maps = loaded.features(pixels, intermediates=True)
  np.testing.assert_allclose(
      maps['pooled'], module.apply(unpacked, by_hand.astype(np.float32), train=False),
      rtol=1e-4, atol=1e-5)
  with pytest.raises(backbone_lib.BackboneError, match=r'scaled to \[0, 1\]'):
    loaded.normalize(pixels / 255.0)

  vit_path, _ = exports['vit_cpu']
  vit_backbone = moco_jax.load_flax_backbone(vit_path)
  assert vit_backbone.variables['batch_stats'] == {}
  assert vit_backbone.num_features == 128
  assert vit_backbone.features(pixels, intermediates=True)['patch_tokens'].shape == (2, 2, 2, 128)


def test_insert_puts_the_arrays_in_a_user_model_and_refuses_another_arch(exports):
  import flax.linen as nn
  loaded = moco_jax.load_flax_backbone(exports['resnet18'][0])

  class Model(nn.Module):
    backbone: nn.Module

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, name='head')(self.backbone(x, train=False))

  x = jnp.zeros((1, 16, 16, 3))
  variables = Model(loaded.module).init(jax.random.PRNGKey(3), x)
  merged = loaded.insert(variables, 'backbone')
  np.testing.assert_array_equal(merged['params']['backbone']['conv1']['kernel'],
                                loaded.variables['params']['conv1']['kernel'])
  np.testing.assert_array_equal(merged['params']['head']['kernel'],
                                variables['params']['head']['kernel'])
  with pytest.raises(backbone_lib.BackboneError, match='no params/trunk'):
    loaded.insert(variables, 'trunk')
  wider = Model(resnet('resnet18', width_multiplier=0.25, cifar_stem=True))
  with pytest.raises(backbone_lib.BackboneError, match=r"params/backbone\['bn1'\]\['bias'\] is \(16,\), the pretrained one \(8,\)"):
    loaded.insert(wider.init(jax.random.PRNGKey(3), x), 'backbone')


@pytest.mark.parametrize('arch', ['resnet18', 'vit_cpu'])
def test_nnx_bridge_equals_linen(exports, arch):
  loaded = moco_jax.load_flax_backbone(exports[arch][0])
  model = loaded.to_nnx()
  x = jax.random.normal(jax.random.PRNGKey(2), (3, 16, 16, 3))
  want = loaded.module.apply(loaded.variables, x, train=False)
  np.testing.assert_array_equal(model(x, train=False), want)
  want_maps = loaded.module.apply(loaded.variables, x, train=False, intermediates=True)
  got_maps = model(x, train=False, intermediates=True)
  for name in want_maps:
    np.testing.assert_array_equal(got_maps[name], want_maps[name])


def test_load_backbone_from_workdir_equals_the_export(smoke_pretrain_dir):
  from_workdir = moco_jax.load_backbone_from_workdir(smoke_pretrain_dir)
  from_export = moco_jax.load_flax_backbone(export.export(smoke_pretrain_dir, 'flax'))
  assert from_workdir.step == from_export.step == 4
  assert (from_workdir.arch, from_workdir.image_size, from_workdir.mean) == (
      from_export.arch, from_export.image_size, from_export.mean)
  for got, want in zip(jax.tree.leaves(from_workdir.variables),
                       jax.tree.leaves(from_export.variables)):
    np.testing.assert_array_equal(got, want)


def run_example(name, *args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  result = subprocess.run([*python(), os.path.join(REPO, 'examples', name), *args],
                          capture_output=True, text=True, env=env, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_example_finetune_classifier_moves_the_backbone(exports):
  out = run_example('finetune_classifier.py', f'--export={exports["resnet18"][0]}',
                    '--steps=12', '--batch=16')
  assert out['loss_after'] < out['loss_before']
  assert out['backbone_arrays_changed'] == out['backbone_arrays'] > 0


def test_example_frozen_dense_head_learns_on_c4_and_keeps_the_backbone(exports):
  out = run_example('frozen_dense_head.py', f'--export={exports["resnet18"][0]}',
                    '--steps=40', '--batch=16')
  assert out['grid'] == 4                       # C4 of a CIFAR-stem ResNet at 16x16
  assert out['backbone_unchanged'] and out['backbone_arrays'] > 0
  assert out['pixel_accuracy'] > out['majority_accuracy'] + 0.03


def test_example_nnx_classifier_equals_linen_and_fine_tunes(exports):
  out = run_example('nnx_classifier.py', f'--export={exports["resnet18"][0]}',
                    '--steps=12', '--batch=16')
  assert out['nnx_linen_max_difference'] == 0.0
  assert out['loss_after'] < out['loss_before']
  assert out['backbone_max_change'] > 0
