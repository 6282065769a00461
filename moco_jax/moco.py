"""MoCo's algorithm as pure functions: logits, loss, EMA, queue, shuffle.

Shapes: N local batch, B global batch, C projection dim, K queue size.
No TensorFlow here: this runs on accelerator machines.
"""
import math

import jax
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(‖x‖, eps) along `axis` (torch.nn.functional.normalize), float32."""
  x = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def contrastive_logits(q, k, queue, temperature):
  """InfoNCE logits with the positive at column 0.

  Args:
    q: (N, C) normalised queries.
    k: (N, C) normalised positive keys (same images, other view).
    queue: (K, C) normalised negatives, as they were before this step's
      enqueue.
    temperature: T > 0.

  Returns:
    (N, 1 + K) float32 logits [q·k⁺, q·queue] / T.
  """
  q = q.astype(jnp.float32)
  l_pos = jnp.sum(q * k.astype(jnp.float32), axis=-1, keepdims=True)
  l_neg = q @ queue.astype(jnp.float32).T
  return jnp.concatenate([l_pos, l_neg], axis=1) / temperature


def infonce_loss(logits):
  """Mean cross-entropy of (N, 1+K) logits against label 0 (scalar)."""
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])


def positive_rank_accuracy(logits, top_k):
  """Fraction of rows whose positive (column 0) is among the top_k logits.

  A negative scoring exactly as high as the positive counts against it: a
  collapsed encoder (every logit equal) scores 0, not 1.
  """
  rank = jnp.sum(logits[:, 1:] >= logits[:, :1], axis=-1)
  return jnp.mean((rank < top_k).astype(jnp.float32))


def feature_std(features, axis_name=None):
  """Collapse indicator: per-dimension std over the batch of the L2-normalised
  features, averaged over dimensions (SimSiam, arXiv:2011.10566, sec. 4.1).

  About 1/sqrt(C) for well-spread features, near 0 when every image maps to
  the same point.

  Args:
    features: (N, C) features of this device's examples (any float dtype).
    axis_name: mapped device axis; the std is then over the global batch.

  Returns:
    float32 scalar.
  """
  x = l2_normalize(features)
  mean = jnp.mean(x, axis=0)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  variance = jnp.mean(jnp.square(x - mean), axis=0)
  if axis_name is not None:
    variance = jax.lax.pmean(variance, axis_name)
  return jnp.mean(jnp.sqrt(variance))


def loss_directions(symmetric: bool):
  """(query view, key view) pairs of the loss over views (x1, x2) = (0, 1).

  Asymmetric (v1/v2): L(q1, k2). Symmetric (the CIFAR demo's --symmetric,
  and v3): L(q1, k2) + L(q2, k1), a sum, in that order.
  """
  return ((0, 1), (1, 0)) if symmetric else ((0, 1),)


MOMENTUM_SCHEDULES = ('constant', 'cosine')


def momentum_at(step, total_steps: int, base_momentum: float,
                schedule: str = 'constant'):
  """The key encoder's momentum m at optimiser step `step` (0-based).

  'constant': m₀ (v1/v2), returned as given. 'cosine' (MoCo v3, per
  iteration): m = 1 − ½(1 + cos(π·t/T))(1 − m₀), from m₀ at t = 0 to 1 at
  t = T = total_steps; float32 scalar.
  """
  if schedule == 'constant':
    return base_momentum
  if schedule != 'cosine':
    raise ValueError(f'unknown moco.momentum_schedule {schedule!r}; valid: '
                     f'{", ".join(MOMENTUM_SCHEDULES)}')
  if total_steps <= 0:
    raise ValueError(f'moco.momentum_schedule=cosine needs the run length; got '
                     f'total_steps={total_steps}')
  t = jnp.asarray(step, jnp.float32) / total_steps
  return 1.0 - 0.5 * (1.0 + jnp.cos(jnp.pi * t)) * (1.0 - base_momentum)


def batch_logits(q, k, temperature, axis_name=None):
  """MoCo v3's logits: every query against the keys of the global batch.

  Args:
    q: (N, C) normalised queries of this device.
    k: (N, C) normalised keys of this device (the other view).
    temperature: T > 0.
    axis_name: mapped device axis (None: one device, B = N).

  Returns:
    ((N, B) float32 logits q·all_gather(k)ᵀ / T, (N,) int32 labels: the
    global index of each query's own key, arange(N) + N·device_index).
  """
  n = q.shape[0]
  if axis_name is None:
    k_all, offset = k, 0
  else:
    k_all = jax.lax.all_gather(k, axis_name, tiled=True)
    offset = jax.lax.axis_index(axis_name) * n
  logits = q.astype(jnp.float32) @ k_all.astype(jnp.float32).T / temperature
  return logits, jnp.arange(n, dtype=jnp.int32) + offset


def batch_contrastive_loss(logits, labels, temperature):
  """MoCo v3's ctr(q, k): mean cross-entropy of (N, B) logits against
  `labels`, × 2T (scalar float32)."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=1)[:, 0]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked) * (2 * temperature)


def chance_loss(queue_size: int, global_batch: int, temperature: float,
                symmetric: bool) -> float:
  """The loss when the features carry no information (every logit of a row
  equal): a uniform guess among the candidates, ln(candidates), × the loss's
  scale, summed over the loss directions (loss_directions).

  v1/v2 (infonce_loss, K = queue_size > 0): ln(K + 1) per direction, scale 1.
  v3 (batch_contrastive_loss, K = 0): ln(B) per direction, scale 2T, the
  negatives being the global batch's B keys.

  Returns:
    float, in the units of the logged `loss`.
  """
  if queue_size > 0:
    candidates, scale = queue_size + 1, 1.0
  else:
    candidates, scale = global_batch, 2.0 * temperature
  return len(loss_directions(symmetric)) * scale * math.log(candidates)


def positive_first(logits, labels):
  """(N, B) logits with positives at `labels` -> (N, 1 + B) with the positive
  in column 0 and its old slot at −inf (what positive_rank_accuracy reads)."""
  picked = jnp.take_along_axis(logits, labels[:, None], axis=1)
  others = jnp.where(jnp.arange(logits.shape[1]) == labels[:, None], -jnp.inf,
                     logits)
  return jnp.concatenate([picked, others], axis=1)


def key_encoder_part(tree):
  """The query encoder's {'backbone', 'head', 'predictor'} variables without
  the predictor: what f_k has and the EMA covers (MoCo v3). Trees without a
  predictor are returned as they are."""
  if isinstance(tree, dict) and 'predictor' in tree:
    return {name: sub for name, sub in tree.items() if name != 'predictor'}
  return tree


def momentum_update(target_params, params, momentum):
  """θ_k ← m·θ_k + (1−m)·θ_q, leaf by leaf (parameters only, not BN stats)."""
  return jax.tree.map(lambda t, p: momentum * t + (1.0 - momentum) * p,
                      target_params, params)


def enqueue(queue, queue_ptr, keys):
  """Writes the global batch of keys at queue_ptr, oldest-first replacement.

  Args:
    queue: (K, C) float32.
    queue_ptr: int32 scalar; K must be a multiple of the keys' B so a batch
      never straddles the end.
    keys: (B, C) keys of the whole global batch ((2B, C) [k1, k2] with the
      symmetric loss).

  Returns:
    (new queue, (queue_ptr + B) % K).
  """
  queue_size, batch = queue.shape[0], keys.shape[0]
  if queue_size % batch:
    raise ValueError(f'queue_size {queue_size} is not a multiple of the '
                     f'global batch {batch}')
  queue = jax.lax.dynamic_update_slice(
      queue, keys.astype(queue.dtype), (queue_ptr, jnp.int32(0)))
  return queue, (queue_ptr + batch) % queue_size


def init_queue(rng, queue_size, dim):
  """(K, C) random-normal keys, each L2-normalised (as the reference)."""
  return l2_normalize(jax.random.normal(rng, (queue_size, dim), jnp.float32))


def shuffle_batch(x_local, permutation, axis_name):
  """Shuffle BN's first half: this device's slice of the permuted global batch.

  Args:
    x_local: (N, ...) this device's examples; device d holds global rows
      [d·N, (d+1)·N).
    permutation: (B,) the same permutation of the global batch on every
      device.
    axis_name: the mapped device axis.

  Returns:
    (N, ...) rows permutation[d·N:(d+1)·N] of the gathered global batch.
  """
  x_global = jax.lax.all_gather(x_local, axis_name, tiled=True)
  return _local_slice(x_global[permutation], x_local.shape[0], axis_name)


def unshuffle_batch(y_local, permutation, axis_name):
  """Inverse of shuffle_batch: gives each device back its own examples' rows."""
  y_global = jax.lax.all_gather(y_local, axis_name, tiled=True)
  inverse = jnp.argsort(permutation)
  return _local_slice(y_global[inverse], y_local.shape[0], axis_name)


SHUFFLE_BN_MODES = ('statistics', 'images')


def shuffled_bn_groups(permutation, num_groups: int, axis_name):
  """Shuffle BN by statistics: the BN group of each of this device's examples.

  Moving the images (shuffle_batch) puts global example permutation[j] in
  BN group j // (B / G); the key encoder only needs each group's forward
  statistics, so every device keeps its own examples and normalises each
  with the statistics of that group (models.batch_norm.GroupedBatchNorm's
  shuffled_groups), summed over `axis_name`: G × C numbers per BN layer
  cross devices instead of the B images, and no unshuffle of the keys.

  Args:
    permutation: (B,) the step's permutation of the global batch (as for
      shuffle_batch).
    num_groups: G, BN groups in the global batch (moco.bn_groups).
    axis_name: the mapped device axis.

  Returns:
    (N,) int32 group of example d·N + n for n < N on device d.
  """
  batch = permutation.shape[0]
  position = jnp.argsort(permutation)   # where each example lands
  local = batch // jax.lax.axis_size(axis_name)
  group = (position // (batch // num_groups)).astype(jnp.int32)
  return _local_slice(group, local, axis_name)


def _local_slice(x_global, local_size, axis_name):
  start = jax.lax.axis_index(axis_name) * local_size
  return jax.lax.dynamic_slice_in_dim(x_global, start, local_size, axis=0)
