"""Orbax checkpoints of a training state (for pretraining the whole MoCoState,
queue and rng included; for linear evaluation the linear layer's) + the config.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete; on gs://, where there is no rename, orbax marks a
finished step with a commit_success file), so an interrupted save never
becomes "latest". Every path goes through runtime/paths.py.
"""
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from moco_jax.runtime import paths

PyTree = Any  # a flax.struct dataclass of arrays

CHECKPOINT_SUBDIR = 'checkpoints'
CORRUPT_SUBDIR = 'corrupt_checkpoints'


class CheckpointError(RuntimeError):
  """No usable checkpoint, or one that does not fit the config."""


def _silence_abandoned_orbax_reads() -> None:
  """Drops Python's reports of orbax reads abandoned by a failed restore.

  When one array of a checkpoint cannot be read, orbax gives up on the rest
  and leaves their coroutines holding exceptions; Python prints each one
  ("Exception ignored in: <coroutine ...>" and a traceback) whenever they are
  collected, long after the failure was reported to the user as one line.
  Only those coroutines are filtered; anything else reaches the previous hook.
  """
  previous = sys.unraisablehook
  if getattr(previous, 'drops_orbax_reads', False):
    return

  def hook(unraisable):
    code = getattr(unraisable.object, 'cr_code', None)
    if code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename:
      return
    previous(unraisable)

  hook.drops_orbax_reads = True
  sys.unraisablehook = hook


@contextlib.contextmanager
def _stderr_held_back_on_failure(grace_seconds: float):
  """Holds back file descriptor 2; writes it out afterwards unless the block
  raised or set `failed[0]`, in which case it is dropped after waiting
  `grace_seconds` more.

  Why: after a checkpoint read fails, orbax closes its event loop while
  tensorstore still completes the other reads, and each completion prints
  "RuntimeError: Event loop is closed" with a traceback from its own thread,
  straight to fd 2 (past Python's hooks), interleaved mid-line with the
  others. The failure itself is reported on stdout and by the caller. Those
  threads may still be printing seconds later on a loaded machine, so after a
  failure fd 2 stays held until nothing was written to it for grace_seconds.
  """
  failed = [False]
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield failed
    except BaseException:
      failed[0] = True
      raise
    finally:
      if failed[0]:
        _wait_until_quiet(held.fileno(), grace_seconds)
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if not failed[0]:
        held.seek(0)
        sys.stderr.write(held.read().decode(errors='replace'))
        sys.stderr.flush()


def _wait_until_quiet(fd: int, quiet_seconds: float, limit_seconds: float = 30.0) -> None:
  """Returns once the file behind `fd` has not grown for quiet_seconds (at
  most limit_seconds after the call)."""
  deadline = time.monotonic() + limit_seconds
  size, unchanged_since = os.fstat(fd).st_size, time.monotonic()
  while time.monotonic() < deadline:
    time.sleep(0.1)
    now_size = os.fstat(fd).st_size
    if now_size != size:
      size, unchanged_since = now_size, time.monotonic()
    elif time.monotonic() - unchanged_since >= quiet_seconds:
      return


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def readable_reason(error: BaseException) -> str:
  """The first line of an orbax/TensorStore error without the bindings'
  internals ("<bound method pybind11_detail…>", object addresses)."""
  import re
  text = str(error).splitlines()[0] if str(error) else ''
  text = re.sub(r'<bound method [^>]*>|<[^<>]* object at 0x[0-9a-f]+>', '', text)
  text = ' '.join(text.replace('()', '').split()).strip(' :;,')
  return f'{type(error).__name__}: {text[:200]}' if text else type(error).__name__


class Checkpointer:
  """Keeps the newest `keep` checkpoints of a run under workdir/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.workdir = paths.absolute(workdir)
    self.directory = paths.join(self.workdir, CHECKPOINT_SUBDIR)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self._open()

  def remove_unfinished_saves(self):
    """Deletes what a killed process left of a save in progress.

    Orbax writes into 'STEP.orbax-checkpoint-tmp…' and renames it when
    complete, so these were never checkpoints; left in place, a new save of
    the same step would collide with them. Only the run that owns the
    workdir may call this (it would break another process's save).
    """
    if jax.process_index() != 0 or not paths.isdir(self.directory):
      return
    for name in paths.listdir(self.directory):
      if '.orbax-checkpoint-tmp' in name:
        try:
          paths.rmtree(paths.join(self.directory, name))
        except Exception:  # pylint: disable=broad-except  # as rmtree(ignore_errors)
          pass
    self._manager.reload()

  def _open(self):
    self._manager = ocp.CheckpointManager(
        self.directory, options=self._options, item_names=('state', 'config'))

  def path(self, step: int) -> str:
    return paths.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, config: dict) -> None:
    """Starts an (asynchronous) save of the state and the config at `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(json.loads(json.dumps(config)))))

  def restore(self, abstract_state: PyTree, step: int | None = None) -> PyTree:
    """The state at `step` (default: newest) with abstract_state's structure,
    shapes and shardings (e.g. from jax.eval_shape)."""
    step = self.latest_step() if step is None else step
    _silence_abandoned_orbax_reads()
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def restore_newest_valid(self, abstract_state: PyTree) -> PyTree:
    """The newest checkpoint that reads back whole.

    An unreadable one (truncated or missing file, bad metadata) is moved to
    workdir/corrupt_checkpoints/ with a warning and the previous one is tried.

    Raises:
      CheckpointError naming the directory when none is readable.
    """
    moved = []
    with _stderr_held_back_on_failure(grace_seconds=1.0) as failed:
      for step in sorted(self.all_steps(), reverse=True):
        try:
          return self.restore(abstract_state, step)
        except Exception as error:  # orbax/tensorstore raise many types
          failed[0] = True
          moved.append(self._quarantine(step, error))
    raise CheckpointError(
        f'no readable checkpoint in {self.directory}'
        + (f' (unreadable ones moved to {", ".join(moved)})' if moved else '')
        + '; use a new --workdir to start over')

  def _quarantine(self, step: int, error: Exception) -> str:
    # Every process found the checkpoint unreadable; process 0 moves it while
    # the others wait (before: all see the same free destination name).
    _sync_processes(f'quarantine checkpoint {step}')
    destination = paths.join(self.workdir, CORRUPT_SUBDIR, str(step))
    while paths.exists(destination):
      destination += '_'
    self._manager.close()
    _sync_processes(f'quarantine checkpoint {step}: named')
    if jax.process_index() == 0:
      paths.makedirs(paths.dirname(destination))
      paths.move_tree(self.path(step), destination)   # gs://: copy, then delete
    _sync_processes(f'quarantine checkpoint {step}: moved')
    self._open()
    reason = readable_reason(error)
    logging.warning('checkpoint %s is unreadable (%s); moved it to %s and '
                    'falling back to the previous one', self.path(step), reason,
                    destination)
    print(f'warning: checkpoint {self.path(step)} is unreadable ({reason}); '
          f'moved to {destination}, falling back to the previous one', flush=True)
    return destination

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
