"""ResNet structure (against torchvision's published sizes) and grouped BN."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moco_jax.models import build_encoder, resnet
from moco_jax.models.batch_norm import GroupedBatchNorm


def param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_init(module, size=224):
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(x.shape)))


# torchvision's parameter counts without the 1000-way fc (weights + biases).
TORCHVISION_BACKBONE_PARAMS = {
    'resnet18': 11_689_512 - 513_000,
    'resnet34': 21_797_672 - 513_000,
    'resnet50': 25_557_032 - 2_049_000,
    'resnet101': 44_549_160 - 2_049_000,
    'resnet152': 60_192_808 - 2_049_000,
}


@pytest.mark.parametrize('arch', sorted(TORCHVISION_BACKBONE_PARAMS))
def test_parameter_counts_match_torchvision(arch):
  variables = abstract_init(resnet(arch))
  assert param_count(variables['params']) == TORCHVISION_BACKBONE_PARAMS[arch]


def test_torchvision_names_and_shapes():
  params = abstract_init(resnet('resnet50'))['params']
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  block = params['layer2_0']
  # v1.5: the stride-2 sits on the 3×3 conv2; downsample is conv + BN.
  assert block['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert block['downsample_0']['kernel'].shape == (1, 1, 256, 512)
  assert set(block['downsample_1']) == {'scale', 'bias'}
  assert 'layer4_2' in params and 'layer4_3' not in params


def test_width_multiplier_and_cifar_stem():
  module = resnet('resnet50', width_multiplier=2)
  assert module.num_features == 4096
  out = jax.eval_shape(lambda: module.init_with_output(
      jax.random.PRNGKey(0), jnp.zeros((2, 64, 64, 3)))[0])
  assert out.shape == (2, 4096)
  cifar = resnet('resnet18', cifar_stem=True, width_multiplier=0.25)
  params = abstract_init(cifar, size=32)['params']
  assert params['conv1']['kernel'].shape == (3, 3, 3, 16)
  assert cifar.num_features == 128


def test_unknown_arch_names_valid_choices():
  with pytest.raises(ValueError, match="unknown model.arch 'resnet42'.*resnet18"):
    resnet('resnet42')


def test_grouped_batch_norm_equals_plain_bn_per_group():
  x = jax.random.normal(jax.random.PRNGKey(0), (12, 3, 3, 5)) * 3 + 1
  grouped = GroupedBatchNorm(num_groups=4)
  variables = grouped.init(jax.random.PRNGKey(1), x)
  variables = {'params': {'scale': jnp.linspace(0.5, 2, 5), 'bias': jnp.arange(5.0)},
               'batch_stats': variables['batch_stats']}
  y, updates = grouped.apply(variables, x, mutable=['batch_stats'])
  plain = GroupedBatchNorm(num_groups=1)
  ys, means, variances = [], [], []
  for g in range(4):
    yg, ug = plain.apply(variables, x[3 * g:3 * g + 3], mutable=['batch_stats'])
    ys.append(yg)
    means.append(ug['batch_stats']['mean'])
    variances.append(ug['batch_stats']['var'])
  np.testing.assert_allclose(y, jnp.concatenate(ys), rtol=1e-5, atol=1e-5)
  # Running statistics: the average of the groups' updates.
  np.testing.assert_allclose(updates['batch_stats']['mean'], np.mean(means, 0), rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], np.mean(variances, 0), rtol=1e-5)


def test_batch_norm_matches_numpy_and_pytorch_running_stats():
  x = np.random.default_rng(0).normal(2.0, 3.0, (8, 2, 2, 3)).astype(np.float32)
  bn = GroupedBatchNorm(momentum=0.9, epsilon=1e-5)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
  n = 8 * 2 * 2
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * var * n / (n - 1),
                             rtol=1e-5)
  # Inference mode uses the running statistics.
  eval_bn = GroupedBatchNorm(use_running_average=True)
  stats = {'params': variables['params'], 'batch_stats': updates['batch_stats']}
  y_eval = eval_bn.apply(stats, x)
  running = updates['batch_stats']
  np.testing.assert_allclose(
      y_eval, (x - running['mean']) / np.sqrt(running['var'] + 1e-5), rtol=1e-4, atol=1e-4)


def test_group_count_must_divide_batch():
  with pytest.raises(ValueError, match='num_groups=3'):
    GroupedBatchNorm(num_groups=3).init(jax.random.PRNGKey(0), jnp.zeros((4, 2)))


def test_encoder_heads():
  model = ml_collections.ConfigDict(dict(arch='resnet18', width_multiplier=0.125,
                                         cifar_stem=True, head='mlp', head_hidden_dim=0,
                                         dim=16))
  encoder = build_encoder(model)
  x = jnp.zeros((2, 16, 16, 3))
  variables = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), x))
  head = variables['params']['head']
  assert head['fc_0']['kernel'].shape == (64, 64) and head['fc_2']['kernel'].shape == (64, 16)
  model.head = 'linear'
  variables = jax.eval_shape(lambda: build_encoder(model).init(jax.random.PRNGKey(0), x))
  assert variables['params']['head']['fc']['kernel'].shape == (64, 16)
