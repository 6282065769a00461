"""One MoCo training step, written per device and mapped over a 'data' mesh.

Per device: colour-augment both views (per-example rngs drawn from the global
example index, so the result does not depend on the device count), encode
queries with f_q, momentum-update f_k, encode shuffled keys with f_k (shuffle
BN), InfoNCE against the queue, average gradients over devices, optax update,
enqueue the gathered keys. The encoder normalises moco.bn_groups / devices
BN groups per device, so one device with 8 groups reproduces 8 devices
exactly. `moco.symmetric` adds the reverse direction (the CIFAR demo's
--symmetric): L(q1, k2) + L(q2, k1), each with its own shuffle.
MoCo v3 is the same step with options: no queue (moco.queue_size = 0, the
negatives are the global batch's keys, loss × 2T), the query encoder's
predictor, a cosine momentum schedule, SyncBN in the heads.
No TensorFlow here: this runs on accelerator machines.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moco_jax import moco
from moco_jax.augment import colour as augment
from moco_jax.augment.views import device_views
from moco_jax.runtime.mesh import AXIS, device_rows, sharded_jit
from moco_jax.state import MoCoState


def _example_rngs(rng, view, global_batch, local_batch):
  """This device's slice of (global_batch,) per-example keys for one view."""
  return device_rows(jax.random.split(jax.random.fold_in(rng, view), global_batch),
                     local_batch)


def step_rngs(rng, step):
  """(augment_rng, shuffle_rng) of one step: split(fold_in(state.rng, step))."""
  augment_rng, shuffle_rng = jax.random.split(jax.random.fold_in(rng, step))
  return augment_rng, shuffle_rng


def shuffle_permutations(rng, step, global_batch: int, count: int = 1):
  """The step's shuffle-BN permutations of the global batch, one per loss
  direction: the first from shuffle_rng itself, direction d > 0 from
  fold_in(shuffle_rng, d). Tests and the PyTorch parity check re-derive them.

  Args:
    rng: the state's rng (state.rng); step: the state's step before this one.
    global_batch: B; count: loss directions (2 with moco.symmetric).

  Returns:
    A list of `count` (B,) int32 permutations.
  """
  shuffle_rng = step_rngs(rng, step)[1]
  return [jax.random.permutation(
      shuffle_rng if d == 0 else jax.random.fold_in(shuffle_rng, d), global_batch)
          for d in range(count)]


def _encode_keys(encoder, target_params, target_batch_stats, x_k, permutation,
                 shuffle_bn, shuffle_bn_mode='statistics'):
  """k = normalize(f_k(x_k)), through shuffle BN when on; no gradient.

  shuffle_bn_mode 'statistics' keeps the images in place and normalises each
  with its shuffled BN group's statistics (moco.shuffled_bn_groups); 'images'
  moves the images as the reference does (all_gather, permute, unshuffle).
  Both give the same keys and running statistics (tests/test_shuffle_bn_modes.py).

  Returns (N, C) keys in x_k's order and f_k's updated BN statistics.
  """
  by_statistics = shuffle_bn and shuffle_bn_mode == 'statistics'
  by_images = shuffle_bn and not by_statistics
  extra = {}
  if by_statistics:
    # moco.bn_groups: the encoder's groups per device times the devices.
    bn_groups = encoder.backbone.bn_groups * jax.lax.axis_size(AXIS)
    extra['shuffled_groups'] = (
        moco.shuffled_bn_groups(permutation, bn_groups, AXIS), bn_groups, AXIS)
  if by_images:
    x_k = moco.shuffle_batch(x_k, permutation, AXIS)
  k, variables = encoder.apply(
      {'params': target_params, 'batch_stats': target_batch_stats},
      x_k, train=True, mutable=['batch_stats'], **extra)
  k = moco.l2_normalize(k)
  if by_images:
    k = moco.unshuffle_batch(k, permutation, AXIS)
  return jax.lax.stop_gradient(k), variables['batch_stats']


