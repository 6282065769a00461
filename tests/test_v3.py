"""MoCo v3 on the shared step: the queue-free symmetric loss against a NumPy
transcription of the paper's Algorithm 1, the momentum schedule, an EMA of
parameters only, 8 devices = 1 device, exact resume, the reference's LARS,
the frozen patch projection and the config checks."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import restored_state, smoke_config, straight_and_resumed_runs
from moco_jax import moco, optim
from moco_jax.config.checks import config_problems
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.models import Encoder, ResNet, ViT, predictor, projector
from moco_jax.state import create_state
from moco_jax.train_step import make_train_step

GLOBAL_BATCH, IMAGE_SIZE, DIM, HIDDEN = 16, 16, 8, 32


# --- the loss: Algorithm 1 of arXiv:2104.02057 in NumPy ---------------------

def numpy_ctr(q, k, tau):
  """ctr(q, k) of Algorithm 1: CE(q kᵀ / τ, range(N)) · 2τ on the global batch."""
  normalize = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  logits = normalize(q).astype(np.float64) @ normalize(k).astype(np.float64).T / tau
  logits -= logits.max(axis=1, keepdims=True)
  log_prob = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_prob)) * 2 * tau


@pytest.mark.parametrize('num_devices', [1, 8])
def test_v3_loss_equals_algorithm_1(num_devices):
  rng = np.random.default_rng(0)
  q1, q2, k1, k2 = rng.normal(size=(4, GLOBAL_BATCH, DIM)).astype(np.float32)
  tau = 0.2
  mesh = Mesh(jax.devices()[:num_devices], ('data',))

  def per_device(q1, q2, k1, k2):
    loss = 0.0
    for q, k in ((q1, k2), (q2, k1)):
      logits, labels = moco.batch_logits(moco.l2_normalize(q), moco.l2_normalize(k),
                                         tau, 'data')
      loss += moco.batch_contrastive_loss(logits, labels, tau)
    return jax.lax.pmean(loss, 'data')

  mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'),) * 4,
                                 out_specs=P(), check_vma=False))
  got = float(mapped(q1, q2, k1, k2))
  want = numpy_ctr(q1, k2, tau) + numpy_ctr(q2, k1, tau)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_batch_labels_are_global_indices_and_accuracy_reads_them():
  mesh = Mesh(jax.devices()[:4], ('data',))
  k = jnp.eye(8, dtype=jnp.float32)          # key i is the i-th unit vector

  def per_device(q, k):
    logits, labels = moco.batch_logits(q, k, 1.0, 'data')
    accuracy = moco.positive_rank_accuracy(moco.positive_first(logits, labels), 1)
    return labels, accuracy[None]

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P('data'), P('data')),
                         out_specs=(P('data'), P('data')), check_vma=False)
  labels, accuracy = mapped(k, k)             # each query equals its own key
  np.testing.assert_array_equal(labels, np.arange(8))
  np.testing.assert_array_equal(accuracy, np.ones(4))
  _, accuracy = mapped(jnp.roll(k, 1, axis=0), k)   # each equals another key
  np.testing.assert_array_equal(accuracy, np.zeros(4))


# --- momentum schedule ------------------------------------------------------

@pytest.mark.parametrize('step', [0, 50, 100, 37])
def test_cosine_momentum_equals_formula(step):
  total, m0 = 100, 0.99
  want = 1 - 0.5 * (1 + np.cos(np.pi * step / total)) * (1 - m0)
  got = float(moco.momentum_at(step, total, m0, 'cosine'))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
  assert {0: m0, 50: 0.995, 100: 1.0}.get(step, want) == pytest.approx(want, abs=1e-12)


def test_constant_momentum_is_the_config_value_and_cosine_needs_a_length():
  assert moco.momentum_at(7, 100, 0.999) == 0.999
  with pytest.raises(ValueError, match='total_steps=0'):
    moco.momentum_at(0, 0, 0.99, 'cosine')


# --- optimisers -------------------------------------------------------------

def numpy_reference_lars(params, grads_per_step, lrs, wd, momentum, eta=0.001):
  """MoCo v3's LARS transcribed: decay and trust ratio on matrices only, lr
  applied to the momentum buffer."""
  params = {k: v.astype(np.float64).copy() for k, v in params.items()}
  mu = {k: np.zeros_like(v) for k, v in params.items()}
  for grads, lr in zip(grads_per_step, lrs):
    for name, w in params.items():
      d = grads[name].astype(np.float64)
      if w.ndim > 1:
        d = d + wd * w
        w_norm, d_norm = np.linalg.norm(w), np.linalg.norm(d)
        d = d * (eta * w_norm / d_norm if w_norm > 0 and d_norm > 0 else 1.0)
      mu[name] = momentum * mu[name] + d
      params[name] = w - lr * mu[name]
  return params


def test_reference_lars_matches_numpy_with_a_changing_lr():
  rng = np.random.default_rng(0)
  params = {'kernel': rng.normal(size=(4, 3)).astype(np.float32),
            'zero_kernel': np.zeros((2, 2), np.float32),
            'bias': rng.normal(size=(3,)).astype(np.float32)}
  grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
           for _ in range(4)]
  schedule = lambda count: 0.5 * (count + 1.0)        # 0.5, 1.0, 1.5, 2.0
  optimizer = optim.reference_lars(schedule, weight_decay=0.1, momentum=0.9)
  state, current = optimizer.init(params), jax.tree.map(jnp.asarray, params)
  for g in grads:
    updates, state = optimizer.update(g, state, current)
    current = optax.apply_updates(current, updates)
  want = numpy_reference_lars(params, grads, [0.5, 1.0, 1.5, 2.0], 0.1, 0.9)
  for name in params:
    np.testing.assert_allclose(current[name], want[name], rtol=1e-5, atol=1e-6)
  # optax.lars applies the lr before the momentum: another result here.
  other = optax.lars(schedule, weight_decay=0.1, momentum=0.9,
                     weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
                     trust_ratio_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
  state, theirs = other.init(params), jax.tree.map(jnp.asarray, params)
  for g in grads:
    updates, state = other.update(g, state, theirs)
    theirs = optax.apply_updates(theirs, updates)
  assert not np.allclose(theirs['kernel'], want['kernel'], rtol=1e-3)


def test_frozen_patch_projection_gets_no_update_and_no_decay():
  config = ml_collections.ConfigDict(dict(name='adamw', weight_decay=0.1, momentum=0.9))
  params = {'backbone': {'patch_embed': {'proj': {'kernel': jnp.ones((2, 3))}},
                         'cls_token': jnp.ones((1, 1, 3))},
            'head': {'kernel': jnp.ones((3, 2))}}
  optimizer = optim.build_optimizer(config, 0.1, (('backbone', 'patch_embed'),))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_array_equal(new['backbone']['patch_embed']['proj']['kernel'], 1.0)
  assert np.all(np.asarray(new['head']['kernel']) < 1.0)
  assert np.all(np.asarray(new['backbone']['cls_token']) < 1.0)


# --- the v3 step --------------------------------------------------------------

# SGD, not AdamW: some gradients are exactly 0 in exact arithmetic (the final
# LayerNorm's bias before the projector's BN, the attention's key bias), and
# Adam turns their rounding noise into ±lr steps that differ with the device
# count. The optimiser is not what the equivalence tests.
OPTIM = ml_collections.ConfigDict(dict(name='sgd', base_lr=0.5, momentum=0.9,
                                       weight_decay=0.1, schedule='constant',
                                       warmup_epochs=0, lr_drop_epochs=()))
MOCO = dict(momentum=0.99, momentum_schedule='cosine', temperature=0.2,
            shuffle_bn=False, symmetric=True, queue_size=0)


def v3_setup(num_devices, backbone='vit', dtype=jnp.float32):
  mesh = Mesh(jax.devices()[:num_devices], ('data',))
  if backbone == 'vit':
    net = ViT(patch_size=8, embed_dim=16, depth=1, num_heads=2, image_size=IMAGE_SIZE,
              stop_grad_conv1=True, dtype=dtype)
    frozen, kind = (('backbone', 'patch_embed'),), 'vit'
  else:   # 8 backbone BN groups of the global batch, as the recipes
    net = ResNet(stage_sizes=(1, 1), block='basic', width_multiplier=0.25,
                 cifar_stem=True, bn_groups=8 // num_devices, conv_impl='xla')
    frozen, kind = (), 'resnet'
  encoder = Encoder(backbone=net, head=projector(kind, HIDDEN, DIM, 'data', dtype),
                    predictor=predictor(kind, HIDDEN, DIM, 'data', dtype))
  schedule = optim.learning_rate_schedule(OPTIM, GLOBAL_BATCH, 10, 10)
  optimizer = optim.build_optimizer(OPTIM, schedule, frozen)
  mean, std = MEAN_STD['cifar10']
  step = make_train_step(mesh, encoder=encoder, optimizer=optimizer, schedule=schedule,
                         moco_config=ml_collections.ConfigDict(MOCO),
                         augment_config=dict(recipe='v3', mean=mean, std=std),
                         total_steps=10)
  state = create_state(encoder, optimizer, jax.random.PRNGKey(0), IMAGE_SIZE, 0, DIM,
                       max(8 // num_devices, 1) if backbone != 'vit' else 1)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  return state, step, shard


def images(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (num_steps, 2, GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3),
                      dtype=np.uint8)


def run(num_devices, batches, backbone='vit', state=None):
  fresh, step, shard = v3_setup(num_devices, backbone)
  state = fresh if state is None else state
  losses = []
  for x1, x2 in batches:
    state, metrics = step(state, shard(x1), shard(x2))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses, jax.device_get(metrics)


def assert_trees_close(a, b, **tolerance):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


@pytest.mark.parametrize('backbone', ['vit', 'resnet'])
def test_v3_eight_devices_equal_one_device(backbone):
  batches = images(2)
  state_8, losses_8, _ = run(8, batches, backbone)
  state_1, losses_1, _ = run(1, batches, backbone)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  tolerance = dict(rtol=2e-4, atol=2e-5)
  assert_trees_close(state_8.params, state_1.params, **tolerance)
  assert_trees_close(state_8.target_params, state_1.target_params, **tolerance)
  # The heads' SyncBN statistics (and the backbone's, for the ResNet).
  assert_trees_close(state_8.batch_stats, state_1.batch_stats, **tolerance)
  assert_trees_close(state_8.target_batch_stats, state_1.target_batch_stats, **tolerance)
  assert state_8.queue is None and state_8.queue_ptr is None


def test_v3_vit_step_in_bfloat16_keeps_float32_params_and_loss():
  (x1, x2), = images(1)
  losses = {}
  for name, dtype in (('f32', jnp.float32), ('bf16', jnp.bfloat16)):
    state, step, shard = v3_setup(1, dtype=dtype)
    state, metrics = step(state, shard(x1), shard(x2))
    losses[name] = float(metrics['loss'])
    assert metrics['loss'].dtype == jnp.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
  assert np.isfinite(losses['bf16'])
  np.testing.assert_allclose(losses['bf16'], losses['f32'], rtol=2e-2)


def test_v3_state_has_no_queue_and_the_ema_covers_parameters_only():
  fresh, step, shard = v3_setup(1)
  assert fresh.queue is None and fresh.queue_ptr is None
  assert set(fresh.params) == {'backbone', 'head', 'predictor'}
  assert set(fresh.target_params) == {'backbone', 'head'}
  assert set(fresh.batch_stats) == {'head', 'predictor'}
  assert set(fresh.target_batch_stats) == {'head'}
  # Same state but the query encoder's BN statistics and predictor moved: the
  # key encoder's result must not depend on either.
  fresh = jax.device_get(fresh)
  other = fresh.replace(
      batch_stats=jax.tree.map(lambda x: x + 3.0, fresh.batch_stats),
      params={**fresh.params, 'predictor': jax.tree.map(lambda x: x * 2.0,
                                                         fresh.params['predictor'])})
  (x1, x2), = images(1)
  a, metrics = step(fresh, shard(x1), shard(x2))
  b, _ = step(other, shard(x1), shard(x2))
  a, b = jax.device_get((a, b))
  m0 = MOCO['momentum']
  assert float(metrics['momentum']) == pytest.approx(m0)   # step 0 of the cosine
  want = jax.tree.map(lambda t, p: m0 * t + (1 - m0) * p, fresh.target_params,
                      {k: fresh.params[k] for k in ('backbone', 'head')})
  assert_trees_close(a.target_params, want, rtol=1e-6, atol=1e-7)
  assert_trees_close(a.target_params, b.target_params, rtol=0, atol=0)
  assert_trees_close(a.target_batch_stats, b.target_batch_stats, rtol=0, atol=0)
  # The predictor is trained; the frozen patch projection is not.
  assert not np.allclose(a.params['predictor']['predictor_0']['kernel'],
                         fresh.params['predictor']['predictor_0']['kernel'])
  assert_trees_close(a.params['backbone']['patch_embed'],
                     fresh.params['backbone']['patch_embed'], rtol=0, atol=0)


def test_v1_v2_step_has_no_predictor_and_keeps_the_queue():
  # The v1/v2 path: the queue and its pointer are still there.
  config = smoke_config('/unused')
  from moco_jax.models import build_encoder
  encoder = build_encoder(config.model, 8, image_size=16)
  assert encoder.predictor is None
  state = jax.eval_shape(functools.partial(
      create_state, encoder, optax.sgd(0.1), image_size=16, queue_size=64, dim=16,
      bn_groups=8), jax.random.PRNGKey(0))
  assert state.queue.shape == (64, 16) and state.queue_ptr.shape == ()
  assert set(state.params) == set(state.target_params) == {'backbone', 'head'}


# --- configs ------------------------------------------------------------------

def v3_smoke_config(data_dir, **overrides):
  """configs/smoke.py turned into a tiny ViT v3 run."""
  return smoke_config(data_dir, **{
      'model.arch': 'vit_cpu', 'model.head': 'v3', 'model.head_hidden_dim': 32,
      'model.predictor': True, 'model.stop_grad_conv1': True,
      'moco.queue_size': 0, 'moco.symmetric': True, 'moco.shuffle_bn': False,
      'moco.momentum_schedule': 'cosine', 'data.augment': 'v3',
      'optim.name': 'adamw', 'optim.base_lr': 1e-3, 'optim.weight_decay': 0.1,
      **overrides})


@pytest.mark.parametrize('overrides, message', [
    ({'model.predictor': True, 'model.head': 'mlp'}, "model.predictor=True needs model.head='v3'"),
    ({'data.image_size': 20}, 'data.image_size=20 is not a multiple of vit_cpu\'s patch size 8'),
    ({'moco.shuffle_bn': True}, 'moco.shuffle_bn=True with model.arch=\'vit_cpu\''),
    ({'model.arch': 'resnet18', 'model.stop_grad_conv1': False, 'moco.shuffle_bn': True},
     'moco.queue_size=0 (MoCo v3'),
    ({'model.arch': 'resnet18'}, 'model.stop_grad_conv1=True freezes a ViT'),
    ({'moco.momentum_schedule': 'linear'}, 'moco.momentum_schedule=\'linear\' is not one of'),
    ({'moco.queue_size': -16}, 'moco.queue_size=-16'),
])
def test_v3_config_problems_are_one_line_each(overrides, message):
  problems = config_problems(v3_smoke_config('/unused', **overrides), 8)
  assert len(problems) == 1 and problems[0].startswith(message), problems
  assert '\n' not in problems[0]


def test_v3_smoke_config_is_valid_on_1_and_16_devices():
  # A ViT has no backbone BN: moco.bn_groups does not tie it to 8 devices.
  assert config_problems(v3_smoke_config('/unused'), 1) == []
  assert config_problems(v3_smoke_config('/unused'), 16) == []


# --- resume -------------------------------------------------------------------

def test_v3_resume_is_exact(tiny_data_dir, tmp_path, monkeypatch):
  config = v3_smoke_config(tiny_data_dir)
  straight, interrupted = straight_and_resumed_runs(config, tmp_path, monkeypatch)
  want, got = restored_state(config, straight, 4), restored_state(config, interrupted, 4)
  assert int(got.step) == 4 and got.queue is None
  assert_trees_close(want, got, rtol=1e-6, atol=1e-6)
