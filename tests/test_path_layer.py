"""The path layer (moco_jax/runtime/paths.py): nothing else touches user paths
with POSIX-only calls, local behaviour, and the one-line gs:// access error.

The gs:// behaviour itself is tests/test_gcs.py's (against an emulator).
"""
import os
import re
import sys

import pytest

from conftest import REPO
from moco_jax.runtime import paths

# Calls that only work on local paths (no gs://): outside paths.py each use
# must be on a path the program owns, named with the reason.
POSIX_ONLY = re.compile(r'\bopen\(|os\.path\b|os\.rename|os\.replace|shutil|\bglob\b|'
                        r'os\.makedirs|os\.listdir|os\.scandir|os\.walk|os\.remove')
ALLOWED = {
    # --help lists the recipe files of the checkout / working directory.
    ('moco_jax/runtime/cli.py', 'import glob'): 'recipe listing for --help',
    ('moco_jax/runtime/cli.py', "os.path.join(os.getcwd(), 'configs')"): 'recipes',
    ('moco_jax/runtime/cli.py', 'checkout = os.path.join(os.path.dirname'): 'recipes',
    ('moco_jax/runtime/cli.py', 'os.path.abspath(__file__)'): 'recipes',
    ('moco_jax/runtime/cli.py', 'if os.path.isdir(candidate):'): 'recipes',
    ('moco_jax/runtime/cli.py', "glob.glob(os.path.join(directory, '*.py'))"): 'recipes',
    ('moco_jax/runtime/cli.py', 'name = os.path.basename(path)'): 'recipes',
    ('moco_jax/runtime/cli.py', 'with open(path) as f:'): 'a recipe file, local',
    ('moco_jax/runtime/cli.py', 'os.path.relpath(path)'): 'recipes',
    # --config is a Python file that config_flags imports: always local.
    ('moco_jax/runtime/cli.py', "if not os.path.isfile(path) and ':' in value:"): '--config',
    ('moco_jax/runtime/cli.py', 'if os.path.isdir(path):'): '--config',
    ('moco_jax/runtime/cli.py', 'if not os.path.isfile(path):'): '--config',
    # workdir_problem's local branch (URLs returned before it).
    ('moco_jax/runtime/cli.py', 'if os.path.exists(path) and not os.path.isdir(path):'): 'local workdir',
    ('moco_jax/runtime/cli.py', 'return None if os.path.isdir(path) else'): 'local workdir',
    ('moco_jax/runtime/cli.py', 'parent = os.path.abspath(path)'): 'local workdir',
    ('moco_jax/runtime/cli.py', 'while not os.path.exists(parent):'): 'local workdir',
    ('moco_jax/runtime/cli.py', 'parent = os.path.dirname(parent)'): 'local workdir',
    ('moco_jax/runtime/cli.py', 'if not os.path.isdir(parent):'): 'local workdir',
    # tensorboardX's writer-factory interface names its method open.
    ('moco_jax/runtime/metric_writer.py', 'def open(self, path):'): 'an interface name',
    # A file name's extension (a string operation, no file system).
    ('moco_jax/data/sources.py', 'os.path.splitext(name)'): 'string operation',
    # Folder datasets: the local branch (bytes names); URLs use tf.io.gfile.
    ('moco_jax/data/sources.py', 'Local: os.scandir on bytes'): 'docstring',
    ('moco_jax/data/sources.py', 'entries = sorted(os.scandir('): 'local branch',
    ('moco_jax/data/sources.py', '"""os.walk of directory/class_dir'): 'docstring',
    ('moco_jax/data/sources.py', 'yield from os.walk('): 'local branch',
}


def uses_outside_the_path_layer():
  found = []
  for root, _, files in os.walk(os.path.join(REPO, 'moco_jax')):
    for name in sorted(files):
      if not name.endswith('.py'):
        continue
      path = os.path.join(root, name)
      relative = os.path.relpath(path, REPO)
      if relative == os.path.join('moco_jax', 'runtime', 'paths.py'):
        continue
      with open(path) as f:
        for number, line in enumerate(f, 1):
          if POSIX_ONLY.search(line) and not any(
              file == relative and snippet in line for file, snippet in ALLOWED):
            found.append(f'{relative}:{number}: {line.strip()}')
  return found


def test_no_posix_only_file_call_outside_the_path_layer():
  assert uses_outside_the_path_layer() == []


def test_the_grep_finds_a_new_use(tmp_path, monkeypatch):
  """The scan is live: a file with open() on a user path is reported."""
  fake_repo = tmp_path
  (fake_repo / 'moco_jax').mkdir()
  (fake_repo / 'moco_jax' / 'x.py').write_text('def f(p):\n  return open(p).read()\n')
  monkeypatch.setattr(sys.modules[__name__], 'REPO', str(fake_repo))
  assert uses_outside_the_path_layer() == ['moco_jax/x.py:2: return open(p).read()']


def test_local_paths_keep_posix_behaviour(tmp_path):
  target = str(tmp_path / 'a' / 'b.bin')
  paths.write_bytes_atomic(target, b'one')
  paths.write_bytes_atomic(target, b'two')
  assert paths.read_bytes(target) == b'two' and os.listdir(tmp_path / 'a') == ['b.bin']
  paths.makedirs(str(tmp_path / 'tree' / 'sub'))
  paths.write_bytes_atomic(str(tmp_path / 'tree' / 'sub' / 'f'), b'x')
  paths.move_tree(str(tmp_path / 'tree'), str(tmp_path / 'moved'))
  assert not os.path.exists(tmp_path / 'tree')
  assert (tmp_path / 'moved' / 'sub' / 'f').read_bytes() == b'x'
  assert paths.join(str(tmp_path), 'x') == os.path.join(str(tmp_path), 'x')
  assert paths.join('gs://b/run', 'checkpoints', '2') == 'gs://b/run/checkpoints/2'
  assert paths.absolute('gs://b/run') == 'gs://b/run'
  assert paths.access_problem(str(tmp_path), '--workdir') is None


def test_rewritten_file_keeps_the_old_content_and_appends(tmp_path):
  path = str(tmp_path / 'metrics.jsonl')
  paths.write_bytes_atomic(path, b'{"step": 1}\n')
  writer = paths.RewrittenFile(path)
  writer.write('{"step": 2}\n')
  assert paths.read_bytes(path) == b'{"step": 1}\n'       # not flushed: old content
  writer.flush()
  assert paths.read_bytes(path) == b'{"step": 1}\n{"step": 2}\n'


def test_unreachable_bucket_is_one_line_with_the_credentials_hint(monkeypatch):
  class Denied:
    def __init__(self, path):
      pass

    def exists(self):
      raise RuntimeError('Error executing an HTTP request: HTTP response code 401\n'
                         '  (a long stack of C++ frames)')
  monkeypatch.setattr(paths.epath, 'Path', Denied)
  problem = paths.access_problem('gs://bucket/run', '--workdir')
  assert problem == ('cannot access gs://bucket/run: Error executing an HTTP request: HTTP '
                     'response code 401; on a TPU VM the service account needs storage '
                     'access; elsewhere run gcloud auth application-default login')


@pytest.mark.parametrize('flag', ['--workdir'])
def test_workdir_problem_asks_the_path_layer_for_urls(monkeypatch, flag):
  from moco_jax.runtime import cli
  monkeypatch.setattr(paths, 'access_problem', lambda path, f: f'{f}={path}: denied')
  assert cli.workdir_problem('gs://b/run', flag) == f'{flag}=gs://b/run: denied'
