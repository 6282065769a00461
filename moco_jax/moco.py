"""MoCo's algorithm as pure functions: logits, loss, EMA, queue, shuffle.

Shapes: N local batch, B global batch, C projection dim, K queue size.
No TensorFlow here: this runs on accelerator machines.
"""
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
  """Fraction of rows whose positive (column 0) is among the top_k logits."""
  # Rank = number of negatives scoring strictly higher than the positive.
  rank = jnp.sum(logits[:, 1:] > logits[:, :1], axis=-1)
  return jnp.mean((rank < top_k).astype(jnp.float32))


def momentum_update(target_params, params, momentum):
  """θ_k ← m·θ_k + (1−m)·θ_q, leaf by leaf (parameters only, not BN stats)."""
  return jax.tree.map(lambda t, p: momentum * t + (1.0 - momentum) * p,
                      target_params, params)


def enqueue(queue, queue_ptr, keys):
  """Writes the global batch of keys at queue_ptr, oldest-first replacement.

  Args:
    queue: (K, C) float32.
    queue_ptr: int32 scalar; K must be a multiple of B so a batch never
      straddles the end.
    keys: (B, C) keys of the whole global batch.

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


def _local_slice(x_global, local_size, axis_name):
  start = jax.lax.axis_index(axis_name) * local_size
  return jax.lax.dynamic_slice_in_dim(x_global, start, local_size, axis=0)
