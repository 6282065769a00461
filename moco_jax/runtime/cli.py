"""What the command lines (main, knn, lincls, export, plots) share: --help
with the recipes in configs/, one-line errors instead of tracebacks, and
up-front checks of the paths the user names.

Nothing here imports JAX or TensorFlow: --help and a bad flag answer in a
fraction of a second.
"""
import ast
import glob
import os
import sys

from moco_jax.runtime import paths

EXIT_USAGE = 2
HELP_FLAGS = ('--help', '-h', '-?', '--helpshort')


def fail(message: str, code: int = EXIT_USAGE):
  """Prints `error: message` as one line on stderr and exits."""
  print(f'error: {" ".join(str(message).split())}', file=sys.stderr, flush=True)
  sys.exit(code)


def error_line(error: BaseException) -> str:
  """The message of the innermost cause that says something, on one line.

  ml_collections wraps config errors (AttributeError(KeyError(message)),
  OSError from a retry); the innermost one names the bad value.
  """
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  if isinstance(error, OSError) and error.__cause__ is not None:
    error = error.__cause__
  message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  if isinstance(error, SyntaxError):
    message = f'SyntaxError: {error.msg} ({error.filename}, line {error.lineno})'
  return ' '.join((message or type(error).__name__).split())


def config_text(config) -> str:
  """A resolved config as `key: value` lines, sections indented, values as
  one would type them after --config.KEY= (no YAML tags such as
  !!python/tuple)."""
  def lines(node, indent):
    for key, value in node.items():
      if isinstance(value, dict):
        yield f'{indent}{key}:'
        yield from lines(value, indent + '  ')
      else:
        shown = repr(tuple(value)) if isinstance(value, (tuple, list)) else (
            value if isinstance(value, str) and value else repr(value))
        yield f'{indent}{key}: {shown}'
  return '\n'.join(lines(config.to_dict(), ''))


def config_of_kind(flag_values, required_key: str, wrong_kind: str):
  """The --config file with its overrides (config_flags loads it on first
  access). One line and exit 2 when it does not load, or when it lacks
  `required_key` and so belongs to another command: `--config=FILE is not
  {wrong_kind}`."""
  from ml_collections import config_flags   # not at import: --help stays fast
  try:
    config = flag_values.config
    config.seed
  except Exception as error:  # the file's own errors, bad overrides
    fail(f'invalid --config: {error_line(error)}')
  if required_key not in config:
    fail(f'--config={config_flags.get_config_filename(flag_values["config"])} is not '
         f'{wrong_kind}')
  return config


def configs_dir() -> str | None:
  """configs/ of the working directory, else of the source checkout."""
  here = os.path.join(os.getcwd(), 'configs')
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), 'configs')
  for candidate in (here, checkout):
    if os.path.isdir(candidate):
      return candidate
  return None


# configs/ files of the evaluation commands, by kind; the rest are pretraining's.
EVALUATION_PREFIXES = {'lincls': 'lincls_', 'finetune': 'finetune_'}


def recipes(kind: str) -> list[tuple[str, str]]:
  """(path, first line of its docstring) of each recipe in configs/.

  kind: 'pretrain' (every file but lincls_*.py and finetune_*.py), 'lincls'
  (lincls_*.py) or 'finetune' (finetune_*.py).
  """
  prefix = EVALUATION_PREFIXES.get(kind)
  directory = configs_dir()
  if directory is None:
    return []
  found = []
  for path in sorted(glob.glob(os.path.join(directory, '*.py'))):
    name = os.path.basename(path)
    own = (name.startswith(prefix) if prefix else
           not name.startswith(tuple(EVALUATION_PREFIXES.values())))
    if name.startswith('_') or not own:
      continue
    try:
      with open(path) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ''
    except (OSError, SyntaxError):
      doc = ''
    shown = os.path.relpath(path) if not os.path.relpath(path).startswith('..') else path
    found.append((shown, summary(doc)))
  return found


def summary(doc: str, width: int = 110) -> str:
  """The first sentence of a docstring's first paragraph, on one line (a
  first line alone may stop mid-sentence: "ImageNet, 300"), shortened at a
  word with '…' beyond `width` characters."""
  paragraph = ' '.join(doc.strip().split('\n\n')[0].split())
  end = paragraph.find('. ')
  sentence = paragraph[:end + 1] if end >= 0 else paragraph
  if len(sentence) <= width:
    return sentence
  return sentence[:width].rsplit(' ', 1)[0].rstrip(',;:') + ' …'



def recipe_list(kind: str) -> str:
  found = recipes(kind)
  width = max((len(path) for path, _ in found), default=0)
  lines = [f'  {path:<{width}}  {line}' for path, line in found]
  return '\n'.join(lines) if lines else '  (no configs/ folder found here)'


def flag_help(flag_values, names) -> str:
  """`--name: help (default: value)` for each flag, without dumping configs."""
  lines = []
  for name in names:
    flag = flag_values[name]
    default = flag.default
    shown = '' if default is None or hasattr(default, 'to_dict') else f' (default: {default!r})'
    lines.append(f'  --{name}: {flag.help}{shown}')
  return '\n'.join(lines)


