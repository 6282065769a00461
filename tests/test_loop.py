"""The loop harness (runtime/loop.py): when it logs, saves and evaluates,
that it stops on a request after saving, and that a non-finite loss stops
it before anything of that step is saved. A counting step on the host and a
fake checkpointer stand in for the real ones; the expected schedules are
written out from the rules in the harness's docstring."""
import jax.numpy as jnp
import pytest

from moco_jax.runtime import health, loop


class FakeCheckpointer:
  directory = '/nowhere/checkpoints'

  def __init__(self):
    self.saved, self.closed, self.waited = [], False, False

  def save(self, step, state, config):
    self.saved.append((step, state))

  def all_steps(self):
    return [step for step, _ in self.saved]

  def path(self, step):
    return f'{self.directory}/{step}'

  def wait(self):
    self.waited = True

  def close(self):
    self.closed = True


def add_one(state, batch):
  return state + batch, {'loss': jnp.float32(1.0) / (state + batch)}


def harness(checkpointer, start=0, last=10, **kwargs):
  return loop.LoopHarness('test', start, last, checkpointer, saved_config={},
                          batch_size=4, log_every=3, checkpoint_every=4, **kwargs)


def test_logs_saves_and_evaluates_on_schedule():
  checkpointer, logged, evaluated = FakeCheckpointer(), [], []
  with harness(checkpointer) as h:
    state = h.run(0, add_one, lambda: (1,),
                  log=lambda done, metrics, rate: logged.append((done, metrics['loss'])),
                  evaluate=lambda done, state: evaluated.append((done, state)),
                  eval_every=5)
  assert state == 10 and h.stopped_by is None
  assert [done for done, _ in logged] == [3, 6, 9, 10]
  assert logged[0][1] == pytest.approx(1 / 3)
  assert checkpointer.saved == [(4, 4), (8, 8), (10, 10)]
  assert evaluated == [(5, 5), (10, 10)]
  assert checkpointer.waited and checkpointer.closed


def test_resumed_loop_runs_the_remaining_steps_only():
  checkpointer, seen = FakeCheckpointer(), []
  with harness(checkpointer, start=7) as h:
    state = h.run(7, add_one, lambda: (1,), watch=lambda done, m: seen.append(done))
  assert state == 10 and seen == [8, 9, 10]
  assert checkpointer.all_steps() == [8, 10]


def test_a_stop_request_saves_the_step_and_ends_the_loop():
  checkpointer, logged, evaluated = FakeCheckpointer(), [], []
  h = harness(checkpointer)

  def watch(done, metrics):
    if done == 2:  # as if SIGTERM arrived during step 2
      h._stop.signal_name = 'SIGTERM'

  with h:
    state = h.run(0, add_one, lambda: (1,), watch=watch,
                  log=lambda done, metrics, rate: logged.append(done),
                  evaluate=lambda done, state: evaluated.append(done), eval_every=1)
  assert state == 2 and h.stopped_by == 'SIGTERM'
  assert logged == [2] and checkpointer.saved == [(2, 2)]
  assert evaluated == [1]   # never evaluated on the stop step


def test_a_non_finite_loss_raises_before_saving():
  checkpointer = FakeCheckpointer()

  def diverge(state, batch):
    loss = jnp.float32(jnp.nan) if state + batch == 5 else jnp.float32(1.0)
    return state + batch, {'loss': loss}

  with pytest.raises(health.NonFiniteError, match=r'step 5 .*/nowhere/checkpoints/4'):
    with harness(checkpointer) as h:
      h.run(0, diverge, lambda: (1,))
  assert checkpointer.all_steps() == [4] and checkpointer.closed
