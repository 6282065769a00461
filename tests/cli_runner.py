"""Runs many `python -m moco_jax.<command> ...` command lines for the tests at
the cost of one interpreter start.

Each command line as its own process costs an interpreter plus the imports of
TensorFlow, JAX and the package (seconds on 2 cores), which dominated the
command-line fuzz tests. Here one runner process imports them once and then
forks a child per command line: the child runs the module as `python -m`
would (runpy, `__name__ == '__main__'`, sys.argv[0] the module's file, the
repository first on sys.path) with stdout and stderr going to their own
files, and exits with the module's exit status. A child starts from the same
state as a fresh `python -m` after its imports: nothing else ran in the
runner (no JAX backend, no absl flags defined).

What a fork cannot show is output printed while those modules import; the
runner returns its own import-time stderr so a test can require it empty.
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_commands(commands, env=None, timeout=900):
  """Runs each command line (a list: module name, then its arguments) in a
  forked child of one runner process, one after another.

  Returns:
    (results, import_stderr): one SimpleNamespace(returncode, stdout, stderr)
    per command line, and what the runner printed on stderr while importing.
  """
  env = dict(os.environ if env is None else env)
  runner = subprocess.run([sys.executable, __file__], input=json.dumps(commands), cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
  if runner.returncode != 0:
    raise RuntimeError(f'the command-line runner failed: {runner.stderr[-3000:]}')
  report = json.loads(runner.stdout)
  return [SimpleNamespace(**r) for r in report['results']], report['import_stderr']


def _child(argv) -> int:
  """In the forked child: the module as `python -m` runs it; its exit status."""
  import runpy
  import traceback
  sys.argv = [argv[0]] + list(argv[1:])
  try:
    runpy.run_module(argv[0], run_name='__main__', alter_sys=True)
    return 0
  except SystemExit as done:
    if done.code is None or isinstance(done.code, int):
      return done.code or 0
    print(done.code, file=sys.stderr)   # sys.exit('message'): as the interpreter does
    return 1
  except BaseException:  # pylint: disable=broad-except  # as an uncaught exception would
    traceback.print_exc()
    return 1


def _serve(commands) -> dict:
  import tempfile
  sys.path.insert(0, REPO)              # `python -m` from the repository root
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')   # what the commands set first
  import_stderr = tempfile.TemporaryFile()
  saved_stderr = os.dup(2)
  os.dup2(import_stderr.fileno(), 2)
  try:
    import absl.app  # noqa: F401
    import ml_collections.config_flags  # noqa: F401
    import jax  # noqa: F401
    import tensorflow  # noqa: F401
    import tensorflow_datasets  # noqa: F401
    import moco_jax.train  # noqa: F401
    import moco_jax.evaluation.linear  # noqa: F401
  finally:
    sys.stderr.flush()
    os.dup2(saved_stderr, 2)
  import_stderr.seek(0)
  results = []
  for argv in commands:
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
      os.dup2(out.fileno(), 1)
      os.dup2(err.fileno(), 2)
      code = _child(argv)
      import atexit
      atexit._run_exitfuncs()   # as the interpreter does on exit  # pylint: disable=protected-access
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(code)
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    results.append({'returncode': os.waitstatus_to_exitcode(status),
                    'stdout': out.read().decode(errors='replace'),
                    'stderr': err.read().decode(errors='replace')})
  return {'results': results, 'import_stderr': import_stderr.read().decode(errors='replace')}


if __name__ == '__main__':
  report = _serve(json.load(sys.stdin))
  sys.stdout.write(json.dumps(report))
