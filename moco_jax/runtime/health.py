"""Guards of any training loop: a loss (or gradient norm) that became NaN or
infinite stops the run before it is saved; a classifier's loss far above
chance is warned about once."""
import math


class NonFiniteError(RuntimeError):
  """A loss (or, in pretraining, the gradient norm) became NaN or infinite."""


def check_finite(metrics: dict, step: int, checkpointer, hint: str,
                 keys=('loss',)) -> None:
  """Raises NonFiniteError naming the step, the values and the last good
  checkpoint unless every metrics[key] is finite (call it before saving)."""
  import numpy as np
  if all(np.isfinite(metrics[key]) for key in keys):
    return
  good = checkpointer.all_steps()
  values = ', '.join(f'{key}={metrics[key]}' for key in keys)
  raise NonFiniteError(
      f'non-finite training detected at step {step} ({values}); nothing saved '
      f'after it; last good checkpoint: '
      f'{checkpointer.path(good[-1]) if good else "none"} ({hint})')


class LossBlowUp:
  """Warns once when a classifier's loss rises far above chance, ln(classes):
  training is diverging even while the numbers stay finite (e.g. linear
  evaluation at lr 30 on narrow, unnormalised features)."""

  FACTOR = 10.0

  def __init__(self, num_classes: int):
    self.chance = math.log(max(num_classes, 2))
    self.warned = False

  def update(self, step: int, loss: float) -> str | None:
    if self.warned or not loss > self.FACTOR * self.chance:
      return None
    self.warned = True
    return (f'warning: the loss is {loss:.4g} at step {step}, more than '
            f'{self.FACTOR:g}x chance ln(classes) = {self.chance:.3g}: training may be '
            f'diverging; lower optim.base_lr')
