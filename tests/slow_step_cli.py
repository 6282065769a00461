"""The pretraining command line with a deliberately slow step (for
tests/test_interrupts.py).

Each step's loss passes through a host callback that first appends the
step's number to $SLOW_STEP_LOG, then sleeps $SLOW_STEP_SECONDS. Meanwhile
the main thread waits inside XLA for the step's outputs, where Python runs no
signal handler: the situation of a slow full-width step on a CPU.

  python tests/slow_step_cli.py --config=... --workdir=...   (main's flags)
"""
import os
import runpy
import time

import jax

from moco_jax import experiment

DELAY = float(os.environ['SLOW_STEP_SECONDS'])
LOG = os.environ['SLOW_STEP_LOG']


def _sleep(step, loss):
  with open(LOG, 'a') as f:
    f.write(f'{int(step)}\n')
  time.sleep(DELAY)
  return loss


@jax.jit
def _slow(step, loss):
  return jax.pure_callback(_sleep, jax.ShapeDtypeStruct(loss.shape, loss.dtype),
                           step, loss)


_real_train_step = experiment.Experiment.train_step


def _slow_train_step(self):
  step_fn = _real_train_step(self)

  def step(state, *views):
    state, metrics = step_fn(state, *views)
    return state, dict(metrics, loss=_slow(state.step, metrics['loss']))

  return step


experiment.Experiment.train_step = _slow_train_step
runpy.run_module('moco_jax.main', run_name='__main__', alter_sys=True)
