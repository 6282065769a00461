"""Optimisers and learning-rate schedules (optax), lr given per 256 images."""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('sgd', 'lars', 'adamw')
SCHEDULES = ('cosine', 'step', 'constant')


def peak_learning_rate(optim_config, global_batch: int) -> float:
  """Linear scaling rule: base_lr is per 256 images (0.03 at 256 → 0.06 at 512)."""
  return optim_config.base_lr * global_batch / 256


def learning_rate_schedule(optim_config, global_batch: int,
                           steps_per_epoch: int, total_steps: int):
  """step -> lr.

  'cosine' decays per step from the peak to 0 over the run (the reference
  decays per epoch; the curves differ by under one epoch's step). 'step'
  multiplies by 0.1 at each of `optim.lr_drop_epochs` (v1: 120, 160).
  `optim.warmup_epochs` > 0 prepends a linear warm-up from 0.
  """
  peak = peak_learning_rate(optim_config, global_batch)
  warmup_steps = int(round(optim_config.warmup_epochs * steps_per_epoch))
  decay_steps = max(total_steps - warmup_steps, 1)
  name = optim_config.schedule
  if name == 'cosine':
    main = optax.cosine_decay_schedule(peak, decay_steps)
  elif name == 'step':
    boundaries = {int(epoch * steps_per_epoch) - warmup_steps: 0.1
                  for epoch in optim_config.lr_drop_epochs}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  elif name == 'constant':
    main = optax.constant_schedule(peak)
  else:
    raise ValueError(f'unknown optim.schedule {name!r}; valid: {", ".join(SCHEDULES)}')
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


class LarsState(NamedTuple):
  """Momentum buffer `mu` of reference_lars, one per parameter."""
  mu: Any


def reference_lars(learning_rate, weight_decay: float = 0.0,
                   momentum: float = 0.9, trust_coefficient: float = 0.001
                   ) -> optax.GradientTransformation:
  """LARS as MoCo v3's optimizer.py computes it (arXiv:2104.02057).

  Per parameter w with gradient g, at learning rate lr_t (schedule of the
  step count):
    matrices (ndim > 1): d = g + wd·w, d ← d·η‖w‖/‖d‖ (1 when either norm
      is 0); biases and BN/LayerNorm params (1-D): d = g, no decay, no
      trust ratio;
    mu ← momentum·mu + d;  w ← w − lr_t·mu.
  The lr multiplies the momentum buffer AFTER accumulation. optax.lars scales
  by the lr before the momentum, which gives other updates whenever the lr
  changes (warm-up, cosine).

  Args:
    learning_rate: float or schedule step -> lr.
    weight_decay, momentum, trust_coefficient (η): the reference's defaults
      are 0, 0.9, 0.001.
  """
  schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    return (LarsState(mu=jax.tree.map(jnp.zeros_like, params)),
            optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)))

  def direction(g, w):
    if w.ndim <= 1:
      return g
    d = g + weight_decay * w
    w_norm, d_norm = jnp.linalg.norm(w), jnp.linalg.norm(d)
    trust = jnp.where((w_norm > 0) & (d_norm > 0),
                      trust_coefficient * w_norm / jnp.where(d_norm > 0, d_norm, 1),
                      1.0)
    return d * trust

  def update(grads, state, params):
    lars_state, count_state = state
    mu = jax.tree.map(lambda m, g, w: momentum * m + direction(g, w),
                      lars_state.mu, grads, params)
    lr = schedule(count_state.count)
    updates = jax.tree.map(lambda m: -lr * m, mu)
    count = optax.safe_increment(count_state.count)
    return updates, (LarsState(mu=mu), optax.ScaleByScheduleState(count=count))

  return optax.GradientTransformation(init, update)


def frozen_mask(params, frozen: tuple):
  """Tree of labels 'frozen' / 'train' over `params`: a leaf is frozen when
  its path starts with one of `frozen`'s key tuples."""
  def label(path, _):
    keys = tuple(getattr(k, 'key', getattr(k, 'name', None)) for k in path)
    return 'frozen' if any(keys[:len(f)] == tuple(f) for f in frozen) else 'train'
  return jax.tree_util.tree_map_with_path(label, params)


def build_optimizer(optim_config, schedule, frozen: tuple = ()
                    ) -> optax.GradientTransformation:
  """'sgd': PyTorch-style SGD (weight decay added to the gradient before
  momentum, on all params, as the reference; Nesterov's momentum with
  optim.nesterov, as torch's nesterov=True); 'lars': reference_lars (MoCo
  v3's); 'adamw': optax.adamw (torch's AdamW: decoupled decay on all params).

  frozen: param paths (key tuples, e.g. (('backbone', 'patch_embed'),)) that
  get neither updates nor weight decay, as the reference's optimiser skips
  params without gradients (MoCo v3's stop_grad_conv1). Empty: the plain
  optimiser (its state layout unchanged).
  """
  name, wd = optim_config.name, optim_config.weight_decay
  if name == 'sgd':
    optimizer = optax.chain(optax.add_decayed_weights(wd),
                            optax.sgd(schedule, momentum=optim_config.momentum,
                                      nesterov=optim_config.get('nesterov', False)))
  elif name == 'lars':
    optimizer = reference_lars(schedule, weight_decay=wd,
                               momentum=optim_config.momentum)
  elif name == 'adamw':
    optimizer = optax.adamw(schedule, weight_decay=wd)
  else:
    raise ValueError(f'unknown optim.name {name!r}; valid: {", ".join(OPTIMIZERS)}')
  if not frozen:
    return optimizer
  return optax.multi_transform({'train': optimizer, 'frozen': optax.set_to_zero()},
                               lambda params: frozen_mask(params, frozen))
