"""Turn SIGTERM (pre-emption notice) and Ctrl-C into a polite stop request.

The training loops poll `requested` after each completed step, save a
checkpoint and return, so a pre-empted or interrupted run loses nothing and
the same command continues it. A second Ctrl-C stops at once.

Why a watcher thread: Python runs a signal handler only in the main thread,
between two bytecodes. A main thread waiting inside XLA (a long step, a
device_get behind a queue of dispatched steps) runs no bytecode, so a flag set
by the handler, or a KeyboardInterrupt it raises, comes only when that wait
ends: minutes later on a slow device. CPython's C-level handler, however,
writes every signal number to the wakeup fd (`signal.set_wakeup_fd`) the
moment the signal arrives; a thread reading it records the request at once
and, on a second Ctrl-C, ends the process at once.

Every signal reaches both: the wakeup fd (one byte per signal) and, when the
main thread next runs bytecode, the Python handler. So each keeps its own
count and neither reads the other's: the watcher alone decides 'exit', the
handler alone decides 'raise'. (Reading the flag the handler set made one
Ctrl-C during Python work count as two.)
"""
import os
import signal
import socket
import threading

import jax
import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for Ctrl-C


class StopRequests:
  """Context manager: while active, SIGTERM/SIGINT set a flag instead of
  killing the process. Outside the main thread it installs nothing.

  Args:
    second_interrupt: what a SIGINT after the first signal does:
      'exit': print `exit_message` as one line on stderr and end the process
        with status 130 at once, without unwinding (for command lines: no
        traceback, no waiting for the device);
      'raise': raise KeyboardInterrupt in the main thread (for notebooks and
        Python callers, whose process must survive).
    exit_message: the line printed for 'exit'.
    announce: print one line on stderr the moment the first signal arrives,
      saying the stop is noted and what happens next (`work`: what the run
      finishes before it saves; the loop updates it, e.g. during a kNN pass).
  """

  def __init__(self, second_interrupt: str = 'raise',
               exit_message: str = 'error: interrupted twice: stopped at once, '
                                   'without saving', announce: bool = False):
    if second_interrupt not in ('exit', 'raise'):
      raise ValueError(f'second_interrupt={second_interrupt!r} is not exit or raise')
    self.second_interrupt, self.exit_message = second_interrupt, exit_message
    self.announce = announce
    self.work = 'the current step'
    self.signal_name = None
    self._watched_signals = 0
    self._previous = {}
    self._previous_wakeup = None
    self._sockets = None
    self._thread = None
    self._handler_signals = 0

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    self._sockets = (reader, writer)
    self._previous_wakeup = signal.set_wakeup_fd(writer.fileno(),
                                                 warn_on_full_buffer=False)
    self._thread = threading.Thread(target=self._watch, name='stop-requests',
                                    daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    if self._sockets is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      reader, writer = self._sockets
      writer.close()                       # the watcher's recv returns b''
      self._thread.join(timeout=5)
      reader.close()
      self._sockets = self._thread = None
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _watch(self):
    """The watcher thread: reacts to signal numbers as they arrive."""
    reader = self._sockets[0]
    while True:
      try:
        data = reader.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum not in SIGNALS:
          continue
        self._watched_signals += 1
        if (self._watched_signals > 1 and signum == signal.SIGINT
            and self.second_interrupt == 'exit'):
          os.write(2, f'\n{self.exit_message}\n'.encode())
          os._exit(EXIT_INTERRUPTED)
        name = signal.Signals(signum).name
        self.signal_name = self.signal_name or name
        if self._watched_signals == 1 and self.announce:
          os.write(2, f'\n{self.noted_line(name)}\n'.encode())

  def noted_line(self, name: str) -> str:
    """The line printed when the first stop signal arrives."""
    again = ('Ctrl-C again stops at once without saving' if self.second_interrupt == 'exit'
             else 'interrupt again to raise KeyboardInterrupt at once')
    return (f'{name}: stop noted; the run finishes {self.work}, saves and stops '
            f'({again})')

  def _handle(self, signum, frame):
    """The Python-level handler (main thread, when it next runs bytecode).

    It keeps its own count: the watcher may already have recorded this very
    signal, and may record it after this handler (so neither reads the
    other's count)."""
    self._handler_signals += 1
    if (signum == signal.SIGINT and self._handler_signals > 1
        and self.second_interrupt == 'raise'):
      raise KeyboardInterrupt  # asked twice: stop now
    self.signal_name = self.signal_name or signal.Signals(signum).name

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
