"""Multi-process (multi-host) start-up: jax.distributed.initialize from flags.

Must run before anything asks JAX for its devices (jax.devices(),
jax.process_count(), a computation): afterwards the backends exist and
JAX refuses to join a cluster.

Three ways to start:
  * nothing set: one process (the default; nothing is initialised).
  * explicit: coordinator_address='HOST:PORT', num_processes=N, process_id=i
    on each of the N processes (same address and N everywhere, i = 0…N-1).
  * auto=True: jax.distributed.initialize() with no arguments; JAX detects
    the cluster on Cloud TPU pods, SLURM, Open MPI and Kubernetes TPU jobs.

The start is bounded (--coordinator_timeout, default TIMEOUT_S): process
i > 0 first waits for the coordinator's port to accept a connection, then
every process waits for the others to join. JAX's own timeout ends the
process in a C++ abort (exit 134, two stack traces); here the line that says
what was tried and what to check comes first, with exit status 1.
"""
import math
import os
import socket
import threading
import time

import jax

TIMEOUT_S = 300.0   # JAX's own initialization_timeout
EXIT_START_FAILED = 1


class DistributedError(ValueError):
  """The multi-process flags do not describe a valid start-up (one line)."""


def distributed_arguments(coordinator_address: str | None = None,
                          num_processes: int | None = None,
                          process_id: int | None = None,
                          auto: bool = False) -> dict | None:
  """Checks the values; the keyword arguments for jax.distributed.initialize.

  Args:
    coordinator_address: 'HOST:PORT' of process 0's coordinator service, or
      None/'' when not given.
    num_processes: processes in the run (>= 1), or None.
    process_id: this process's index in [0, num_processes), or None.
    auto: let JAX detect the cluster (no other value may be given).

  Returns:
    None for a single-process run, {} for auto-detection, else
    dict(coordinator_address=, num_processes=, process_id=).

  Raises:
    DistributedError naming the bad value.
  """
  explicit = {name: value for name, value in (
      ('coordinator_address', coordinator_address or None),
      ('num_processes', num_processes), ('process_id', process_id))
      if value is not None}
  if auto:
    if explicit:
      given = ', '.join(f'--{name}={value}' for name, value in explicit.items())
      raise DistributedError(
          f'--distributed detects the cluster by itself and cannot be combined '
          f'with {given}; pass either --distributed or all of '
          f'--coordinator_address, --num_processes and --process_id')
    return {}
  if not explicit:
    return None
  missing = [name for name in ('coordinator_address', 'num_processes', 'process_id')
             if name not in explicit]
  if missing:
    given = ', '.join(f'--{name}={value}' for name, value in explicit.items())
    raise DistributedError(
        f'{given} also needs {", ".join("--" + name for name in missing)} '
        f'(or use --distributed on a TPU pod, SLURM or Open MPI cluster)')
  host, _, port = coordinator_address.rpartition(':')
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise DistributedError(
        f'--coordinator_address={coordinator_address!r} is not HOST:PORT '
        f'(e.g. 10.0.0.1:1234, the address of process 0 and a free port)')
  if num_processes < 1:
    raise DistributedError(f'--num_processes={num_processes} must be at least 1')
  if not 0 <= process_id < num_processes:
    raise DistributedError(
        f'--process_id={process_id} is not in 0…{num_processes - 1} '
        f'(--num_processes={num_processes})')
  return explicit


def wait_for_coordinator(coordinator_address: str, timeout_s: float) -> None:
  """Waits until HOST:PORT accepts a TCP connection (the coordinator service
  of process 0 is up), retrying every second for at most timeout_s seconds.

  Raises:
    DistributedError naming the address, the wait and what to check.
  """
  host, _, port = coordinator_address.rpartition(':')
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip('[]'), int(port)),
                                    timeout=max(0.1, min(5.0, timeout_s))):
        return
    except OSError as error:
      reason = error.strerror or type(error).__name__
      if time.monotonic() >= deadline:
        break
      time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
  raise DistributedError(
      f'no coordinator answered at --coordinator_address={coordinator_address} '
      f'within {timeout_s:g} s (--coordinator_timeout; last try: {reason}): check '
      f'that process 0 is running with the same --coordinator_address, that '
      f'{host} is its address as seen from this host and that port {port} is '
      f'open between the hosts')


def _abort_after(timeout_s: float, line: str) -> threading.Timer:
  """A started timer that prints `line` and ends the process (exit 1) unless
  cancelled within timeout_s: JAX's wait cannot be interrupted from Python."""
  def give_up():
    os.write(2, f'{line}\n'.encode())
    os._exit(EXIT_START_FAILED)
  timer = threading.Timer(timeout_s, give_up)
  timer.daemon = True
  timer.start()
  return timer


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               auto: bool = False, timeout_s: float = TIMEOUT_S) -> bool:
  """Joins the multi-process run the values describe (see the module doc).

  Cross-process collectives on CPU go through gloo (JAX's CPU devices have
  no interconnect of their own); the setting only affects the CPU backend,
  so it is harmless on GPU and TPU hosts.

  Args:
    timeout_s: seconds (> 0) the whole start may take: reaching the
      coordinator, then every process joining.

  Returns:
    True if jax.distributed was initialised, False for a single process.

  Raises:
    DistributedError: bad values, or JAX could not join the cluster
      (nothing detected with auto=True, coordinator unreachable, …).
    If the processes do not all join within timeout_s, the process prints
    one 'error:' line and exits with status 1 (JAX's wait cannot be left
    any other way).
  """
  arguments = distributed_arguments(coordinator_address, num_processes,
                                    process_id, auto)
  if arguments is None:
    return False
  if not timeout_s > 0:
    raise DistributedError(f'--coordinator_timeout={timeout_s:g} must be a number of '
                           f'seconds above 0 (default {TIMEOUT_S:g})')
  started = time.monotonic()
  if not auto and process_id > 0:
    wait_for_coordinator(coordinator_address, timeout_s)
  left = max(1.0, timeout_s - (time.monotonic() - started))
  if auto:
    waited_for = 'the processes JAX detected to join (--distributed)'
  else:
    waited_for = (f'all {num_processes} processes to join the coordinator at '
                  f'{coordinator_address} (this is --process_id={process_id})')
  watchdog = _abort_after(left, (
      f'error: the multi-process start gave up after {timeout_s:g} s '
      f'(--coordinator_timeout) waiting for {waited_for}: start the same command '
      f'on every host with the same --coordinator_address and --num_processes and '
      f'each its own --process_id, or raise --coordinator_timeout'))
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    # JAX's own limit comes after ours: its expiry is a C++ abort.
    jax.distributed.initialize(**arguments,
                               initialization_timeout=math.ceil(left) + 60)
  except (RuntimeError, ValueError) as error:
    how = ('--distributed (automatic cluster detection)' if auto else
           f'--coordinator_address={coordinator_address} '
           f'--num_processes={num_processes} --process_id={process_id}')
    reason = ' '.join(str(error).split()).rstrip('.') or type(error).__name__
    hint = ('; outside a Cloud TPU pod, SLURM or Open MPI job pass '
            '--coordinator_address, --num_processes and --process_id instead'
            if auto else '')
    raise DistributedError(f'could not start the multi-process run with {how}: '
                           f'{reason}{hint}') from error
  finally:
    watchdog.cancel()
  return True
