"""Wall-clock bookkeeping of a training loop: the throughput of completed
steps (evaluation and compilation excluded), when the first log line is due,
and the time estimate of a long run."""
import contextlib
import time

ONE_DAY = 24 * 3600.0
FIRST_LOG_WITHIN = 60.0   # seconds from the start of the loop


def format_duration(seconds: float) -> str:
  """'3.4 days', '5 h 12 min', '3 min 5 s' or '12 s'."""
  if seconds >= 2 * ONE_DAY:
    return f'{seconds / ONE_DAY:.1f} days'
  if seconds >= 3600:
    return f'{int(seconds // 3600)} h {int(seconds % 3600 // 60)} min'
  if seconds >= 60:
    return f'{int(seconds // 60)} min {int(seconds % 60)} s'
  return f'{seconds:.0f} s'


class StepClock:
  """Times completed steps.

  The first completed step of a run includes compilation and is not timed:
  timing starts when it completes. Time inside `paused()` (evaluation) is
  excluded. A window (since the last log line) gives images/s; the whole
  timed span gives seconds per step for estimates.
  """

  def __init__(self, clock=time.perf_counter):
    self._clock = clock
    self.started = clock()
    self._timed_start = self._window_start = None
    self.timed_steps = self._window_steps = 0
    self.logged = False

  def step_done(self) -> None:
    if self._timed_start is None:
      self._timed_start = self._window_start = self._clock()
      return
    self.timed_steps += 1
    self._window_steps += 1

  @contextlib.contextmanager
  def paused(self):
    """Time spent inside does not count as training time."""
    start = self._clock()
    try:
      yield
    finally:
      spent = self._clock() - start
      if self._timed_start is not None:
        self._timed_start += spent
        self._window_start += spent

  def seconds_per_step(self) -> float | None:
    if not self.timed_steps:
      return None
    return (self._clock() - self._timed_start) / self.timed_steps

  def timed_seconds(self) -> float:
    return 0.0 if self._timed_start is None else self._clock() - self._timed_start

  def images_per_sec(self, batch_size: int) -> float | None:
    """Over the steps since the last `new_window`; None before any timed step."""
    if not self._window_steps:
      return None
    return self._window_steps * batch_size / (self._clock() - self._window_start)

  def new_window(self) -> None:
    self.logged = True
    if self._timed_start is not None:
      self._window_start, self._window_steps = self._clock(), 0

  def first_log_overdue(self) -> bool:
    """No log line yet and the loop started a minute ago or more."""
    return not self.logged and self._clock() - self.started >= FIRST_LOG_WITHIN

  def estimate_ready(self) -> bool:
    """Enough steps timed for an estimate: 3, or one of a minute or more."""
    return self.timed_steps >= 3 or (self.timed_steps >= 1
                                      and self.timed_seconds() >= 60)


def eta_seconds(steps_left: int, seconds_per_step: float | None,
                evaluations_left: int = 0, seconds_per_evaluation: float | None = None
                ) -> float | None:
  """Time to the end of the run: the steps left at the timed rate plus the
  evaluation passes still to come at the last pass's duration; None before
  any step was timed."""
  if seconds_per_step is None:
    return None
  return steps_left * seconds_per_step + evaluations_left * (seconds_per_evaluation or 0.0)


def long_run_estimate(steps_left: int, seconds_per_step: float, where: str) -> str | None:
  """A one-line estimate when the rest of the run takes more than a day."""
  total = steps_left * seconds_per_step
  if total <= ONE_DAY:
    return None
  return (f'estimate: {steps_left:,} more steps at {seconds_per_step:.1f} s/step '
          f'take about {format_duration(total)} on {where}')


# A pass over data shows a bar only once it has taken this long: quick passes
# (tests, small sets) print nothing.
BAR_DELAY = 3.0


def progress(iterable, desc: str, total: int | None = None, unit: str = 'batch'):
  """`iterable` with a tqdm bar on stderr (process 0 only) that appears after
  BAR_DELAY seconds and disappears when done."""
  from tqdm import tqdm
  import jax
  if total is None and hasattr(iterable, '__len__'):
    total = len(iterable)
  return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False,
              delay=BAR_DELAY, dynamic_ncols=True, disable=jax.process_index() != 0)
