"""Step timing: compilation and evaluation excluded, first log within a
minute, the one-line estimate of a run longer than a day."""
from moco_jax.runtime import progress


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_rates_exclude_the_compiling_step_and_evaluation():
  clock = FakeClock()
  steps = progress.StepClock(clock)
  clock.now = 50.0                      # step 1: compilation + the step
  steps.step_done()
  assert steps.images_per_sec(256) is None and steps.seconds_per_step() is None
  for _ in range(4):                    # steps 2-5: 2 s each
    clock.now += 2.0
    steps.step_done()
  with steps.paused():                  # a kNN pass
    clock.now += 100.0
  assert steps.seconds_per_step() == 2.0
  assert steps.images_per_sec(256) == 4 * 256 / 8.0
  steps.new_window()
  clock.now += 3.0
  steps.step_done()
  assert steps.images_per_sec(256) == 256 / 3.0


def test_first_log_is_due_after_a_minute_and_only_once():
  clock = FakeClock()
  steps = progress.StepClock(clock)
  clock.now = 59.0
  assert not steps.first_log_overdue()
  clock.now = 61.0
  assert steps.first_log_overdue()
  steps.new_window()
  assert not steps.first_log_overdue()


def test_estimate_only_for_runs_longer_than_a_day():
  clock = FakeClock()
  steps = progress.StepClock(clock)
  steps.step_done()
  clock.now = 90.0                      # one timed step of 90 s: enough to estimate
  steps.step_done()
  assert steps.estimate_ready()
  # The full-width CIFAR demo on 2 CPU cores: 19,400 steps of ~90 s.
  line = progress.long_run_estimate(19_399, steps.seconds_per_step(), '1 CPU device')
  assert line.startswith('estimate: 19,399 more steps at 90.0 s/step take about 20.2 days')
  assert progress.long_run_estimate(780, 1.5, '1 CPU device') is None
  assert progress.format_duration(3725) == '1 h 2 min'
  assert progress.format_duration(75) == '1 min 15 s'


def test_eta_counts_the_knn_passes_still_to_come():
  from moco_jax.runtime import progress
  from moco_jax.runtime.loop import evaluations_left as knn_passes_left

  def passes(done, last, every):   # counted one step at a time
    return sum(1 for s in range(done + 1, last + 1) if s % every == 0 or s == last)

  for last in range(1, 25):
    for every in range(1, 8):
      for done in range(last + 1):
        assert knn_passes_left(done, last, every) == passes(done, last, every)
  assert knn_passes_left(3, 10, 0) == 0
  # The CPU recipe: 780 steps, kNN after epoch 2 (390) and at the end.
  assert knn_passes_left(100, 780, 390) == 2
  assert progress.eta_seconds(680, 1.0, 2, 45.0) == 680 + 90
  assert progress.eta_seconds(680, None, 2, 45.0) is None
