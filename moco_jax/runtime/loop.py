"""The training-loop harness shared by pretraining (train.py), linear
evaluation (evaluation/linear.py) and any later trainer (fine-tuning).

It owns what every loop does around its step, and nothing about MoCo:
  - a tqdm progress bar of completed steps (process 0 only), started with
    the first step (after an evaluation at the start), whose ETA counts the
    evaluation passes still to come at the last pass's duration;
  - stop requests: SIGTERM or Ctrl-C finish the current step, save, stop
    (runtime/preemption.py; a second Ctrl-C as `second_interrupt` says);
  - timing: images/s over completed steps, compilation and evaluation
    excluded (runtime/progress.StepClock), a first log line within a minute,
    a one-line estimate when the rest of the run takes more than a day;
  - the non-finite guard: every step's `finite_keys` metrics are checked
    before anything is logged or saved (health.NonFiniteError);
  - "is it time to log / save / evaluate", and the save on stop;
  - at the end, whatever ended the loop: close the bar, let a started save
    complete, close the checkpointer and the metric writer.

At most one step is in flight: after dispatching step n the harness reads and
copies batch n+1, then waits for step n's metrics. The bar, its rate and the
estimate therefore count completed steps, and a stop request is seen within
one step.

Use:

  harness = LoopHarness('pretrain', start_step, last_step, checkpointer,
                        saved_config=config.to_dict(), batch_size=...,
                        log_every=..., checkpoint_every=..., writer=writer)
  with harness:
    state = harness.run(state, step_fn, next_inputs,
                        log=on_log, evaluate=on_eval, eval_every=...)
  if harness.stopped_by: ...      # 'SIGTERM'/'SIGINT': saved and stopped early

`step_fn(state, *next_inputs()) -> (state, metrics)` with metrics a dict of
device scalars; `log(done, metrics, images_per_sec)` is called on log steps
(images_per_sec: None while only the compiling step ran);
`evaluate(done, state)` after the save on evaluation steps, clock paused;
`watch(done, metrics)` after the finite check on every step.
"""
import contextlib
import time

import jax
from tqdm import tqdm

from moco_jax.runtime import health, preemption
from moco_jax.runtime import progress as clock


