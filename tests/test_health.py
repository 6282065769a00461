"""Honest instruments: ties count against the positive, the collapse
indicator and its warning, the queue-larger-than-the-data warning."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from moco_jax import moco
from moco_jax.config.checks import queue_warning
from moco_jax.evaluation import collapse
from moco_jax.runtime import checkpointing
from moco_jax.runtime.mesh import AXIS, make_mesh
from moco_jax.runtime.metric_writer import read_metrics
from test_train import run_cli


def _rank_accuracy_reference(logits, top_k):
  """Position of the positive when the row is sorted descending and ties are
  broken against the positive (it goes after every equal negative)."""
  hits = []
  for row in logits:
    order = sorted(range(len(row)), key=lambda j: (-row[j], j == 0))
    hits.append(order.index(0) < top_k)
  return float(np.mean(hits))


@pytest.mark.parametrize('top_k', [1, 5])
def test_a_tie_counts_as_a_miss(top_k):
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, (64, 9)).astype(np.float32)  # many exact ties
  logits[0] = 1.0                                           # a collapsed row
  got = float(moco.positive_rank_accuracy(jnp.asarray(logits), top_k))
  assert got == pytest.approx(_rank_accuracy_reference(logits, top_k))
  collapsed = jnp.full((8, 65), 0.3)
  assert float(moco.positive_rank_accuracy(collapsed, top_k)) == 0.0


def test_feature_std_over_devices_equals_numpy():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(32, 16)).astype(np.float32)
  normalised = features / np.linalg.norm(features, axis=1, keepdims=True)
  want = normalised.std(axis=0).mean()                      # over the global batch
  mesh = make_mesh()
  mapped = jax.jit(jax.shard_map(lambda x: moco.feature_std(x, AXIS), mesh=mesh,
                                 in_specs=P(AXIS), out_specs=P(), check_vma=False))
  assert float(mapped(features)) == pytest.approx(want, rel=1e-5)
  assert float(moco.feature_std(features)) == pytest.approx(want, rel=1e-5)
  # Identical rows: 0. Random directions in C dims: about 1/sqrt(C).
  assert float(moco.feature_std(np.tile(features[:1], (32, 1)))) < 1e-6
  spread = rng.normal(size=(4096, 16)).astype(np.float32)
  assert float(moco.feature_std(spread)) == pytest.approx(1 / math.sqrt(16), rel=0.05)


def test_collapse_monitor_warns_once_after_patience():
  chance = moco.chance_loss(64, 16, 0.2, symmetric=False)
  assert chance == pytest.approx(math.log(65))
  monitor = collapse.CollapseMonitor(dim=16, chance=chance, grace_steps=10, causes='x')
  healthy = {'feature_std': 0.2, 'loss': 3.0}
  collapsed = {'feature_std': 0.001, 'loss': 3.0}
  assert monitor.update(1, healthy) is None
  assert [monitor.update(s, collapsed) for s in (2, 3)] == [None, None]
  assert monitor.update(4, healthy) is None                 # the streak is broken
  lines = [monitor.update(s, collapsed) for s in (5, 6, 7, 8, 9)]
  assert lines[:2] == [None, None] and lines[3:] == [None, None]
  assert lines[2].startswith('warning: representation collapse at step 7: feature_std 0.001')
  assert 'lr too high, no warm-up, bfloat16' in lines[2] and '\n' not in lines[2]
  # The loss at chance counts only after the grace steps.
  monitor = collapse.CollapseMonitor(dim=16, chance=chance, grace_steps=10, causes='x')
  at_chance = {'feature_std': 0.2, 'loss': chance * 1.005}
  assert all(monitor.update(s, at_chance) is None for s in range(1, 11))
  assert [monitor.update(s, at_chance) is None for s in (11, 12, 13)] == [True, True, False]


def test_queue_warning_when_k_reaches_the_epoch():
  assert queue_warning(64, 65, 16) is None
  line = queue_warning(64, 64, 16)
  assert 'moco.queue_size=64 is at least the 64 training images' in line
  assert '--config.moco.queue_size=32' in line
  assert queue_warning(4096, 100, 32).endswith(
      '--config.moco.queue_size=32, or more data')
  assert queue_warning(0, 10, 16) is None            # v3: no queue
  # One batch per epoch: no multiple of the batch fits below it.
  assert 'use a smaller train.batch_size or more data' in queue_warning(64, 16, 16)


def test_forced_collapse_is_reported_and_stops_with_exit_3(tiny_data_dir, tmp_path):
  """lr 30 on the smoke config: the features collapse within a few steps."""
  workdir = str(tmp_path / 'run')
  result = run_cli(workdir, tiny_data_dir, '--config.optim.base_lr=30',
                   '--config.train.num_steps=16', '--config.train.log_every=1',
                   '--config.train.checkpoint_every=2',
                   '--config.train.stop_on_collapse=True')
  assert result.returncode == 3, result.stderr[-3000:]
  output = result.stdout + result.stderr
  warnings = [l for l in output.splitlines() if 'warning: representation collapse' in l]
  assert len(warnings) == 1 and 'optim.base_lr=30' in warnings[0]
  # 64 training images, K = 64: every image is its own negative.
  assert 'moco.queue_size=64 is at least the 64 training images' in output
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'train.stop_on_collapse' in errors[0]
  logged = [e for e in read_metrics(workdir) if 'feature_std' in e]
  stopped_at = logged[-1]['step']
  assert stopped_at < 16
  healthy = 1 / math.sqrt(16)
  assert all(e['feature_std'] < 0.1 * healthy for e in logged[-collapse.PATIENCE:])
  saved = checkpointing.Checkpointer(workdir).all_steps()
  assert saved and max(saved) < stopped_at               # nothing saved at the stop


# --- the loss at chance, per loss ---------------------------------------------

@pytest.mark.parametrize('queue_size, batch, temperature, symmetric', [
    (64, 16, 0.2, False),      # v1/v2
    (64, 16, 0.2, True),       # the CIFAR demo's symmetric v2
    (0, 256, 0.2, True),       # v3 (the CPU recipe: 4.44, not 11.09)
    (0, 16, 1.0, False),
])
def test_chance_loss_is_ln_candidates_times_the_losses_scale(queue_size, batch,
                                                             temperature, symmetric):
  directions = 2 if symmetric else 1
  candidates = queue_size + 1 if queue_size else batch
  scale = 1.0 if queue_size else 2 * temperature
  want = directions * scale * np.log(candidates)            # the NumPy derivation
  got = moco.chance_loss(queue_size, batch, temperature, symmetric)
  assert got == pytest.approx(want, rel=1e-12)
  # And the losses themselves, on features that carry no information (every
  # query, key and negative the same unit vector), sit exactly there.
  same = jnp.ones((batch, 8)) / jnp.sqrt(8.0)
  if queue_size:
    one = moco.infonce_loss(moco.contrastive_logits(same, same, same[:1].repeat(
        queue_size, 0), temperature))
  else:
    one = moco.batch_contrastive_loss(*moco.batch_logits(same, same, temperature),
                                      temperature)
  assert directions * float(one) == pytest.approx(want, rel=1e-5)
  if (queue_size, batch, temperature) == (0, 256, 0.2):
    assert got == pytest.approx(4.436, abs=1e-3)


def _v3_run(lr, steps=200, batch=256, dim=32, temperature=1.0, seed=0):
  """Logged losses of a small v3 run: a linear encoder with a large shared
  offset (as a network at initialisation: all features alike), two noisy views
  of each image, the symmetric v3 loss (moco.batch_contrastive_loss), SGD at
  `lr`; every 10 steps the loss goes to the monitor as the loop would."""
  import optax
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(4 * batch, 64)).astype(np.float32)
  params = {'w': jnp.asarray(rng.normal(size=(64, dim)) * 0.02, jnp.float32),
            'b': jnp.asarray(rng.normal(size=(dim,)), jnp.float32)}

  def loss_fn(params, x1, x2):
    f1, f2 = (moco.l2_normalize(x @ params['w'] + params['b']) for x in (x1, x2))
    return sum(moco.batch_contrastive_loss(*moco.batch_logits(q, k, temperature),
                                           temperature)
               for q, k in ((f1, f2), (f2, f1)))

  optimizer = optax.sgd(lr)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x1, x2):
    loss, grads = jax.value_and_grad(loss_fn)(params, x1, x2)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  config = _v3_monitor_config(lr, temperature, batch, dim)
  monitor = collapse.monitor_for(
      config, moco.chance_loss(0, batch, temperature, symmetric=True), 0,
      len(images) // batch)
  for t in range(1, steps + 1):
    x = images[rng.choice(len(images), batch, replace=False)]
    x1, x2 = (x + rng.normal(scale=0.3, size=x.shape).astype(np.float32)
              for _ in range(2))
    params, opt_state, loss = step(params, opt_state, x1, x2)
    if t % 10 == 0:
      warning = monitor.update(t, {'loss': float(loss), 'feature_std': 0.1})
      if warning:
        return t, warning
  return None, float(loss)


def _v3_monitor_config(lr, temperature, batch, dim):
  import ml_collections
  return ml_collections.ConfigDict({
      'model': {'dim': dim}, 'dtype': 'float32',
      'optim': {'base_lr': lr, 'warmup_epochs': 0.0},
      'moco': {'queue_size': 0, 'temperature': temperature, 'symmetric': True},
      'train': {'batch_size': batch}})


def test_monitor_warns_on_a_v3_run_held_at_chance_and_not_on_a_learning_one():
  step, warning = _v3_run(lr=0.0)
  assert step is not None and step <= 200, warning
  assert warning.startswith(f'warning: not learning at step {step}: loss ')
  assert 'optim.base_lr=0' in warning and '\n' not in warning
  step, last_loss = _v3_run(lr=1.0)
  assert step is None, last_loss
  assert last_loss < 0.9 * moco.chance_loss(0, 256, 1.0, symmetric=True)