def per_device_step(state: MoCoState, images_q, images_k, *, encoder, optimizer,
                    schedule, moco_config, augment_config, total_steps: int = 0):
  """One step on this device's shard.

  Args:
    state: replicated MoCoState.
    images_q, images_k: (N, H, W, 3) uint8 host-cropped views of this
      device's N images (the same images, independently cropped): x1 and x2.
    encoder: models.Encoder (its per-device bn_groups already set).
    optimizer, schedule: optax transformation and step -> lr.
    moco_config: the `moco` config section (momentum, temperature, shuffle_bn,
      shuffle_bn_mode, bn_groups, symmetric).
    augment_config: dict(recipe, mean, std) for augment.augment_batch.
    total_steps: steps of the whole run (moco.momentum_schedule='cosine').

  Returns:
    (new state, metrics dict of float32 scalars, identical on all devices).
    With moco.symmetric, `loss` is the sum of both directions (as the demo)
    and instance_top1/instance_top5 count the rows of both. Accuracies are
    percentages (0-100), as every *_top1/*_top5 in metrics.jsonl.
  """
  local_batch = images_q.shape[0]
  global_batch = local_batch * jax.lax.axis_size(AXIS)
  augment_rng = step_rngs(state.rng, state.step)[0]
  views = [augment.augment_batch(
      images, _example_rngs(augment_rng, view, global_batch, local_batch),
      view=view, **augment_config) for view, images in ((0, images_q), (1, images_k))]
  directions = moco.loss_directions(moco_config.get('symmetric', False))
  permutations = shuffle_permutations(state.rng, state.step, global_batch,
                                      len(directions))

  # Key encoder: EMA of the query encoder *before* this step's update. Its BN
  # statistics move once per direction, in the directions' order.
  # The EMA covers f_k's parameters only: no BN statistics, no predictor.
  momentum = moco.momentum_at(state.step, total_steps, moco_config.momentum,
                              moco_config.get('momentum_schedule', 'constant'))
  target_params = moco.momentum_update(
      state.target_params, moco.key_encoder_part(state.params), momentum)
  batch_negatives = state.queue is None   # v3: the global batch's keys
  if batch_negatives and moco_config.shuffle_bn:
    raise ValueError('moco.queue_size=0 (MoCo v3) runs without shuffle BN; '
                     'set moco.shuffle_bn=False')
  key_order = range(len(directions))
  if batch_negatives:   # v3 encodes k1 then k2 (the reference's order)
    key_order = sorted(key_order, key=lambda d: directions[d][1])
  keys, target_batch_stats = [None] * len(directions), state.target_batch_stats
  for d in key_order:
    keys[d], target_batch_stats = _encode_keys(
        encoder, target_params, target_batch_stats, views[directions[d][1]],
        permutations[d], moco_config.shuffle_bn,
        moco_config.get('shuffle_bn_mode', 'statistics'))

  def loss_fn(params):
    loss, all_logits, queries, batch_stats = 0.0, [], [], state.batch_stats
    for (query_view, _), k in zip(directions, keys):
      q, query_vars = encoder.apply(
          {'params': params, 'batch_stats': batch_stats}, views[query_view],
          train=True, predict=True, mutable=['batch_stats'])
      batch_stats = query_vars['batch_stats']
      if batch_negatives:
        # v3's ctr(q, k): the global batch's keys, own key's index as label.
        logits, labels = moco.batch_logits(moco.l2_normalize(q), k,
                                           moco_config.temperature, AXIS)
        loss += moco.batch_contrastive_loss(logits, labels,
                                            moco_config.temperature)
        logits = moco.positive_first(logits, labels)
      else:
        # Every direction against the queue as it was before this step.
        logits = moco.contrastive_logits(moco.l2_normalize(q), k, state.queue,
                                         moco_config.temperature)
        loss += moco.infonce_loss(logits)
      all_logits.append(logits)
      queries.append(q)
    return loss, (jnp.concatenate(all_logits), batch_stats, jnp.concatenate(queries))

  (loss, (logits, batch_stats, queries)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)

  # Keys in view order ([k1, k2] when symmetric), each gathered over devices.
  by_view = [k for _, k in sorted(zip((kv for _, kv in directions), keys),
                                  key=lambda pair: pair[0])]
  queue, queue_ptr = state.queue, state.queue_ptr
  if not batch_negatives:
    queue, queue_ptr = moco.enqueue(queue, queue_ptr, jnp.concatenate(
        [jax.lax.all_gather(k, AXIS, tiled=True) for k in by_view]))
  # BN normalises per device; only the running averages are averaged, so the
  # replicated state holds their mean over devices (as SplitBatchNorm does).
  new_state = state.replace(
      params=params,
      batch_stats=jax.lax.pmean(batch_stats, AXIS),
      target_params=target_params,
      target_batch_stats=jax.lax.pmean(target_batch_stats, AXIS),
      queue=queue, queue_ptr=queue_ptr, opt_state=opt_state,
      step=state.step + 1)
  metrics = jax.lax.pmean({
      'loss': loss,
      'instance_top1': 100 * moco.positive_rank_accuracy(logits, 1),
      'instance_top5': 100 * moco.positive_rank_accuracy(logits, 5),
  }, AXIS)
  # Collapse indicator, ~1/sqrt(C) when healthy (evaluation/collapse.py).
  metrics['feature_std'] = moco.feature_std(queries, AXIS)
  metrics['grad_norm'] = optax.tree.norm(grads)
  metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
  if not batch_negatives:
    metrics['queue_ptr'] = queue_ptr
  else:
    metrics['momentum'] = jnp.asarray(momentum, jnp.float32)
  return new_state, metrics


def make_train_step(mesh: Mesh, *, device_input: bool = False, image_size: int = 0,
                    crop_scale=(), **step_kwargs):
  """The jitted training step; the state is replicated and donated.

  Host input (device_input False): step(state, images_q, images_k) ->
  (state, metrics), the two (B, S, S, 3) uint8 views global arrays sharded
  over the mesh's 'data' axis.

  Device-resident input (data.on_device): step(state, split_images, indices)
  -> (state, metrics). split_images: global (devices · n, H, W, 3) uint8
  sharded over AXIS, each device's block its process's split (data/device.py);
  indices: global (B,) int32 sharded over AXIS, each process's local rows.
  Each device gathers its rows and makes the two views (augment/views.py,
  image_size S, crop_scale RandomResizedCrop's area range) in front of the
  same per_device_step. (Experiment.train_step binds the run's split; the
  plan compiles this function for a split that is not on the machine.)

  `step_kwargs` are per_device_step's keyword arguments.
  """
  replicated = NamedSharding(mesh, P())
  if not device_input:
    return sharded_jit(functools.partial(per_device_step, **step_kwargs), mesh,
                       in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()),
                       donate=(0,), out_shardings=(replicated, replicated))

  def per_device(state, images, indices):
    views_q, views_k = device_views(images, indices, state.rng, state.step,
                                    image_size=image_size, crop_scale=crop_scale)
    return per_device_step(state, views_q, views_k, **step_kwargs)

  return sharded_jit(per_device, mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                     out_specs=(P(), P()), donate=(0,),
                     out_shardings=(replicated, replicated))
