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


@pytest.mark.parametrize('kind', ['linear', 'mlp'])
def test_head_linear_layers_start_as_pytorch_nn_linear(kind):
  """Weights and biases U(±1/sqrt(fan_in)), fan_in the layer's input width
  (torch.nn.Linear.reset_parameters): bounds, uniform std, not zero."""
  from moco_jax.models.heads import ProjectionHead
  head = ProjectionHead(kind=kind, dim=512, hidden_dim=1024)
  params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, 256)))['params']
  fan_ins = {'fc': 256, 'fc_0': 256, 'fc_2': 1024}
  for name, layer in params.items():
    bound = 1 / np.sqrt(fan_ins[name])
    for leaf in (layer['kernel'], layer['bias']):
      leaf = np.asarray(leaf)
      assert np.abs(leaf).max() <= bound and np.abs(leaf).max() > 0.98 * bound, name
      np.testing.assert_allclose(leaf.std(), bound / np.sqrt(3), rtol=0.06)
      assert abs(leaf.mean()) < 0.1 * bound


def _autodiff_batch_norm(x, scale, bias, num_groups, epsilon=1e-5):
  """GroupedBatchNorm's training-mode maths in plain jnp, for autodiff."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  grouped = x.astype(dtype).reshape((num_groups, -1) + x.shape[1:])
  axes = tuple(range(1, grouped.ndim - 1))
  mean = grouped.mean(axis=axes, keepdims=True)
  var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
  y = (grouped - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias
  flat = lambda s: s.reshape(num_groups, -1)
  return y.reshape(x.shape).astype(x.dtype), flat(mean), flat(var)


@pytest.mark.parametrize('shape,num_groups', [((16, 5, 5, 6), 1),
                                              ((16, 5, 5, 6), 4),
                                              ((12, 7), 3)])
def test_batch_norm_vjp_matches_autodiff(shape, num_groups):
  # The hand-written VJP, cotangents of all three outputs (y, group means,
  # group variances), in float64 so that only the formulas are compared.
  from moco_jax.models import batch_norm
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, shape))
    scale, bias = (jnp.asarray(rng.normal(1.0, 0.5, shape[-1])) for _ in '01')
    stats_shape = (num_groups, shape[-1])
    cotangents = (jnp.asarray(rng.normal(size=shape)),
                  jnp.asarray(rng.normal(size=stats_shape)),
                  jnp.asarray(rng.normal(size=stats_shape)))
    ours = lambda x, s, b: batch_norm._normalize(x, s, b, num_groups, 1e-5,
                                                 jnp.dtype(jnp.float64))
    ref = lambda x, s, b: _autodiff_batch_norm(x, s, b, num_groups)
    got, got_vjp = jax.vjp(ours, x, scale, bias)
    want, want_vjp = jax.vjp(ref, x, scale, bias)
    for name, a, b in zip(('y', 'mean', 'var'), got, want):
      assert a.dtype == b.dtype == jnp.float64, name
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)
    for name, a, b in zip(('dx', 'dscale', 'dbias'), got_vjp(cotangents),
                          want_vjp(cotangents)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_module_gradients_match_autodiff(dtype):
  x = jnp.asarray(np.random.default_rng(1).normal(-2.0, 3.0, (16, 4, 4, 8)),
                  dtype)
  bn = GroupedBatchNorm(num_groups=4)
  variables = bn.init(jax.random.PRNGKey(0), x)
  params = {'scale': jnp.linspace(0.5, 2, 8), 'bias': jnp.linspace(-1, 1, 8)}
  weights = jnp.asarray(np.random.default_rng(2).normal(size=x.shape))

  def loss(module_or_ref, params, x):
    if module_or_ref == 'module':
      y, _ = bn.apply({'params': params,
                       'batch_stats': variables['batch_stats']}, x,
                      mutable=['batch_stats'])
    else:
      y = _autodiff_batch_norm(x, params['scale'], params['bias'], 4)[0]
    assert y.dtype == dtype
    return jnp.sum(jax.nn.relu(y.astype(jnp.float32)) * weights)

  got = jax.jit(jax.grad(lambda p, x: loss('module', p, x), (0, 1)))(params, x)
  want = jax.jit(jax.grad(lambda p, x: loss('ref', p, x), (0, 1)))(params, x)
  tol = 1e-4 if dtype == jnp.float32 else 2e-2
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(b, np.float32), rtol=tol,
                               atol=tol * float(jnp.abs(b).max()))


def test_cpu_tuning_is_a_no_op_off_cpu():
  from moco_jax.runtime import cpu_tuning
  assert cpu_tuning.apply(backend='gpu') is False
