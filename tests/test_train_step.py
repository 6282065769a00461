"""The mapped train step: device-count independence and real shuffle BN."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import augment, moco, optim
from moco_jax.models import Encoder, ProjectionHead, ResNet
from moco_jax.state import create_state
from moco_jax.train_step import make_train_step
from moco_jax.config.normalization import MEAN_STD

GLOBAL_BATCH, IMAGE_SIZE, QUEUE, DIM = 32, 16, 64, 8
OPTIM = ml_collections.ConfigDict(dict(name='sgd', base_lr=0.03, momentum=0.9,
                                       weight_decay=1e-4, schedule='constant',
                                       warmup_epochs=0, lr_drop_epochs=()))


def setup(num_devices, bn_splits, recipe='v2', shuffle_bn=True):
  mesh = Mesh(jax.devices()[:num_devices], ('data',))
  # A two-stage ResNet keeps compile time low; the step is architecture-agnostic.
  backbone = ResNet(stage_sizes=(1, 1), block='basic', width_multiplier=0.25,
                    cifar_stem=True, bn_splits=bn_splits, conv_impl='xla')
  encoder = Encoder(backbone=backbone, head=ProjectionHead('mlp', DIM, 16))
  schedule = optim.learning_rate_schedule(OPTIM, GLOBAL_BATCH, 10, 10)
  optimizer = optim.build_optimizer(OPTIM, schedule)
  moco_config = ml_collections.ConfigDict(dict(momentum=0.9, temperature=0.2,
                                               shuffle_bn=shuffle_bn))
  mean, std = MEAN_STD['cifar10']
  step = make_train_step(mesh, encoder=encoder, optimizer=optimizer, schedule=schedule,
                         moco_config=moco_config,
                         augment_config=dict(recipe=recipe, mean=mean, std=std))
  state = create_state(encoder, optimizer, jax.random.PRNGKey(0), IMAGE_SIZE, QUEUE,
                       DIM, bn_splits)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  return encoder, state, step, shard


def batches(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  shape = (num_steps, 2, GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3)
  return rng.integers(0, 256, shape, dtype=np.uint8)


def run(num_devices, bn_splits, images, **kwargs):
  _, state, step, shard = setup(num_devices, bn_splits, **kwargs)
  losses = []
  for images_q, images_k in images:
    state, metrics = step(state, shard(images_q), shard(images_k))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


def test_eight_devices_equal_one_device_with_eight_bn_splits():
  images = batches(2)
  state_8, losses_8 = run(8, 1, images)
  state_1, losses_1 = run(1, 8, images)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  tolerance = dict(rtol=2e-4, atol=2e-5)
  assert_trees_close(state_8.params, state_1.params, **tolerance)
  assert_trees_close(state_8.target_params, state_1.target_params, **tolerance)
  assert_trees_close(state_8.batch_stats, state_1.batch_stats, **tolerance)
  assert_trees_close(state_8.target_batch_stats, state_1.target_batch_stats, **tolerance)
  np.testing.assert_allclose(state_8.queue, state_1.queue, **tolerance)
  assert int(state_8.queue_ptr) == int(state_1.queue_ptr) == (2 * GLOBAL_BATCH) % QUEUE
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
  encoder, state, step, shard = setup(8, 1, recipe='none')
  initial = jax.device_get(state)
  new_state, _ = step(state, shard(images_q), shard(images_k))
  enqueued = np.asarray(new_state.queue[:GLOBAL_BATCH])
  # The step's permutation: second half of the split of fold_in(rng, step).
  shuffle_rng = jax.random.split(jax.random.fold_in(initial.rng, 0))[1]
  permutation = jax.random.permutation(shuffle_rng, GLOBAL_BATCH)
  # f_k after the momentum update equals f_q at step 0 (it starts as a copy).
  want = reference_keys(encoder, initial, images_k, 8, permutation)
  np.testing.assert_allclose(enqueued, want, rtol=1e-4, atol=1e-5)
  # The check has teeth: without the shuffle the keys differ clearly.
  unshuffled = reference_keys(encoder, initial, images_k, 8, None)
  assert np.abs(unshuffled - want).max() > 1e-2
  # A wrong unshuffle (forgetting the inverse) would also be caught.
  assert np.abs(want[permutation] - want).max() > 1e-2

  # shuffle_bn=False: keys are encoded within each device's own BN group.
  encoder, state, step, shard = setup(8, 1, recipe='none', shuffle_bn=False)
  new_state, _ = step(state, shard(images_q), shard(images_k))
  np.testing.assert_allclose(new_state.queue[:GLOBAL_BATCH], unshuffled,
                             rtol=1e-4, atol=1e-5)
