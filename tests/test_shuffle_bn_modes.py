"""Shuffle BN by statistics equals shuffle BN by moving the images.

moco.shuffle_bn_mode='statistics' keeps every key image on its device and
sums each shuffled BN group's statistics over devices; 'images' gathers the
images, permutes, encodes and unshuffles the keys (the reference). Two
steps of each must give the same keys (the queue), running statistics and
loss: on 1 and 8 devices, with the asymmetric and the symmetric loss, and
with XLA's and the CPU-friendly conv. The byte count of the collectives
is in the plan (moco_jax/plan.py) and docs/pod_plan.md.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import moco, optim
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.models import Encoder, ProjectionHead, ResNet
from moco_jax.models.batch_norm import GroupedBatchNorm
from moco_jax.state import create_state
from moco_jax.train_step import make_train_step

GLOBAL_BATCH, IMAGE_SIZE, QUEUE, DIM, GROUPS = 32, 16, 128, 8, 8
OPTIM = ml_collections.ConfigDict(dict(name='sgd', base_lr=0.03, momentum=0.9,
                                       weight_decay=1e-4, schedule='constant',
                                       warmup_epochs=0, lr_drop_epochs=()))


def run(num_devices, mode, symmetric, conv_impl, images):
  mesh = Mesh(jax.devices()[:num_devices], ('data',))
  backbone = ResNet(stage_sizes=(1, 1), block='basic', width_multiplier=0.25,
                    cifar_stem=True, bn_groups=GROUPS // num_devices,
                    conv_impl=conv_impl)
  encoder = Encoder(backbone=backbone, head=ProjectionHead('mlp', DIM, 16))
  schedule = optim.learning_rate_schedule(OPTIM, GLOBAL_BATCH, 10, 10)
  optimizer = optim.build_optimizer(OPTIM, schedule)
  moco_config = ml_collections.ConfigDict(dict(
      momentum=0.9, temperature=0.2, shuffle_bn=True, shuffle_bn_mode=mode,
      bn_groups=GROUPS, symmetric=symmetric))
  mean, std = MEAN_STD['cifar10']
  step = make_train_step(mesh, encoder=encoder, optimizer=optimizer, schedule=schedule,
                         moco_config=moco_config,
                         augment_config=dict(recipe='v2', mean=mean, std=std))
  state = create_state(encoder, optimizer, jax.random.PRNGKey(0), IMAGE_SIZE, QUEUE,
                       DIM, GROUPS // num_devices)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  losses = []
  for images_q, images_k in images:
    state, metrics = step(state, shard(images_q), shard(images_k))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def assert_trees_close(a, b, **tolerance):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tolerance), a, b)


@pytest.mark.parametrize('num_devices', [1, 8])
@pytest.mark.parametrize('symmetric', [False, True])
@pytest.mark.parametrize('conv_impl', ['xla', 'fast'])
def test_statistics_shuffle_equals_image_shuffle(num_devices, symmetric, conv_impl):
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (2, 2, GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 3),
                        dtype=np.uint8)
  by_images, losses_images = run(num_devices, 'images', symmetric, conv_impl, images)
  by_stats, losses_stats = run(num_devices, 'statistics', symmetric, conv_impl, images)
  np.testing.assert_allclose(losses_stats, losses_images, rtol=1e-5)
  tolerance = dict(rtol=2e-4, atol=2e-5)
  # The queue holds both steps' keys (rows beyond them are the random init).
  np.testing.assert_allclose(by_stats.queue, by_images.queue, **tolerance)
  assert_trees_close(by_stats.target_batch_stats, by_images.target_batch_stats,
                     **tolerance)
  assert_trees_close(by_stats.batch_stats, by_images.batch_stats, **tolerance)
  assert_trees_close(by_stats.params, by_images.params, **tolerance)
  assert int(by_stats.queue_ptr) == int(by_images.queue_ptr)
  # Teeth: the keys moved away from the queue's random initial rows.
  keys = 2 * GLOBAL_BATCH * (2 if symmetric else 1)
  initial = moco.init_queue(jax.random.split(jax.random.PRNGKey(0), 3)[1], QUEUE, DIM)
  assert np.abs(np.asarray(by_stats.queue[:keys]) - np.asarray(initial[:keys])).max() > 0.1


def test_group_statistics_are_those_of_the_gathered_group():
  """One BN layer on 4 devices: each example normalised with its group's
  mean and variance, computed here in NumPy from the whole batch."""
  devices, local, groups, channels = 4, 6, 3, 5
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, (devices * local, 2, 2, channels)).astype(np.float32)
  group_of = rng.permutation(np.repeat(np.arange(groups), devices * local // groups))
  mesh = Mesh(jax.devices()[:devices], ('data',))
  layer = GroupedBatchNorm()

  def per_device(x, ids):
    variables = layer.init(jax.random.PRNGKey(0), x)
    y, updated = GroupedBatchNorm(shuffled_groups=(ids, groups, 'data')).apply(
        variables, x, mutable=['batch_stats'])
    return y, updated['batch_stats']['mean'][None]

  y, running_mean = jax.jit(jax.shard_map(
      per_device, mesh=mesh, in_specs=(P('data'), P('data')),
      out_specs=(P('data'), P('data')), check_vma=False))(x, jnp.asarray(group_of, jnp.int32))
  want = np.empty_like(x)
  means = []
  for g in range(groups):
    rows = x[group_of == g]
    mean, var = rows.mean(axis=(0, 1, 2)), rows.var(axis=(0, 1, 2))
    want[group_of == g] = (rows - mean) / np.sqrt(var + 1e-5)
    means.append(mean)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  # Running mean: 0.9 * 0 + 0.1 * (mean over the groups), the same on every device.
  for device_mean in np.asarray(running_mean):
    np.testing.assert_allclose(device_mean, 0.1 * np.mean(means, axis=0), rtol=1e-5)
