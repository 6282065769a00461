"""moco.py against a NumPy transcription of the paper's pseudocode."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from moco_jax import moco


def normalized(rng, shape):
  x = rng.normal(size=shape)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def numpy_moco_loss(q, k, queue, t):
  """Algorithm 1 of arXiv:1911.05722, in NumPy (float64)."""
  n, c = q.shape
  l_pos = np.einsum('nc,nc->n', q, k)[:, None]          # bmm(q.view(N,1,C), k.view(N,C,1))
  l_neg = q @ queue.T                                   # mm(q.view(N,C), queue.view(C,K))
  logits = np.concatenate([l_pos, l_neg], axis=1) / t
  labels = np.zeros(n, dtype=int)                       # positives are the 0-th
  log_softmax = logits - logits.max(1, keepdims=True)
  log_softmax -= np.log(np.exp(log_softmax).sum(1, keepdims=True))
  return logits, -log_softmax[np.arange(n), labels].mean()


def test_logits_and_loss_match_numpy_pseudocode():
  rng = np.random.default_rng(0)
  q, k, queue = normalized(rng, (6, 16)), normalized(rng, (6, 16)), normalized(rng, (32, 16))
  want_logits, want_loss = numpy_moco_loss(q, k, queue, 0.07)
  logits = moco.contrastive_logits(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                                   jnp.asarray(queue, jnp.float32), 0.07)
  assert logits.dtype == jnp.float32 and logits.shape == (6, 33)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(moco.infonce_loss(logits), want_loss, rtol=1e-5)


def test_positive_is_column_zero():
  rng = np.random.default_rng(1)
  q, queue = normalized(rng, (4, 8)), normalized(rng, (16, 8))
  logits = moco.contrastive_logits(q, q, queue, 0.2)          # k = q: q·k = 1
  np.testing.assert_allclose(logits[:, 0], 1 / 0.2, rtol=1e-6)
  # Loss is the cross-entropy of column 0: swapping in a negative raises it.
  swapped = logits.at[:, 0].set(logits[:, 1]).at[:, 1].set(logits[:, 0])
  assert moco.infonce_loss(swapped) > moco.infonce_loss(logits)


def test_loss_at_chance_is_log_k_plus_1():
  q = jnp.ones((3, 4)) / 2.0
  queue = jnp.tile(q[:1], (4095, 1))
  logits = moco.contrastive_logits(q, q, queue, 0.1)          # all logits equal
  np.testing.assert_allclose(moco.infonce_loss(logits), np.log(4096), rtol=1e-6)


def test_positive_rank_accuracy_matches_numpy_ranks():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(50, 20)).astype(np.float32)
  rank = (-logits).argsort(1).argsort(1)[:, 0]               # 0 = positive ranked first
  for top_k in (1, 5):
    np.testing.assert_allclose(moco.positive_rank_accuracy(jnp.asarray(logits), top_k),
                               np.mean(rank < top_k), rtol=1e-6)


def test_l2_normalize():
  x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(moco.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_momentum_update_is_ema_of_every_leaf():
  target = {'a': np.full((2, 3), 1.0, np.float32), 'b': {'c': np.float32(4.0)}}
  online = {'a': np.full((2, 3), 3.0, np.float32), 'b': {'c': np.float32(0.0)}}
  out = moco.momentum_update(target, online, 0.9)
  np.testing.assert_allclose(out['a'], 0.9 * 1 + 0.1 * 3, rtol=1e-6)
  np.testing.assert_allclose(out['b']['c'], 0.9 * 4, rtol=1e-6)
  same = moco.momentum_update(online, online, 0.999)
  np.testing.assert_allclose(same['a'], online['a'], rtol=1e-6)


def test_enqueue_replaces_oldest_and_wraps_around():
  queue = jnp.zeros((8, 2))
  ptr = jnp.int32(0)
  enqueue = jax.jit(moco.enqueue)
  reference, reference_ptr = np.zeros((8, 2)), 0
  for step in range(5):                                       # 5 × 4 rows: wraps twice
    keys = np.full((4, 2), step + 1.0, np.float32)
    queue, ptr = enqueue(queue, ptr, keys)
    reference[reference_ptr:reference_ptr + 4] = keys
    reference_ptr = (reference_ptr + 4) % 8
    np.testing.assert_array_equal(queue, reference)
    assert int(ptr) == reference_ptr
  np.testing.assert_array_equal(queue[:4], 5.0)               # newest batch
  np.testing.assert_array_equal(queue[4:], 4.0)


def test_enqueue_refuses_batch_that_does_not_divide_queue():
  with pytest.raises(ValueError, match='queue_size 10 is not a multiple'):
    moco.enqueue(jnp.zeros((10, 2)), jnp.int32(0), jnp.zeros((4, 2)))


def test_init_queue_rows_are_unit_vectors():
  queue = moco.init_queue(jax.random.PRNGKey(0), 64, 8)
  np.testing.assert_allclose(np.linalg.norm(queue, axis=1), 1.0, rtol=1e-5)


def test_shuffle_and_unshuffle_across_devices():
  devices = jax.devices()
  assert len(devices) == 8, 'tests run with 8 fake CPU devices (conftest)'
  mesh = Mesh(devices, ('data',))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  perm = np.random.default_rng(3).permutation(16)

  def shard(fn):
    return jax.jit(jax.shard_map(functools.partial(fn, permutation=perm, axis_name='data'),
                                 mesh=mesh, in_specs=P('data'), out_specs=P('data'),
                                 check_vma=False))
  shuffled = shard(moco.shuffle_batch)(x)
  np.testing.assert_array_equal(shuffled, x[perm])            # device d gets perm[d·N:(d+1)·N]
  np.testing.assert_array_equal(shard(moco.unshuffle_batch)(shuffled), x)
