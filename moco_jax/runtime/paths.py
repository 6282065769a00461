"""The path layer: every file the program reads or writes, local or gs://.

Local paths keep their POSIX behaviour (atomic rename, append). URLs (gs://
and any other scheme etils.epath knows; its gs:// backend is tf.io.gfile when
TensorFlow is installed) go through etils.epath, with object-storage
semantics where POSIX ones do not exist:
- no rename: a tree is moved by copying each file, then deleting the source;
- no append: `RewrittenFile` keeps the whole file in memory and rewrites the
  object at each flush. A GCS object write is atomic (the old object stays
  until the new one is complete), so a writer killed at any moment loses
  at most what it wrote since its last flush, never what was there before.
"""
import os
import shutil

from etils import epath


def is_url(path) -> bool:
  return '://' in str(path)


def absolute(path, expand_user: bool = False) -> str:
  """A local path made absolute (with expand_user, a leading ~ expanded
  first); a URL unchanged."""
  path = str(path)
  if is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path) if expand_user else path)


def join(path, *parts) -> str:
  return str(epath.Path(path).joinpath(*parts)) if is_url(path) else os.path.join(path, *parts)


def basename(path) -> str:
  return str(path).rstrip('/').rsplit('/', 1)[-1] if is_url(path) else os.path.basename(path)


def dirname(path) -> str:
  return str(epath.Path(path).parent) if is_url(path) else os.path.dirname(path)


def exists(path) -> bool:
  return epath.Path(path).exists()


def isdir(path) -> bool:
  return epath.Path(path).is_dir()


def isfile(path) -> bool:
  return epath.Path(path).is_file()


def listdir(path) -> list[str]:
  """Names (not paths) in a directory, sorted."""
  return sorted(p.name for p in epath.Path(path).iterdir())


def makedirs(path) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def rmtree(path) -> None:
  """Deletes a directory tree; a missing one is no error."""
  if exists(path):
    epath.Path(path).rmtree()


def open_file(path, mode: str = 'r'):
  """A file object: builtin open for local paths, epath (gfile) for URLs.
  Writing a URL object happens at close, all or nothing."""
  return epath.Path(path).open(mode)


def read_bytes(path) -> bytes:
  return epath.Path(path).read_bytes()


def write_bytes_atomic(path, data: bytes) -> None:
  """`path` holds either its old content or `data`, never a part.

  Local: a hidden temporary in the same directory, then os.replace. URL:
  one object write, which GCS makes visible only when complete."""
  if is_url(path):
    epath.Path(path).write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp')
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def move_tree(source, destination) -> None:
  """Moves a directory tree. Local: one rename. URL: copy every file, then
  delete the source (no rename on object storage), so an interruption leaves
  the source whole (maybe a partial copy at the destination) until the copy
  is complete."""
  if not (is_url(source) or is_url(destination)):
    shutil.move(source, destination)
    return
  source, destination = epath.Path(source), epath.Path(destination)
  for root, _, files in source.walk():
    target = destination / root.relative_to(source)
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      (root / name).copy(target / name, overwrite=True)
  source.rmtree()


class RewrittenFile:
  """An append-only text/binary file on object storage (no append there).

  Holds the whole content (the existing object's first) and rewrites the
  object at each flush(); a pre-empted writer loses only unflushed writes.
  """

  def __init__(self, path, binary: bool = False):
    self.path, self.binary = str(path), binary
    self._content = bytearray(read_bytes(path)) if exists(path) else bytearray()
    self._dirty = False

  def write(self, data) -> None:
    self._content += data if isinstance(data, (bytes, bytearray)) else data.encode()
    self._dirty = True

  def flush(self) -> None:
    if self._dirty:
      epath.Path(self.path).write_bytes(bytes(self._content))
      self._dirty = False

  def close(self) -> None:
    self.flush()


def append_text(path, text: str) -> None:
  """Appends text to a file; on object storage (no append there) the object
  is read and rewritten whole, so use RewrittenFile for a file written often."""
  if is_url(path):
    appended = RewrittenFile(path)
    appended.write(text)
    appended.close()
    return
  with open(path, 'a') as f:
    f.write(text)


def access_problem(path, flag: str) -> str | None:
  """Why a URL cannot be reached (credentials, missing bucket), or None.

  One line for the user in place of the storage client's stack trace."""
  if not is_url(path):
    return None
  scheme, rest = str(path).split('://', 1)
  bucket = f'{scheme}://{rest.split("/", 1)[0]}/'
  try:
    if not epath.Path(bucket).exists():
      return f'{flag}={path}: bucket {bucket} does not exist (or is not visible to these credentials)'
    epath.Path(path).exists()
  except Exception as error:  # pylint: disable=broad-except  # any client error
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    hint = ('; on a TPU VM the service account needs storage access; elsewhere run '
            'gcloud auth application-default login') if scheme == 'gs' else ''
    return f'cannot access {path}: {reason}{hint}'
  return None
