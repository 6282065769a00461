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
"""
import jax


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


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               auto: bool = False) -> bool:
  """Joins the multi-process run the values describe (see the module doc).

  Cross-process collectives on CPU go through gloo (JAX's CPU devices have
  no interconnect of their own); the setting only affects the CPU backend,
  so it is harmless on GPU and TPU hosts.

  Returns:
    True if jax.distributed was initialised, False for a single process.

  Raises:
    DistributedError: bad values, or JAX could not join the cluster
      (nothing detected with auto=True, coordinator unreachable, …).
  """
  arguments = distributed_arguments(coordinator_address, num_processes,
                                    process_id, auto)
  if arguments is None:
    return False
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**arguments)
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
  return True
