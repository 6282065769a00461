"""Pre-emption, kill -9, corrupt checkpoints, NaNs, incompatible workdirs.

Each scenario runs the real CLI in a subprocess on the smoke config and
compares with an uninterrupted run of the same command.
"""
import glob
import os
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from cli_runner import kill_9
from conftest import smoke_config
from test_train import cli_command, restored_state, run_cli, tree_digest
from moco_jax.runtime import checkpointing
from moco_jax.runtime.metric_writer import read_metrics

STEPS = 24
ARGS = (f'--config.train.num_steps={STEPS}', '--config.train.log_every=1',
        '--config.train.checkpoint_every=8', '--config.train.keep_checkpoints=3')


def config_for(data_dir):
  return smoke_config(data_dir, **{'train.num_steps': STEPS})


@pytest.fixture(scope='module')
def reference(tiny_data_dir, tmp_path_factory):
  """An uninterrupted run: checkpoints 8, 16, 24."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run_cli(workdir, tiny_data_dir, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def wait_for(condition, process, what, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, f'run ended before {what}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.01)


def logged_steps(workdir):
  return len(read_metrics(workdir)) if os.path.exists(workdir) else 0


def saving_now(workdir):
  return bool(glob.glob(os.path.join(workdir, 'checkpoints', '*tmp*')))


def complete_steps(workdir):
  return checkpointing.Checkpointer(workdir).all_steps()


def assert_same_final_state(data_dir, workdir, reference_workdir):
  config = config_for(data_dir)
  want = restored_state(config, reference_workdir, STEPS)
  got = restored_state(config, workdir, STEPS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               want, got)


def test_sigterm_saves_exits_0_and_rerun_equals_uninterrupted(tiny_data_dir, tmp_path,
                                                              reference):
  workdir = str(tmp_path / 'run')
  process = subprocess.Popen(**cli_command(workdir, tiny_data_dir, *ARGS),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  wait_for(lambda: logged_steps(workdir) >= 2, process, 'step 2')
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  saved = complete_steps(workdir)
  assert len(saved) >= 1 and saved[-1] < STEPS
  assert f'SIGTERM: saved step {saved[-1]}' in stdout + stderr
  assert saved[-1] == read_metrics(workdir)[-1]['step']     # saved where it stopped
  result = run_cli(workdir, tiny_data_dir, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_final_state(tiny_data_dir, workdir, reference)


def test_kill_9_at_any_moment_never_leaves_a_half_checkpoint(tiny_data_dir, tmp_path,
                                                             reference):
  workdir = str(tmp_path / 'run')
  moments = [
      ('before the first save', lambda: logged_steps(workdir) >= 2 and not saving_now(workdir)
       and not complete_steps(workdir)),
      ('during a save', lambda: saving_now(workdir)),
      ('after a save', lambda: complete_steps(workdir) and
       complete_steps(workdir)[-1] > max(seen_steps, default=0)),
  ]
  seen_steps = []
  for what, condition in moments:
    process = subprocess.Popen(**cli_command(workdir, tiny_data_dir, *ARGS),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(condition, process, what)
    kill_9(process)
    steps = complete_steps(workdir)                          # what resume would see
    for step in steps:                                       # each one is whole
      restored_state(config_for(tiny_data_dir), workdir, step)
    seen_steps = steps
  result = run_cli(workdir, tiny_data_dir, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_final_state(tiny_data_dir, workdir, reference)


def largest_file(directory):
  files = [p for p in glob.glob(os.path.join(directory, '**', '*'), recursive=True)
           if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tiny_data_dir, tmp_path,
                                                             reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  victim = largest_file(os.path.join(workdir, 'checkpoints', str(STEPS), 'state'))
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 2)
  result = run_cli(workdir, tiny_data_dir, *ARGS[1:], f'--config.train.num_steps={STEPS + 4}')
  assert result.returncode == 0, result.stderr[-3000:]
  bad = os.path.join(workdir, 'checkpoints', str(STEPS))
  assert f'warning: checkpoint {bad} is unreadable' in result.stdout + result.stderr
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', str(STEPS)))
  # It resumed from step 16: steps 17… were logged again, and it finished.
  assert [e['step'] for e in read_metrics(workdir)][STEPS:STEPS + 1] == [17]
  assert complete_steps(workdir)[-1] == STEPS + 4


def test_no_readable_checkpoint_is_a_clear_error(tiny_data_dir, tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  for step in complete_steps(workdir):
    os.remove(largest_file(os.path.join(workdir, 'checkpoints', str(step), 'state')))
  result = run_cli(workdir, tiny_data_dir, *ARGS)
  assert result.returncode == 2
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert f'error: no readable checkpoint in {checkpoints}' in result.stderr
  assert 'Traceback' not in result.stderr


def test_exploding_lr_stops_with_nan_error_and_keeps_last_good_checkpoint(
    tiny_data_dir, tmp_path, reference):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  result = run_cli(workdir, tiny_data_dir, *ARGS[1:], f'--config.train.num_steps={STEPS + 8}',
                   '--config.optim.base_lr=1e30', '--config.optim.schedule=constant')
  assert result.returncode == 3, result.stderr[-3000:]
  last_good = os.path.join(workdir, 'checkpoints', str(STEPS))
  error = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(error) == 1 and 'non-finite training detected at step' in error[0]
  assert f'last good checkpoint: {last_good}' in error[0]
  assert complete_steps(workdir) == [8, 16, STEPS]           # nothing saved after
  state = restored_state(config_for(tiny_data_dir), workdir, STEPS)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_workdir_of_an_incompatible_run_is_refused(tiny_data_dir, reference):
  before = tree_digest(reference)
  result = run_cli(reference, tiny_data_dir, *ARGS, '--config.model.head=linear',
                   '--config.moco.queue_size=128')
  assert result.returncode == 2
  error = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(error) == 1 and error[0].startswith('error: cannot resume from ')
  assert "model.head: 'mlp' in the checkpoint, 'linear' now" in error[0]
  assert 'moco.queue_size: 64 in the checkpoint, 128 now' in error[0]
  assert tree_digest(reference) == before


def test_abandoned_orbax_reads_are_silenced_and_nothing_else(monkeypatch):
  """After a failed restore, Python's 'Exception ignored in: <coroutine …>'
  reports of orbax's abandoned reads are dropped; other ones still print."""
  import sys
  import types
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', seen.append)
  checkpointing._silence_abandoned_orbax_reads()
  checkpointing._silence_abandoned_orbax_reads()        # idempotent

  def coroutine_from(filename):
    namespace = {}
    exec(compile('async def read():\n  raise ValueError\n', filename, 'exec'), namespace)
    return namespace['read']()

  orbax_read = coroutine_from(os.path.join('site-packages', 'orbax', 'serialization.py'))
  other = coroutine_from(os.path.join('site-packages', 'mine.py'))
  for obj in (orbax_read, other):
    sys.unraisablehook(types.SimpleNamespace(object=obj, exc_value=ValueError()))
    obj.close()
  assert [u.object for u in seen] == [other]


def test_stderr_of_a_failed_restore_is_held_back_even_from_late_threads(capfd):
  """What tensorstore's threads print at file-descriptor level, interleaved,
  after a failed restore is dropped (late writes included); a block that did
  not fail writes everything out afterwards."""
  import threading
  pieces = [b"    raise RuntimeError('Event loop is closed')", b'Traceback (most recent call last):',
            b'\n', b'    self._check_closed()', b'Traceback (most recent call last):', b'\n']
  late = lambda: [os.write(2, piece) for piece in pieces]
  with checkpointing._stderr_held_back_on_failure(grace_seconds=0.3) as failed:
    late()
    failed[0] = True
    threading.Timer(0.05, late).start()
  os.write(2, b'after\n')
  with checkpointing._stderr_held_back_on_failure(grace_seconds=0.3):
    os.write(2, b'kept\n')
  assert capfd.readouterr().err == 'after\nkept\n'
