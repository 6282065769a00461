"""One MoCo training step, written per device and mapped over a 'data' mesh.

Per device: colour-augment both views (per-example rngs drawn from the global
example index, so the result does not depend on the device count), encode
queries with f_q, momentum-update f_k, encode shuffled keys with f_k (shuffle
BN), InfoNCE against the queue, average gradients over devices, optax update,
enqueue the gathered keys. With one device and `moco.bn_splits = S` the
same shuffle runs across S BatchNorm groups, reproducing S devices exactly.
No TensorFlow here: this runs on accelerator machines.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import augment, moco
from moco_jax.runtime.mesh import AXIS
from moco_jax.state import MoCoState


def _example_rngs(rng, view, global_batch, local_batch):
  """This device's slice of (global_batch,) per-example keys for one view."""
  keys = jax.random.split(jax.random.fold_in(rng, view), global_batch)
  start = jax.lax.axis_index(AXIS) * local_batch
  return jax.lax.dynamic_slice_in_dim(keys, start, local_batch, axis=0)


def per_device_step(state: MoCoState, images_q, images_k, *, encoder, optimizer,
                    schedule, moco_config, augment_config):
  """One step on this device's shard.

  Args:
    state: replicated MoCoState.
    images_q, images_k: (N, H, W, 3) uint8 host-cropped views of this
      device's N images (the same images, independently cropped).
    encoder: models.Encoder (its bn_splits already set).
    optimizer, schedule: optax transformation and step -> lr.
    moco_config: the `moco` config section (momentum, temperature, shuffle_bn).
    augment_config: dict(recipe, mean, std) for augment.augment_batch.

  Returns:
    (new state, metrics dict of float32 scalars, identical on all devices).
  """
  local_batch = images_q.shape[0]
  global_batch = local_batch * jax.lax.axis_size(AXIS)
  step_rng = jax.random.fold_in(state.rng, state.step)
  augment_rng, shuffle_rng = jax.random.split(step_rng)

  x_q, x_k = (augment.augment_batch(
      images, _example_rngs(augment_rng, view, global_batch, local_batch),
      view=view, **augment_config) for view, images in ((0, images_q), (1, images_k)))

  # Key encoder: EMA of the query encoder *before* this step's update.
  target_params = moco.momentum_update(state.target_params, state.params,
                                       moco_config.momentum)
  permutation = jax.random.permutation(shuffle_rng, global_batch)
  if moco_config.shuffle_bn:
    x_k = moco.shuffle_batch(x_k, permutation, AXIS)
  k, target_vars = encoder.apply(
      {'params': target_params, 'batch_stats': state.target_batch_stats},
      x_k, train=True, mutable=['batch_stats'])
  k = moco.l2_normalize(k)
  if moco_config.shuffle_bn:
    k = moco.unshuffle_batch(k, permutation, AXIS)
  k = jax.lax.stop_gradient(k)

  def loss_fn(params):
    q, query_vars = encoder.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x_q, train=True,
        mutable=['batch_stats'])
    logits = moco.contrastive_logits(moco.l2_normalize(q), k, state.queue,
                                     moco_config.temperature)
    return moco.infonce_loss(logits), (logits, query_vars['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  queue, queue_ptr = moco.enqueue(
      state.queue, state.queue_ptr, jax.lax.all_gather(k, AXIS, tiled=True))
  # BN normalises per device; only the running averages are averaged, so the
  # replicated state holds their mean over devices (as SplitBatchNorm does).
  new_state = state.replace(
      params=params,
      batch_stats=jax.lax.pmean(batch_stats, AXIS),
      target_params=target_params,
      target_batch_stats=jax.lax.pmean(target_vars['batch_stats'], AXIS),
      queue=queue, queue_ptr=queue_ptr, opt_state=opt_state,
      step=state.step + 1)
  metrics = jax.lax.pmean({
      'loss': loss,
      'top1': moco.positive_rank_accuracy(logits, 1),
      'top5': moco.positive_rank_accuracy(logits, 5),
  }, AXIS)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
  metrics['queue_ptr'] = queue_ptr
  return new_state, metrics


def make_train_step(mesh: Mesh, **step_kwargs):
  """Jitted step(state, images_q, images_k) -> (state, metrics).

  The state is replicated and donated; the image batches are global arrays
  sharded over the mesh's 'data' axis. `step_kwargs` are per_device_step's
  keyword arguments.
  """
  mapped = jax.shard_map(
      functools.partial(per_device_step, **step_kwargs), mesh=mesh,
      in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()),
      check_vma=False)
  replicated = NamedSharding(mesh, P())
  return jax.jit(mapped, donate_argnums=(0,), out_shardings=(replicated, replicated))
