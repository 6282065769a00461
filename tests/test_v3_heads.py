"""MoCo v3 projector / predictor: the reference's layer layout, BN without
affine on the last layer, PyTorch's running statistics, and SyncBN inside
shard_map equal to BN over the whole batch."""
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from moco_jax.models import v3_heads
from moco_jax.weights import timm as timm_weights

FEATURES, HIDDEN, OUT = 12, 32, 8


def init(head, batch=16, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed + 100), (batch, FEATURES))
  return x, jax.jit(head.init)(jax.random.PRNGKey(seed), x)


def sequential_names(num_layers, last_bn):
  """The reference _build_mlp's nn.Sequential state_dict names."""
  names = []
  for layer in range(num_layers):
    linear, bn = 3 * layer, 3 * layer + 1
    names.append(f'{linear}.weight')
    if layer < num_layers - 1:
      names += [f'{bn}.{n}' for n in ('weight', 'bias', 'running_mean',
                                      'running_var', 'num_batches_tracked')]
    elif last_bn:
      names += [f'{bn}.{n}' for n in ('running_mean', 'running_var',
                                      'num_batches_tracked')]
  return names


@pytest.mark.parametrize('role, backbone, prefix, layers, last_bn', [
    ('projector', 'vit', 'head', 3, True),
    ('projector', 'resnet', 'fc', 2, True),
    ('predictor', 'vit', 'predictor', 2, True),
    ('predictor', 'resnet', 'predictor', 2, False),
])
def test_layout_matches_reference_sequential(role, backbone, prefix, layers, last_bn):
  head = getattr(v3_heads, role)(backbone, hidden_dim=HIDDEN, out_dim=OUT)
  assert (head.num_layers, head.last_bn, head.prefix) == (layers, last_bn, prefix)
  x, variables = init(head)
  flat = timm_weights.to_state_dict(variables)
  assert sorted(flat) == sorted(f'{prefix}.{n}'
                                for n in sequential_names(layers, last_bn))
  # Linear layers have no bias; torch shapes (out, in).
  assert flat[f'{prefix}.0.weight'].shape == (HIDDEN, FEATURES)
  last = 3 * (layers - 1)
  assert flat[f'{prefix}.{last}.weight'].shape == (OUT, HIDDEN)
  params = variables['params']
  assert set(params[f'{prefix}_0']) == {'kernel'}
  assert set(params[f'{prefix}_1']) == {'scale', 'bias'}
  if last_bn:                                 # BatchNorm1d(affine=False)
    assert f'{prefix}_{last + 1}' not in params
    assert set(variables['batch_stats'][f'{prefix}_{last + 1}']) == {'mean', 'var'}
  out = head.apply(variables, x, train=False)
  assert out.shape == (x.shape[0], OUT) and out.dtype == jnp.float32


def test_unknown_backbone_kind():
  with pytest.raises(ValueError, match="unknown backbone kind 'vgg'; valid: vit, resnet"):
    v3_heads.projector('vgg')


def test_linear_init_is_pytorch_default():
  head = v3_heads.projector('vit', hidden_dim=256, out_dim=OUT)
  _, variables = init(head)
  kernel = np.asarray(variables['params']['head_3']['kernel'])    # (256, 256)
  bound = 1 / math.sqrt(256)                 # U(±1/sqrt(fan_in))
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.97 * bound
  assert np.std(kernel) == pytest.approx(bound / math.sqrt(3), rel=0.05)


def np_mlp(x, sd, layers, last_bn, train, eps=1e-5):
  """The reference nn.Sequential forward from its state_dict (float64).

  Returns the output and, in training mode, the running stats PyTorch would
  store after this batch (momentum 0.1, unbiased running variance).
  """
  stats = {}
  for layer in range(layers):
    last = layer == layers - 1
    x = x @ sd[f'{3 * layer}.weight'].T
    if last and not last_bn:
      break
    bn = 3 * layer + 1
    if train:
      mean, var = x.mean(0), x.var(0)
      n = x.shape[0]
      stats[f'{bn}.running_mean'] = 0.9 * sd[f'{bn}.running_mean'] + 0.1 * mean
      stats[f'{bn}.running_var'] = (0.9 * sd[f'{bn}.running_var']
                                    + 0.1 * var * n / (n - 1))
    else:
      mean, var = sd[f'{bn}.running_mean'], sd[f'{bn}.running_var']
    x = (x - mean) / np.sqrt(var + eps)
    if not last:
      x = np.maximum(x * sd[f'{bn}.weight'] + sd[f'{bn}.bias'], 0)
  return x, stats


