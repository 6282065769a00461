"""The representation-collapse monitor of pretraining.

Collapse: every image maps to (nearly) the same feature. The loss then sits at
chance (moco.chance_loss: ln(K+1) per loss direction, v3 ln(B) × 2T) and the
logits tie, so nothing crashes.
The indicator is `feature_std`, the per-dimension standard deviation over the
batch of the L2-normalised query features, averaged over dimensions (SimSiam,
arXiv:2011.10566, sec. 4.1): about 1/sqrt(C) for spread-out features, near 0
when collapsed. It is computed in the training step (moco.feature_std).
"""
import math

# feature_std below this fraction of 1/sqrt(C) counts as collapsed.
STD_FRACTION = 0.1
# The loss within this relative distance of chance counts as not learning.
CHANCE_TOLERANCE = 0.01
# Consecutive log steps a sign must persist before the warning.
PATIENCE = 3
# A loss at chance is normal early on: that sign counts only after warm-up,
# one epoch and this many steps.
LOSS_GRACE_STEPS = 100


class CollapseError(RuntimeError):
  """The representation collapsed and train.stop_on_collapse is set."""


def healthy_feature_std(dim: int) -> float:
  """1/sqrt(C): the feature_std of features spread uniformly on the sphere."""
  return 1.0 / math.sqrt(dim)


class CollapseMonitor:
  """Watches the logged metrics for collapse; says so once.

  Args:
    dim: C, the projection dimension.
    chance: the loss at chance, in the logged loss's units (moco.chance_loss,
      next to the losses it describes).
    grace_steps: the loss sign only counts after these steps.
    causes: the run's settings to name as likely causes (a short string).
  """

  def __init__(self, dim: int, chance: float, grace_steps: int, causes: str):
    self.healthy = healthy_feature_std(dim)
    self.chance, self.grace_steps, self.causes = chance, grace_steps, causes
    self._low_std = self._at_chance = 0
    self.warned = False

  def update(self, step: int, metrics: dict) -> str | None:
    """Feeds one log step's metrics ('feature_std', 'loss'); returns the
    one-line warning the first time collapse has persisted PATIENCE log
    steps, else None."""
    std, loss = metrics.get('feature_std'), metrics.get('loss')
    low = std is not None and std < STD_FRACTION * self.healthy
    self._low_std = self._low_std + 1 if low else 0
    flat = (loss is not None and step > self.grace_steps
            and abs(loss - self.chance) <= CHANCE_TOLERANCE * self.chance)
    self._at_chance = self._at_chance + 1 if flat else 0
    if self.warned or max(self._low_std, self._at_chance) < PATIENCE:
      return None
    self.warned = True
    at_chance = (f'loss {loss:.4g} within {CHANCE_TOLERANCE:.0%} of its chance level '
                 f'{self.chance:.4g} (features that tell the images apart no better '
                 f'than a guess)')
    if self._low_std < PATIENCE:
      return (f'warning: not learning at step {step}: {at_chance} for {PATIENCE} log '
              f'steps; instance_top1/5 mean nothing now. Likely causes: lr too low '
              f'(0 learns nothing) or too high, too short a warm-up, bfloat16 '
              f'({self.causes})')
    signs = [f'feature_std {std:.4g} (healthy about 1/sqrt(C) = '
             f'{self.healthy:.3g}; collapsed below {STD_FRACTION * self.healthy:.3g})']
    if self._at_chance >= PATIENCE:
      signs.append(at_chance)
    return (f'warning: representation collapse at step {step}: '
            f'{" and ".join(signs)} for {PATIENCE} log steps; instance_top1/5 mean '
            f'nothing now. Likely causes: lr too high, no warm-up, bfloat16 '
            f'({self.causes})')


def monitor_for(config, chance: float, warmup_steps: int,
                epoch_steps: int = 0) -> CollapseMonitor:
  """The CollapseMonitor of a pretraining config whose loss at chance is
  `chance` (moco.chance_loss); the loss sign counts after max(warm-up, one
  epoch, LOSS_GRACE_STEPS) steps."""
  causes = (f'optim.base_lr={config.optim.base_lr:g}, '
            f'optim.warmup_epochs={config.optim.warmup_epochs:g}, dtype={config.dtype}')
  return CollapseMonitor(
      config.model.dim, chance, max(warmup_steps, epoch_steps, LOSS_GRACE_STEPS), causes)
