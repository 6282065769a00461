"""Turn SIGTERM (pre-emption notice) and Ctrl-C into a polite stop request.

The training loop polls `requested` after each step, saves a checkpoint and
returns, so a pre-empted or interrupted run loses nothing and the same
command continues it. A second Ctrl-C interrupts at once.
"""
import signal
import threading

import jax
import numpy as np


class StopRequests:
  """Context manager: while active, SIGTERM/SIGINT set a flag instead of
  killing the process. Outside the main thread it installs nothing."""

  def __init__(self):
    self.signal_name = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # asked twice: stop now
    self.signal_name = signal.Signals(signum).name

  @property
  def requested(self) -> bool:
    """True once any process of the run received a stop signal.

    With several processes the flag is agreed on by all of them, so every
    host stops after the same step (otherwise collectives would hang).
    """
    local = self.signal_name is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(local))))
