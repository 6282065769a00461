"""bfloat16 compute: float32 params, BN statistics, logits and loss; close to float32."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import optim
from moco_jax.models import Encoder, ProjectionHead, ResNet
from moco_jax.state import create_state
from moco_jax.train_step import make_train_step
from moco_jax.augment.normalization import MEAN_STD

BATCH, IMAGE_SIZE, QUEUE, DIM = 16, 16, 64, 8
OPTIM = ml_collections.ConfigDict(dict(name='sgd', base_lr=0.03, momentum=0.9,
                                       weight_decay=1e-4, schedule='constant',
                                       warmup_epochs=0, lr_drop_epochs=()))
MOCO = ml_collections.ConfigDict(dict(momentum=0.9, temperature=0.2,
                                      shuffle_bn=True))


def encoder_for(dtype):
  backbone = ResNet(stage_sizes=(1, 1), block='basic', width_multiplier=0.25,
                    cifar_stem=True, bn_groups=2, dtype=dtype, conv_impl='xla')
  return Encoder(backbone=backbone,
                 head=ProjectionHead('mlp', DIM, 16, dtype=dtype))


def one_step(dtype):
  """(initial state, state after one step, metrics) with compute `dtype`."""
  mesh = Mesh(jax.devices()[:1], ('data',))
  encoder = encoder_for(dtype)
  schedule = optim.learning_rate_schedule(OPTIM, BATCH, 10, 10)
  optimizer = optim.build_optimizer(OPTIM, schedule)
  mean, std = MEAN_STD['cifar10']
  step = make_train_step(mesh, encoder=encoder, optimizer=optimizer,
                         schedule=schedule, moco_config=MOCO,
                         augment_config=dict(recipe='none', mean=mean, std=std))
  state = create_state(encoder, optimizer, jax.random.PRNGKey(0), IMAGE_SIZE,
                       QUEUE, DIM, bn_groups=2)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  initial = jax.device_get(state)
  images = np.random.default_rng(0).integers(
      0, 256, (2, BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P('data')))
  new_state, metrics = step(state, shard(images[0]), shard(images[1]))
  return initial, jax.device_get(new_state), jax.device_get(metrics)


def float_dtypes(tree):
  """The dtypes of a tree's floating-point leaves (optax counts are int32)."""
  return {x.dtype for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


def test_bfloat16_step_keeps_float32_state_and_matches_float32():
  initial, bf16, metrics_bf16 = one_step(jnp.bfloat16)
  _, fp32, metrics_fp32 = one_step(jnp.float32)

  # It really computes in bf16: the encoder's activations are bfloat16.
  x = jnp.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3))
  variables = {'params': initial.params, 'batch_stats': initial.batch_stats}
  features = encoder_for(jnp.bfloat16).apply(
      variables, x, train=False, method=Encoder.features,
      capture_intermediates=True, mutable=['intermediates'])[1]
  conv_out = features['intermediates']['backbone']['conv1']['__call__'][0]
  assert conv_out.dtype == jnp.bfloat16

  # Params, target params, optimiser state, BN statistics and queue: float32.
  for tree in (bf16.params, bf16.target_params, bf16.opt_state,
               bf16.batch_stats, bf16.target_batch_stats, bf16.queue):
    assert float_dtypes(tree) == {jnp.dtype(jnp.float32)}
  # Logit-derived metrics and the loss: float32.
  for name in ('loss', 'instance_top1', 'instance_top5', 'grad_norm'):
    assert metrics_bf16[name].dtype == jnp.float32, name

  # bf16 vs float32 from the same initial state: the same step, to bf16 precision.
  loss_bf16, loss_fp32 = float(metrics_bf16['loss']), float(metrics_fp32['loss'])
  assert np.isfinite(loss_bf16)
  np.testing.assert_allclose(loss_bf16, loss_fp32, rtol=2e-2)
  np.testing.assert_allclose(metrics_bf16['grad_norm'], metrics_fp32['grad_norm'],
                             rtol=0.1)
  # Updated params: compare the updates (new - initial), relative to their
  # size. bf16's 8-bit mantissa leaves ~10% noise in the early layers'
  # gradients (the head's are within 1%); over the whole tree ~2%.
  squared_error = squared_norm = 0.0
  for (path, new_b), new_f, old in zip(
      jax.tree_util.tree_leaves_with_path(bf16.params),
      jax.tree.leaves(fp32.params), jax.tree.leaves(initial.params)):
    error, norm = np.linalg.norm(new_b - new_f), np.linalg.norm(new_f - old)
    assert error < 0.3 * norm, (jax.tree_util.keystr(path), error / norm)
    squared_error, squared_norm = squared_error + error**2, squared_norm + norm**2
  assert np.sqrt(squared_error / squared_norm) < 0.05
  # BN running statistics follow the same batches.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=5e-2, atol=5e-3),
               bf16.batch_stats, fp32.batch_stats)
  np.testing.assert_allclose(bf16.queue, fp32.queue, atol=5e-2)