def _randomised(variables, seed=1):
  """Non-trivial BN affines and running stats (variances positive)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variables)
  rng = np.random.default_rng(seed)
  out = []
  for path, x in leaves:
    x = np.asarray(x)
    if path[-1].key == 'var':
      x = rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    elif path[-1].key != 'kernel':
      x = x + rng.normal(0, 0.3, x.shape).astype(np.float32)
    out.append(x)
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize('backbone', ['vit', 'resnet'])
@pytest.mark.parametrize('train', [True, False])
def test_forward_and_running_stats_match_numpy_reference(backbone, train):
  head = v3_heads.projector(backbone, hidden_dim=HIDDEN, out_dim=OUT)
  x, variables = init(head)
  variables = _randomised(variables)
  sd = {k.split('.', 1)[1]: v.astype(np.float64)
        for k, v in timm_weights.to_state_dict(variables).items()}
  ref, ref_stats = np_mlp(np.asarray(x, np.float64), sd, head.num_layers,
                          head.last_bn, train)
  out, updates = jax.jit(lambda v, x: head.apply(v, x, train=train,
                                                 mutable=['batch_stats']))(variables, x)
  np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
  if train:
    stats = {k.split('.', 1)[1]: v for k, v in timm_weights.to_state_dict(
        {'params': variables['params'], **updates}).items()}
    for name, value in ref_stats.items():
      np.testing.assert_allclose(stats[name], value, rtol=1e-5, atol=1e-6,
                                 err_msg=name)
    # The last BN (no affine) standardises each output feature over the batch.
    np.testing.assert_allclose(np.asarray(out).mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out).var(0), 1, atol=2e-3)


@pytest.mark.parametrize('check_vma', [False, True])
@pytest.mark.parametrize('role', ['projector', 'predictor'])
def test_sync_bn_in_shard_map_equals_whole_batch_bn(role, check_vma):
  """8 fake devices × 4 samples, statistics synced over 'data' == one BN over
  all 32 samples: outputs, updated running stats and gradients.

  check_vma=False is train_step's mode: per-device grads, then summed (or
  averaged) explicitly; with check_vma=True, the grads of the replicated
  params come out of shard_map already summed over devices.
  """
  devices = jax.devices()
  assert len(devices) == 8
  mesh = Mesh(np.array(devices), ('data',))
  make = getattr(v3_heads, role)
  synced = make('vit', hidden_dim=HIDDEN, out_dim=OUT, axis_name='data')
  whole = make('vit', hidden_dim=HIDDEN, out_dim=OUT)
  x, variables = init(whole, batch=32)
  variables = _randomised(variables)

  def loss(params, batch_stats, x, head):
    out, updates = head.apply({'params': params, 'batch_stats': batch_stats}, x,
                              mutable=['batch_stats'])
    return jnp.sum(jnp.sin(out)), (out, updates['batch_stats'])

  def local_step(params, batch_stats, x):
    (_, (out, stats)), grads = jax.value_and_grad(loss, has_aux=True)(
        params, batch_stats, x, synced)
    return out, stats, grads if check_vma else jax.lax.psum(grads, 'data')

  mapped = jax.jit(jax.shard_map(local_step, mesh=mesh,
                                 in_specs=(P(), P(), P('data')),
                                 out_specs=(P('data'), P(), P()),
                                 check_vma=check_vma))
  out, stats, grads = mapped(variables['params'], variables['batch_stats'], x)
  (_, (ref_out, ref_stats)), ref_grads = jax.jit(jax.value_and_grad(
      lambda p, s, x: loss(p, s, x, whole), has_aux=True))(
          variables['params'], variables['batch_stats'], x)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               stats, ref_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads, ref_grads)
  # Without the sync each device would normalise its own 4 samples.
  local = jax.jit(lambda v, x: whole.apply(v, x, mutable=['batch_stats'])[0])(
      variables, x[:4])
  assert float(jnp.max(jnp.abs(local - ref_out[:4]))) > 1e-2


def test_state_dict_round_trip_is_exact():
  head = v3_heads.projector('vit', hidden_dim=HIDDEN, out_dim=OUT)
  _, variables = init(head)
  variables = _randomised(variables)
  flat = timm_weights.to_state_dict(variables, num_batches_tracked=7)
  assert flat['head.7.num_batches_tracked'] == 7
  back = timm_weights.from_state_dict(flat, jax.eval_shape(lambda: variables))
  jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(variables))
  del flat['head.7.running_var']
  with pytest.raises(ValueError, match=r'missing 1: head\.7\.running_var'):
    timm_weights.from_state_dict(flat, variables)


@pytest.mark.skipif(not importlib.util.find_spec('torch'), reason='needs torch')
def test_torch_sequential_matches_flax():
  """The reference _build_mlp layout in torch, loaded strictly from our export."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  head = v3_heads.projector('vit', hidden_dim=HIDDEN, out_dim=OUT)
  x, variables = init(head)
  variables = _randomised(variables)
  mlp = []
  for layer in range(3):
    dim1 = FEATURES if layer == 0 else HIDDEN
    dim2 = OUT if layer == 2 else HIDDEN
    mlp.append(nn.Linear(dim1, dim2, bias=False))
    if layer < 2:
      mlp += [nn.BatchNorm1d(dim2), nn.ReLU(inplace=True)]
    else:
      mlp.append(nn.BatchNorm1d(dim2, affine=False))
  model = nn.Sequential(*mlp)
  flat = timm_weights.to_state_dict(variables)
  model.load_state_dict({k.removeprefix('head.'): torch.from_numpy(np.array(v))
                         for k, v in flat.items()}, strict=True)
  for train in (False, True):
    model.train(train)
    with torch.no_grad():
      theirs = model(torch.from_numpy(np.array(x))).numpy()
    ours, updates = head.apply(variables, x, train=train, mutable=['batch_stats'])
    diff = float(np.abs(np.asarray(ours) - theirs).max())
    print(f'torch nn.Sequential vs Flax projector (train={train}): max |diff| {diff:.3g}')
    assert diff < 1e-4
  stats = timm_weights.to_state_dict({'params': variables['params'], **updates})
  for name, value in model.state_dict().items():
    if 'running' in name:
      np.testing.assert_allclose(stats[f'head.{name}'], value.numpy(), rtol=1e-5,
                                 atol=1e-6, err_msg=name)
