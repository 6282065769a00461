"""Optimisers and learning-rate schedules (optax), lr given per 256 images."""
import jax
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


def build_optimizer(optim_config, schedule) -> optax.GradientTransformation:
  """'sgd': PyTorch-style SGD (weight decay added to the gradient before
  momentum, on all params, as the reference); 'lars'; 'adamw'."""
  name, wd = optim_config.name, optim_config.weight_decay
  if name == 'sgd':
    return optax.chain(optax.add_decayed_weights(wd),
                       optax.sgd(schedule, momentum=optim_config.momentum))
  if name == 'lars':
    # As usual for LARS, BN parameters and biases (1-D) get neither weight
    # decay nor trust-ratio scaling.
    is_matrix = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.lars(schedule, weight_decay=wd, momentum=optim_config.momentum,
                      weight_decay_mask=is_matrix, trust_ratio_mask=is_matrix)
  if name == 'adamw':
    return optax.adamw(schedule, weight_decay=wd)
  raise ValueError(f'unknown optim.name {name!r}; valid: {", ".join(OPTIMIZERS)}')
