"""Runs the tests' `python ...` command lines at the cost of a fork, not of an
interpreter start.

A command-line test process pays an interpreter plus the imports of
TensorFlow, JAX and the package before it does anything: about 7 s of CPU
on this project's 2-core machines, for each of the suite's ~90 command
lines. Here one server process per test worker imports them once; each
command line is a forked child of it that runs as `python` would have run
it, with the caller's stdin, stdout and stderr (passed over a Unix socket),
environment, working directory and arguments, and `__name__ ==
'__main__'`. Nothing else runs in the server before the fork: no JAX
backend, no absl flags, no TensorFlow op, so the child starts from the state
of a fresh `python` after its imports.

The caller starts `python()` + [args] as an ordinary process (a small
client). The client forwards the signals a test sends it (SIGINT, SIGTERM,
...) to the forked child and exits as the child did, with its status or by
the same signal, so `subprocess.Popen` semantics hold, with two exceptions:
- SIGKILL of the client cannot be forwarded (the server then kills the
  child itself, a moment later): a test kill -9s the run with kill_9(), which
  sends SIGKILL to the forked child and waits for the client to end.
- Environment variables that the preloaded modules read while importing
  (TF_*, TFDS_*, PYTHON*, ...) must equal the server's, apart from those of
  JAX's options (JAX_ENABLE_COMPILATION_CACHE, ...), which the child sets
  with jax.config.update; a command line with others, or with interpreter
  options, runs as a real process (the client execs the interpreter).

MOCO_JAX_TEST_CLI_SERVER=0 turns the server off (every command line a real
process), to compare.
"""
import atexit
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.abspath(__file__)
# Read by the preloaded modules while they import: a command line must agree
# with the server on these, or it runs as a real process.
IMPORT_TIME_ENV = ('JAX_', 'TF_', 'TFDS_', 'PYTHON', 'LD_', 'XLA_PYTHON_', 'CUDA',
                   'TPU_', 'GRAIN', 'OMP_', 'MKL_', 'OPENBLAS', 'ABSL')
PRELOADED = ('absl.app', 'ml_collections.config_flags', 'jax', 'flax.linen', 'optax',
             'orbax.checkpoint', 'tensorflow', 'tensorflow_datasets', 'grain',
             'moco_jax.train', 'moco_jax.evaluation.linear',
             'moco_jax.evaluation.finetune', 'moco_jax.evaluation.fewshot',
             'moco_jax.weights.export')
