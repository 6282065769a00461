"""MoCoState: everything a MoCo run needs to continue, as one pytree."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from moco_jax import moco


@flax.struct.dataclass
class MoCoState:
  """The whole training state; replicated on every device.

  Attributes:
    params: query encoder f_q parameters {'backbone', 'head'} (float32).
    batch_stats: f_q BatchNorm running statistics.
    target_params: key encoder f_k parameters, the EMA of `params` (without
      the v3 predictor, which only the query branch has).
    target_batch_stats: f_k's own BN running statistics (never averaged).
    queue: (K, C) float32, L2-normalised keys of past batches (negatives);
      None when K = 0 (MoCo v3: the negatives are the global batch's keys).
    queue_ptr: int32 scalar, row where the next global batch is enqueued;
      None when K = 0.
    opt_state: optax state of the query encoder's optimiser.
    step: int32 scalar, optimiser steps taken.
    rng: raw uint32 PRNG key (2,); each step folds in `step`, so a resumed run
      draws the same numbers as an uninterrupted one.
  """
  params: Any
  batch_stats: Any
  target_params: Any
  target_batch_stats: Any
  queue: jax.Array
  queue_ptr: jax.Array
  opt_state: Any
  step: jax.Array
  rng: jax.Array


def create_state(encoder, optimizer, rng, image_size: int, queue_size: int,
                 dim: int, bn_groups: int = 1) -> MoCoState:
  """A fresh state: f_k an exact copy of f_q, a random normalised queue.

  Args:
    encoder: models.Encoder.
    optimizer: optax transformation for the query encoder.
    rng: raw PRNG key; split into init, queue and the state's own rng.
    image_size: side of the (square) training crops.
    queue_size, dim: K and C of the (K, C) queue; K = 0: no queue (v3).
    bn_groups: the encoder's BN groups per batch (the dummy init batch of
      bn_groups samples must split into them).
  """
  init_rng, queue_rng, state_rng = jax.random.split(rng, 3)
  dummy = jnp.zeros((bn_groups, image_size, image_size, 3), jnp.float32)
  variables = encoder.init(init_rng, dummy, train=True, predict=True)
  # A ViT with BN-free heads has no batch statistics at all.
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  copy = lambda tree: jax.tree.map(jnp.copy, moco.key_encoder_part(tree))
  has_queue = queue_size > 0
  return MoCoState(
      params=params, batch_stats=batch_stats,
      target_params=copy(params), target_batch_stats=copy(batch_stats),
      queue=moco.init_queue(queue_rng, queue_size, dim) if has_queue else None,
      queue_ptr=jnp.zeros((), jnp.int32) if has_queue else None,
      opt_state=optimizer.init(params),
      step=jnp.zeros((), jnp.int32), rng=state_rng)