def handle_help(argv, usage) -> None:
  """Prints usage() and exits 0 if argv asks for help."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(usage())
    sys.exit(0)


def config_file_problem(value: str | None, kind: str = 'pretrain') -> str | None:
  """Why --config=value cannot be a config file, or None.

  The value may carry an argument after ':' (config_flags' `file.py:arg`).
  """
  recipes_hint = ', '.join(path for path, _ in recipes(kind))
  hint = f' (recipes: {recipes_hint})' if recipes_hint else ''
  if not value:
    return f'--config is required: --config=configs/NAME.py{hint}'
  path = value
  if not os.path.isfile(path) and ':' in value:
    path = value.split(':', 1)[0]
  if os.path.isdir(path):
    return f'--config={value} is a directory, not a config file{hint}'
  if not os.path.isfile(path):
    return f'--config={value}: no such file{hint}'
  if not path.endswith('.py'):
    return f'--config={value} is not a Python config file (.py with get_config()){hint}'
  return None


def workdir_problem(path: str | None, flag: str = '--workdir',
                    must_exist: bool = False) -> str | None:
  """Why `path` cannot be (or, with must_exist, is not) a run directory, or None.

  Checks, without creating anything: not empty, not a file, the nearest
  existing parent is a writable directory. For gs:// and other URLs: the
  bucket is reachable with these credentials (paths.access_problem).
  """
  if not path:
    return f'{flag} is required: {flag}=DIR'
  if paths.is_url(path):
    problem = paths.access_problem(path, flag)
    if problem is None and must_exist and not paths.isdir(path):
      problem = f'{flag}={path}: no such directory'
    return problem
  if os.path.exists(path) and not os.path.isdir(path):
    return f'{flag}={path} is a file, not a directory'
  if must_exist:
    return None if os.path.isdir(path) else f'{flag}={path}: no such directory'
  parent = os.path.abspath(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    return f'{flag}={path}: {parent} is a file, not a directory'
  if not os.access(parent, os.W_OK | os.X_OK):
    return f'{flag}={path}: {parent} is not writable'
  return None


# What TensorFlow 2.21 prints on import whatever TF_CPP_MIN_LOG_LEVEL says.
TENSORFLOW_IMPORT_NOISE = (
    'All log messages before absl::InitializeLog() is called',
    'oneDNN custom operations are on',
    'cpu_feature_guard.cc',
    'To enable the following instructions:',
)


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow and TFDS with their start-up log lines dropped.

  They are written by C++ at file-descriptor level, so stderr's descriptor is
  sent to a temporary file during the import; every other line written then
  (a real error included) is passed on afterwards.
  """
  if 'tensorflow' in sys.modules:
    return
  import tempfile
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401
      import tensorflow_datasets  # noqa: F401
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode(errors='replace').splitlines(True)
              if not any(noise in line for noise in TENSORFLOW_IMPORT_NOISE)]
      if kept:
        sys.stderr.write(''.join(kept))
        sys.stderr.flush()


def flag_value(argv, name: str) -> str | None:
  """The value of --name=VALUE or --name VALUE in argv (the last one), or None."""
  value = None
  for index, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and index + 1 < len(argv):
      value = argv[index + 1]
  return value


def check_flagfiles(argv, depth: int = 0) -> None:
  """Fails with one line if a --flagfile in argv (or in a flagfile) cannot be
  read. Call before config_flags.DEFINE_config_*: they expand the flagfiles
  of sys.argv as they are defined, and a missing one is a traceback there."""
  for index, arg in enumerate(argv[1:] if depth == 0 else argv, start=1):
    name = None
    if arg.startswith('--flagfile='):
      name = arg.split('=', 1)[1]
    elif arg == '--flagfile' and index < len(argv):
      name = argv[index + 1] if depth == 0 else argv[index]
    if name is None:
      continue
    from moco_jax.runtime import paths
    try:
      text = paths.read_bytes(paths.absolute(name, expand_user=True)).decode()
      lines = [line.strip() for line in text.splitlines()
               if line.strip() and not line.startswith('#')]
    except OSError as error:
      fail(f'--flagfile={name}: cannot read it ({error.strerror or error})')
    if depth < 8:
      check_flagfiles(lines, depth + 1)


def check_config_flag(argv, kind: str = 'pretrain') -> None:
  """Fails with one line unless --config names a loadable file; before absl
  parses the flags, which loads the file and words its errors for itself."""
  problem = config_file_problem(flag_value(argv, 'config'), kind)
  if problem:
    fail(problem)


def parse_command_line(flag_values, argv, usage, config_kind: str | None = None,
                       problem=None):
  """absl's flag parsing for our commands (an absl `flags_parser`).

  --help prints `usage()` and exits 0; with `config_kind` the --config file is
  checked before absl loads it; absl's own errors, stray arguments and
  `problem()` (a str or None, checked after parsing, e.g. the workdir) each end
  the program with one `error:` line, exit 2.
  """
  # --flagfile=F is expanded first: its --config and other flags count as
  # if typed (absl would expand it only while parsing, after our checks).
  try:
    argv = [argv[0]] + flag_values.read_flags_from_files(argv[1:], force_gnu=False)
  except Exception as error:  # a missing or unreadable flagfile
    fail(f'invalid command line: {error_line(error)}')
  handle_help(argv, usage)
  if config_kind:
    check_config_flag(argv, config_kind)
  try:
    argv = flag_values(argv)
  except Exception as error:  # absl and config_flags raise many kinds
    fail(f'invalid command line: {error_line(error)}')
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])} (flags look like --name=value)')
  message = problem() if problem else None
  if message:
    fail(message)
  return argv
