"""The mapped train step: device-count independence and real shuffle BN."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import moco, optim
from moco_jax.augment import colour as augment
from moco_jax.models import Encoder, ProjectionHead, ResNet
from moco_jax.state import create_state
from moco_jax.train_step import make_train_step, shuffle_permutations
from moco_jax.augment.normalization import MEAN_STD

GLOBAL_BATCH, IMAGE_SIZE, QUEUE, DIM = 32, 16, 64, 8
OPTIM = ml_collections.ConfigDict(dict(name='sgd', base_lr=0.03, momentum=0.9,
                                       weight_decay=1e-4, schedule='constant',
                                       warmup_epochs=0, lr_drop_epochs=()))


def setup(num_devices, bn_groups, recipe='v2', shuffle_bn=True, symmetric=False,
          queue=QUEUE):
  """bn_groups: BN groups of the global batch (moco.bn_groups)."""
  per_device = bn_groups // num_devices
  mesh = Mesh(jax.devices()[:num_devices], ('data',))
  # A two-stage ResNet keeps compile time low; the step is architecture-agnostic.
  backbone = ResNet(stage_sizes=(1, 1), block='basic', width_multiplier=0.25,
                    cifar_stem=True, bn_groups=per_device, conv_impl='xla')
  encoder = Encoder(backbone=backbone, head=ProjectionHead('mlp', DIM, 16))
  schedule = optim.learning_rate_schedule(OPTIM, GLOBAL_BATCH, 10, 10)
  optimizer = optim.build_optimizer(OPTIM, schedule)
  moco_config = ml_collections.ConfigDict(dict(momentum=0.9, temperature=0.2,
                                               shuffle_bn=shuffle_bn,
                                               symmetric=symmetric))
  mean, std = MEAN_STD['cifar10']
  step = make_train_step(mesh, encoder=encoder, optimizer=optimizer, schedule=schedule,
                         moco_config=moco_config,
                         augment_config=dict(recipe=recipe, mean=mean, std=std))
  state = create_state(encoder, optimizer, jax.random.PRNGKey(0), IMAGE_SIZE, queue,
                       DIM, per_device)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  return encoder, state, step, shard


def batches(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  shape = (num_steps, 2, GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def run(num_devices, bn_groups, images, **kwargs):
  _, state, step, shard = setup(num_devices, bn_groups, **kwargs)
  losses = []
  for images_q, images_k in images:
    state, metrics = step(state, shard(images_q), shard(images_k))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


@pytest.mark.parametrize('symmetric', [False, True])
def test_eight_devices_equal_one_device_with_eight_bn_groups(symmetric):
  images = batches(2)
  queue = QUEUE * (2 if symmetric else 1)
  state_8, losses_8 = run(8, 8, images, symmetric=symmetric, queue=queue)
  state_1, losses_1 = run(1, 8, images, symmetric=symmetric, queue=queue)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  tolerance = dict(rtol=2e-4, atol=2e-5)
  assert_trees_close(state_8.params, state_1.params, **tolerance)
  assert_trees_close(state_8.target_params, state_1.target_params, **tolerance)
  assert_trees_close(state_8.batch_stats, state_1.batch_stats, **tolerance)
  assert_trees_close(state_8.target_batch_stats, state_1.target_batch_stats, **tolerance)
  np.testing.assert_allclose(state_8.queue, state_1.queue, **tolerance)
  enqueued = 2 * GLOBAL_BATCH * (2 if symmetric else 1)
  assert int(state_8.queue_ptr) == int(state_1.queue_ptr) == enqueued % queue
  assert int(state_8.step) == 2
  # And it trained: the loss moved, params moved, target is between.
  assert losses_8[0] != losses_8[-1]


def reference_keys(encoder, state, images_k, groups, permutation):
  """Keys by hand: permute the global batch, BN per group, inverse-permute."""
  mean, std = MEAN_STD['cifar10']
  x = augment.normalize(images_k, mean, std)
  x = x if permutation is None else x[permutation]
  variables = {'params': state.target_params, 'batch_stats': state.target_batch_stats}
  keys = jnp.concatenate([
      encoder.apply(variables, chunk, train=True, mutable=['batch_stats'])[0]
      for chunk in jnp.split(x, groups)])
  keys = moco.l2_normalize(keys)
  return keys if permutation is None else keys[jnp.argsort(permutation)]


def test_shuffle_bn_is_real():
  images_q, images_k = batches(1, seed=1)[0]
  encoder, state, step, shard = setup(8, 8, recipe='none')
  initial = jax.device_get(state)
  new_state, _ = step(state, shard(images_q), shard(images_k))
  enqueued = np.asarray(new_state.queue[:GLOBAL_BATCH])
  # The step's permutation: second half of the split of fold_in(rng, step).
  shuffle_rng = jax.random.split(jax.random.fold_in(initial.rng, 0))[1]
  permutation = jax.random.permutation(shuffle_rng, GLOBAL_BATCH)
  assert (shuffle_permutations(initial.rng, 0, GLOBAL_BATCH)[0] == permutation).all()
  # f_k after the momentum update equals f_q at step 0 (it starts as a copy).
  want = reference_keys(encoder, initial, images_k, 8, permutation)
  np.testing.assert_allclose(enqueued, want, rtol=1e-4, atol=1e-5)
  # The check has teeth: without the shuffle the keys differ clearly.
  unshuffled = reference_keys(encoder, initial, images_k, 8, None)
  assert np.abs(unshuffled - want).max() > 1e-2
  # A wrong unshuffle (forgetting the inverse) would also be caught.
  assert np.abs(want[permutation] - want).max() > 1e-2

  # shuffle_bn=False: keys are encoded within each device's own BN group.
  encoder, state, step, shard = setup(8, 8, recipe='none', shuffle_bn=False)
  new_state, _ = step(state, shard(images_q), shard(images_k))
  np.testing.assert_allclose(new_state.queue[:GLOBAL_BATCH], unshuffled,
                             rtol=1e-4, atol=1e-5)


def _demo_loss(q, k, queue, temperature):
  """The demo's contrastive_loss in NumPy (float64): CE of [q·k, q·queue] / T
  against label 0."""
  q, k, queue = (np.asarray(a, np.float64) for a in (q, k, queue))
  logits = np.concatenate([np.sum(q * k, 1, keepdims=True), q @ queue.T], 1)
  logits = logits / temperature
  logits -= logits.max(1, keepdims=True)
  return np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])


def test_symmetric_loss_matches_a_numpy_transcription_of_the_demo():
  """loss = L(q1, k2) + L(q2, k1) against the queue before the step; each
  direction with its own permutation; [k1, k2] enqueued; f_q's BN statistics
  move with x1 then x2, f_k's with x2 then x1 (the demo's call order)."""
  images_1, images_2 = batches(1, seed=2)[0]
  queue_size = 2 * QUEUE
  encoder, state, step, shard = setup(8, 8, recipe='none', symmetric=True,
                                      queue=queue_size)
  initial = jax.device_get(state)
  new_state, metrics = step(state, shard(images_1), shard(images_2))
  perm_12, perm_21 = shuffle_permutations(initial.rng, 0, GLOBAL_BATCH, 2)
  assert (np.asarray(perm_12) != np.asarray(perm_21)).any()
  # At step 0, f_k (after the momentum update) equals f_q.
  q1 = reference_keys(encoder, initial, images_1, 8, None)
  q2 = reference_keys(encoder, initial, images_2, 8, None)
  k2 = reference_keys(encoder, initial, images_2, 8, perm_12)
  k1 = reference_keys(encoder, initial, images_1, 8, perm_21)
  queue = np.asarray(initial.queue)
  want = _demo_loss(q1, k2, queue, 0.2) + _demo_loss(q2, k1, queue, 0.2)
  np.testing.assert_allclose(float(metrics['loss']), want, rtol=1e-5)
  assert abs(want - _demo_loss(q1, k2, queue, 0.2)) > 1  # the sum, not one side

  np.testing.assert_allclose(new_state.queue[:GLOBAL_BATCH], k1, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_state.queue[GLOBAL_BATCH:2 * GLOBAL_BATCH], k2,
                             rtol=1e-4, atol=1e-5)
  assert np.abs(np.asarray(k1) - np.asarray(k2)).max() > 1e-2   # order matters
  np.testing.assert_array_equal(new_state.queue[2 * GLOBAL_BATCH:],
                                queue[2 * GLOBAL_BATCH:])
  assert int(new_state.queue_ptr) == 2 * GLOBAL_BATCH

  # BN running statistics: the 8-group encoder on the whole batch (one device).
  encoder_8 = setup(1, 8)[0]
  mean, std = MEAN_STD['cifar10']
  x1, x2 = (augment.normalize(x, mean, std) for x in (images_1, images_2))

  def stats(batch_stats, *inputs):
    for x in inputs:
      batch_stats = encoder_8.apply(
          {'params': initial.params, 'batch_stats': batch_stats}, x, train=True,
          mutable=['batch_stats'])[1]['batch_stats']
    return batch_stats
  assert_trees_close(new_state.batch_stats, stats(initial.batch_stats, x1, x2),
                     rtol=1e-4, atol=1e-6)
  assert_trees_close(new_state.target_batch_stats,
                     stats(initial.target_batch_stats, x2[perm_12], x1[perm_21]),
                     rtol=1e-4, atol=1e-6)