class LoopHarness:
  """Progress, stop requests, timing, the non-finite guard and saving of a
  training loop over steps (start_step, last_step].

  Args:
    desc: the progress bar's label ('pretrain', 'lincls').
    start_step, last_step: the state's step now and the step to reach.
    checkpointer: runtime/checkpointing.Checkpointer; saves go through it.
    saved_config: the dict saved next to every checkpoint.
    batch_size: global images per step (for images/s).
    log_every, checkpoint_every: steps between log lines and saves; the
      last step and a stop are always logged and saved.
    writer: a MetricWriter (or None), closed when the harness exits.
    finite_keys: metrics that must be finite at every step.
    finite_hint: what to try, named in the NonFiniteError.
    second_interrupt: 'raise' (Python callers) or 'exit' (command lines),
      see preemption.StopRequests.
    where: the devices in words, for the long-run estimate (None: none).
  """

  def __init__(self, desc: str, start_step: int, last_step: int, checkpointer, *,
               saved_config: dict, batch_size: int, log_every: int,
               checkpoint_every: int, writer=None, finite_keys=('loss',),
               finite_hint: str = 'lower optim.base_lr',
               second_interrupt: str = 'raise', where: str | None = None):
    self.desc, self.start_step, self.last_step = desc, start_step, last_step
    self.checkpointer, self.saved_config = checkpointer, saved_config
    self.batch_size, self.log_every = batch_size, log_every
    self.checkpoint_every, self.writer = checkpoint_every, writer
    self.finite_keys, self.finite_hint = tuple(finite_keys), finite_hint
    self.where = where
    self.is_main = jax.process_index() == 0
    self._stop = preemption.StopRequests(
        second_interrupt,
        f'error: interrupted twice: stopped at once without saving; rerun the '
        f'same command to resume from the newest checkpoint in {checkpointer.directory}',
        announce=self.is_main)
    self.bar = None
    self.clock = None
    self.eval_every = 0
    self.eval_seconds = None   # the last evaluation pass's duration
    self.stopping = False
    self.stopped_by = None   # the signal's name once a stop request ended the loop

  def __enter__(self):
    self._stop.__enter__()
    return self

  def _start_bar(self):
    # tqdm's own remaining time would leave out the evaluation passes still
    # to come: the ETA in the postfix (set_postfix) counts them.
    self.bar = tqdm(total=self.last_step, initial=self.start_step,
                    disable=not self.is_main, unit='step', dynamic_ncols=True,
                    desc=self.desc, bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} '
                    '[{elapsed}, {rate_fmt}{postfix}]')

  def __exit__(self, *exc_info):
    # Whatever ended the loop, let a started save complete (orbax only marks
    # it as a checkpoint once it is whole).
    try:
      self._stop.__exit__(*exc_info)
    finally:
      if self.bar is not None:
        self.bar.close()
      self.checkpointer.wait()
      self.checkpointer.close()
      if self.writer is not None:
        self.writer.close()

  def write(self, line: str) -> None:
    """Prints a line above the progress bar (process 0 only)."""
    if self.is_main:
      tqdm.write(line)

  @contextlib.contextmanager
  def busy(self, work: str):
    """Context: a stop request arriving inside is answered at once with 'the
    run finishes `work`, saves and stops' (e.g. a kNN pass of a minute)."""
    self._stop.work = work
    try:
      yield
    finally:
      self._stop.work = 'the current step'

  def set_postfix(self, done: int, **fields) -> None:
    """The bar's postfix after step `done`: `fields` plus the ETA (the steps
    left at the timed rate and the evaluation passes left at the last pass's
    duration)."""
    eta = clock.eta_seconds(self.last_step - done, self.clock.seconds_per_step(),
                            evaluations_left(done, self.last_step, self.eval_every),
                            self.eval_seconds)
    if eta is not None:
      fields['eta'] = clock.format_duration(eta)
    self.bar.set_postfix(**fields)

  def paused(self):
    """Context: time inside (an evaluation) is not training time."""
    return self.clock.paused() if self.clock is not None else contextlib.nullcontext()

  def log_due(self, done: int) -> bool:
    """A log line after step `done`: every log_every steps, at the last step,
    on a stop, and once within the loop's first minute."""
    return (done % self.log_every == 0 or done == self.last_step or self.stopping
            or self.clock.first_log_overdue())

  def save_due(self, done: int) -> bool:
    """A checkpoint after step `done`: every checkpoint_every, last, stop."""
    return done % self.checkpoint_every == 0 or done == self.last_step or self.stopping

  def eval_due(self, done: int, every: int) -> bool:
    """An evaluation after step `done`: every `every` steps (0: never) and at
    the last step; never on a stop."""
    if self.stopping:
      return False
    return done == self.last_step or (every > 0 and done % every == 0)

  def take_rate(self) -> float | None:
    """Images/s since the previous call (None before a timed step); starts a
    new timing window."""
    rate = self.clock.images_per_sec(self.batch_size)
    self.clock.new_window()
    return rate

  def _evaluate(self, evaluate, done: int, state) -> None:
    started = time.perf_counter()
    evaluate(done, state)
    self.eval_seconds = time.perf_counter() - started

  def run(self, state, step_fn, next_inputs, *, log=None, evaluate=None,
          eval_every: int = 0, evaluate_first=None, watch=None):
    """Runs steps start_step+1 .. last_step, or until a stop request.

    Per completed step `done`: the finite check, watch(done, metrics), then
    log(done, metrics, images_per_sec) if `log_due`, the save if `save_due`,
    on a stop the saved-and-stopped line (and return), the long-run estimate
    once, then evaluate(done, state) if `evaluate` and `eval_due(done,
    eval_every)`. Metrics reach the callbacks as Python scalars.
    evaluate_first: a callable like `evaluate`, called once as
    evaluate_first(start_step, state) before the first step, before the bar
    and its clock start (None: no evaluation at the start).

    Returns:
      The state after the last step run.

    Raises:
      health.NonFiniteError: a finite_keys metric is NaN/Inf (nothing saved
        from that step).
    """
    self.eval_every = eval_every if evaluate is not None else 0
    if evaluate_first is not None:
      self._evaluate(evaluate_first, self.start_step, state)
    self._start_bar()
    self.clock = clock.StepClock()
    estimated = False
    inputs = next_inputs() if self.start_step < self.last_step else None
    for step in range(self.start_step, self.last_step):
      state, metrics = step_fn(state, *inputs)
      done = step + 1
      if done < self.last_step:  # read and copy the next batch while the step runs
        inputs = next_inputs()
      # Wait for this step: the host never runs ahead of the device.
      metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
      self.clock.step_done()
      self.bar.update(1)
      health.check_finite(metrics, done, self.checkpointer, self.finite_hint,
                          keys=self.finite_keys)
      if watch is not None:
        watch(done, metrics)
      self.stopping = self._stop.requested
      if log is not None and self.log_due(done):
        log(done, metrics, self.take_rate())
      if self.save_due(done):
        self.checkpointer.save(done, state, self.saved_config)
      if self.stopping:
        self.stopped_by = self._stop.signal_name
        self.write(f'{self.stopped_by}: saved step {done} to '
                   f'{self.checkpointer.path(done)}; rerun the same command to continue')
        return state
      if not estimated and self.where is not None and self.clock.estimate_ready():
        estimated = True
        line = clock.long_run_estimate(self.last_step - done,
                                       self.clock.seconds_per_step(), self.where)
        if line:
          self.write(line)
      # After the save is started: it completes while the evaluation runs.
      if evaluate is not None and self.eval_due(done, eval_every):
        with self.clock.paused():
          self._evaluate(evaluate, done, state)
    return state


def evaluations_left(done: int, last_step: int, every: int) -> int:
  """Evaluation passes after step `done`: every `every` steps and at the last
  (none counted when every <= 0)."""
  if every <= 0:
    return 0
  return (last_step // every - done // every
          + (1 if last_step % every else 0) * (done < last_step))