FORWARDED_SIGNALS = ('SIGINT', 'SIGTERM', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2')

_server = None


def python() -> list:
  """The argv prefix that runs Python for a test: [interpreter, this file,
  --server=SOCKET] while this process's server runs (started on first use),
  else [interpreter]. Use it as `[*python(), '-m', 'moco_jax.main', ...]`."""
  global _server
  if os.environ.get('MOCO_JAX_TEST_CLI_SERVER', '1') == '0':
    return [sys.executable]
  if _server is None:
    _server = _start_server()
  return [sys.executable, RUNNER, f'--server={_server.socket_path}']


def with_python_on_path(env: dict) -> dict:
  """`env` with a `python` first on PATH that is python() (for bash scripts)."""
  prefix = python()
  if len(prefix) == 1:
    return dict(env)
  shim_dir = os.path.join(_server.directory, 'bin')
  if not os.path.exists(shim_dir):
    os.makedirs(shim_dir)
    shim = os.path.join(shim_dir, 'python')
    with open(shim, 'w') as f:
      f.write('#!/bin/sh\nexec ' + ' '.join(f"'{p}'" for p in prefix) + ' "$@"\n')
    os.chmod(shim, 0o755)
  return dict(env, PATH=shim_dir + os.pathsep + env.get('PATH', ''))


def kill_9(process: subprocess.Popen) -> None:
  """SIGKILL the run `process` (started with python()) stands for, and wait
  for it: its forked child under a server (a client cannot forward SIGKILL),
  else the process itself."""
  import signal
  import time
  if len(process.args) > 2 and process.args[1] == RUNNER:
    pid_file = _pid_file(process.args[2].split('=', 1)[1], process.pid)
    while not os.path.exists(pid_file) and process.poll() is None:
      time.sleep(0.001)
    if process.poll() is None:
      with open(pid_file) as f:
        os.kill(int(f.read()), signal.SIGKILL)
  else:
    process.kill()
  process.wait()


def _pid_file(socket_path, client_pid) -> str:
  return os.path.join(os.path.dirname(socket_path), f'client_{client_pid}.pid')


def import_stderr() -> str:
  """What the server printed on stderr while importing the preloaded modules
  (a CLI must print nothing while importing)."""
  python()
  if _server is None:
    return ''
  with open(_server.import_stderr) as f:
    return f.read()


def run_commands(commands, env=None, timeout=900):
  """Runs each command line (a list: module name, then its arguments) as
  `python -m` would, one after another.

  Returns:
    (results, import_stderr): one CompletedProcess (returncode, stdout,
    stderr) per command line, and what the preloaded imports printed on
    stderr.
  """
  env = dict(os.environ if env is None else env)
  results = [subprocess.run([*python(), '-m', *argv], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
             for argv in commands]
  return results, import_stderr()


# --- the server's side, in the process python() starts ----------------------

def _start_server():
  directory = tempfile.mkdtemp(prefix='moco_jax_cli_')
  socket_path = os.path.join(directory, 'socket')
  stderr_path = os.path.join(directory, 'import_stderr')
  with open(stderr_path, 'w') as stderr:
    process = subprocess.Popen([sys.executable, RUNNER, '--serve', socket_path],
                               cwd=REPO, env=dict(os.environ), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
  if process.stdout.readline().strip() != 'ready':
    process.wait()
    with open(stderr_path) as f:
      raise RuntimeError(f'the command-line server did not start: {f.read()[-3000:]}')

  def stop():
    process.terminate()
    process.wait()
  atexit.register(stop)
  return SimpleNamespace(process=process, socket_path=socket_path, directory=directory,
                         import_stderr=stderr_path)


def _receive_request(connection):
  """(argv, env, cwd, [stdin, stdout, stderr fds]) sent by _client."""
  head, fds, _, _ = socket.recv_fds(connection, 8, 3)
  while len(head) < 8:
    head += connection.recv(8 - len(head))
  size, = struct.unpack('>Q', head)
  payload = b''
  while len(payload) < size:
    chunk = connection.recv(size - len(payload))
    if not chunk:
      raise ConnectionError('the client went away mid-request')
    payload += chunk
  request = json.loads(payload)
  return request['argv'], request['env'], request['cwd'], fds


def _runnable(argv, env) -> str | None:
  """Why this command line must run as a real process, or None."""
  if not argv or (argv[0].startswith('-') and argv[0] not in ('-m', '-c')):
    return f'interpreter options {argv[:1]}'
  if argv[0] in ('-m', '-c') and len(argv) < 2:
    return 'nothing to run'
  for key in set(env) | set(os.environ):
    if key.startswith(IMPORT_TIME_ENV) and env.get(key) != os.environ.get(key):
      if not (key in env and _jax_option(key) is not None):
        return f'{key} differs from the server'
  return None


def _jax_option(key) -> str | None:
  """The JAX option that the environment variable `key` sets when JAX is
  imported (JAX_ENABLE_COMPILATION_CACHE: jax_enable_compilation_cache), or
  None. The child sets such an option with jax.config.update instead."""
  import jax
  name = key.lower()
  return name if key.startswith('JAX_') and name in jax.config.values else None


def _set_jax_options(env) -> None:
  """In the child: the JAX options whose environment variables differ from
  the server's, parsed as JAX parses them (booleans, integers, strings)."""
  import jax
  for key, text in env.items():
    if key.startswith('JAX_') and text != os.environ.get(key) and _jax_option(key):
      current = jax.config.values[_jax_option(key)]
      if isinstance(current, bool):
        value = text.strip().lower() in ('y', 'yes', 't', 'true', 'on', '1')
      elif isinstance(current, int):
        value = int(text)
      else:
        value = text
      jax.config.update(_jax_option(key), value)


def _run_as_main(argv) -> int:
  """In the forked child: what `python ARGV` runs; its exit status."""
  import runpy
  import signal
  import traceback
  import types
  try:
    if argv[0] == '-m':
      sys.argv = [argv[1]] + argv[2:]
      sys.path[0] = os.getcwd()
      runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
    elif argv[0] == '-c':
      sys.argv = ['-c'] + argv[2:]
      sys.path[0] = ''
      main = types.ModuleType('__main__')
      sys.modules['__main__'] = main
      exec(compile(argv[1], '<string>', 'exec'), main.__dict__)  # pylint: disable=exec-used
    else:
      sys.argv = list(argv)
      sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))
      runpy.run_path(argv[0], run_name='__main__')
    return 0
  except SystemExit as done:
    if done.code is None or isinstance(done.code, int):
      return done.code or 0
    print(done.code, file=sys.stderr)   # sys.exit('message'), as the interpreter does
    return 1
  except KeyboardInterrupt:
    traceback.print_exc()               # then die by SIGINT, as the interpreter does
    sys.stderr.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    return 130
  except BaseException:  # pylint: disable=broad-except  # as an uncaught exception would
    traceback.print_exc()
    return 1


def _child(argv, env, cwd, fds) -> None:
  """In the forked child: become the command line's process; never returns."""
  import random
  import threading
  import numpy as np
  for target, fd in enumerate(fds):
    os.dup2(fd, target)
    os.close(fd)
  _set_jax_options(env)
  os.environ.clear()
  os.environ.update(env)
  os.chdir(cwd)
  random.seed()
  np.random.seed()
  code = _run_as_main(argv)
  try:
    threading._shutdown()  # pylint: disable=protected-access  # as interpreter exit does
    atexit._run_exitfuncs()  # pylint: disable=protected-access
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(code)


def _serve(socket_path) -> None:
  import importlib
  import selectors
  import signal
  sys.path[0] = REPO        # was tests/, this file's folder
  for module in PRELOADED:
    importlib.import_module(module)
  sys.stderr.flush()
  parent = os.getppid()
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(socket_path)
  listener.listen(64)
  selector = selectors.DefaultSelector()
  selector.register(listener, selectors.EVENT_READ)
  children = {}   # pid -> the client's connection
  print('ready', flush=True)
  while os.getppid() == parent:
    for key, _ in selector.select(timeout=0.02):
      if key.fileobj is listener:
        connection, _ = listener.accept()
        try:
          argv, env, cwd, fds = _receive_request(connection)
        except (OSError, ValueError, ConnectionError):
          connection.close()
          continue
        why_not = _runnable(argv, env)
        if why_not:
          for fd in fds:
            os.close(fd)
          connection.sendall(f'real {why_not}\n'.encode())
          connection.close()
          continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
          selector.close()
          listener.close()
          for other in children.values():
            other.close()
          connection.close()
          _child(argv, env, cwd, fds)
        for fd in fds:
          os.close(fd)
        connection.sendall(f'pid {pid}\n'.encode())
        children[pid] = connection
        selector.register(connection, selectors.EVENT_READ, pid)
      else:   # the client closed its end: it was killed (SIGKILL); so is its run
        if not key.fileobj.recv(1):
          selector.unregister(key.fileobj)
          try:
            os.kill(key.data, signal.SIGKILL)
          except ProcessLookupError:
            pass
    while children:
      pid, status = os.waitpid(-1, os.WNOHANG)
      if pid == 0:
        break
      connection = children.pop(pid, None)
      if connection is not None:
        try:
          connection.sendall(f'exit {status}\n'.encode())
        except OSError:
          pass
        try:
          selector.unregister(connection)
        except (KeyError, ValueError):
          pass
        connection.close()
  for pid in children:   # the test worker went away: so do its runs
    os.kill(pid, signal.SIGKILL)


# --- the client's side: the process a test starts -----------------------------

def _client(socket_path, argv) -> None:
  """Hands argv, the environment, the working directory and fds 0-2 to the
  server, forwards signals to the forked child, exits as it did."""
  import signal
  try:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(socket_path)
  except OSError:
    os.execv(sys.executable, [sys.executable, *argv])
  payload = json.dumps({'argv': argv, 'env': dict(os.environ), 'cwd': os.getcwd()}).encode()
  socket.send_fds(connection, [struct.pack('>Q', len(payload))], [0, 1, 2])
  connection.sendall(payload)
  child, pending = None, []

  def forward(signum, _):
    if child is None:
      pending.append(signum)
    else:
      os.kill(child, signum)
  for name in FORWARDED_SIGNALS:
    signal.signal(getattr(signal, name), forward)
  reply = connection.makefile('r')
  first = reply.readline().split(' ', 1)
  if first[0] != 'pid':
    connection.close()
    os.execv(sys.executable, [sys.executable, *argv])   # 'real': run it as a real process
  child = int(first[1])
  pid_file = _pid_file(socket_path, os.getpid())   # for kill_9
  with open(pid_file + '.tmp', 'w') as f:
    f.write(str(child))
  os.replace(pid_file + '.tmp', pid_file)
  for signum in pending:
    os.kill(child, signum)
  last = reply.readline().split()
  if not last or last[0] != 'exit':
    os._exit(1)
  status = int(last[1])
  if os.WIFSIGNALED(status):
    signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
  os._exit(os.waitstatus_to_exitcode(status))


if __name__ == '__main__':
  if sys.argv[1] == '--serve':
    _serve(sys.argv[2])
  else:
    _client(sys.argv[1].split('=', 1)[1], sys.argv[2:])
