"""gs:// end to end against a local GCS emulator (tests/gcs_emulator.py).

The workdir is gs://test-bucket/run and the TFDS data_dir gs://test-bucket/tfds:
pretraining, SIGTERM and resume (the final state equals a local
uninterrupted run's), the kNN CLI, an export (byte-equal to the same export of
the local run), a corrupt checkpoint quarantined by copy-then-delete, a
folder:gs://… dataset listed and read as its local copy, and the one-line
errors of an unreachable bucket. Opt-in marker `gcs` (several CLI runs, about
3 minutes on 2 cores); .ci/run runs them.
"""
import json
import time
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from cli_runner import python
from conftest import REPO
from test_train import cli_command, restored_state, run_cli
from conftest import smoke_config

pytestmark = [pytest.mark.gcs, pytest.mark.skipif(
    not os.environ.get('MOCO_JAX_TEST_GCS'),
    reason='opt-in (several CLI runs): MOCO_JAX_TEST_GCS=1 pytest tests/test_gcs.py')]

STEPS = 6
ARGS = (f'--config.train.num_steps={STEPS}', '--config.train.log_every=1',
        '--config.train.checkpoint_every=2', '--config.train.keep_checkpoints=3')
RUN = 'gs://test-bucket/run'


@pytest.fixture(scope='module')
def gcs():
  """The emulator and TLS proxy in a subprocess; its env in os.environ (so
  this process's TF and tensorstore and every CLI subprocess use it)."""
  process = subprocess.Popen([sys.executable, os.path.join(REPO, 'tests', 'gcs_emulator.py')],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  env = json.loads(process.stdout.readline())
  with pytest.MonkeyPatch.context() as patch:
    for name, value in env.items():
      patch.setenv(name, value)
    yield env
  process.stdin.close()
  process.wait(timeout=30)


def copy_tree(source, destination):
  """A local directory tree -> destination (a URL), through tf.io.gfile."""
  import tensorflow as tf
  for root, _, files in os.walk(source):
    relative = os.path.relpath(root, source)
    target = destination if relative == '.' else f'{destination}/{relative}'
    for name in files:
      tf.io.gfile.copy(os.path.join(root, name), f'{target}/{name}', overwrite=True)


@pytest.fixture(scope='module')
def gcs_data_dir(gcs, tiny_data_dir):
  copy_tree(tiny_data_dir, 'gs://test-bucket/tfds')
  return 'gs://test-bucket/tfds'


@pytest.fixture(scope='module')
def local_reference(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = run_cli(workdir, tiny_data_dir, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def assert_same_state(data_dir, workdir, reference):
  config = smoke_config(data_dir, **{'train.num_steps': STEPS})
  want, got = restored_state(config, reference, STEPS), restored_state(config, workdir, STEPS)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), want, got)


@pytest.fixture(scope='module')
def gs_run(gcs, gcs_data_dir, tiny_data_dir, local_reference):
  """Pretraining into gs://, SIGTERM after step 2, resumed to the end."""
  from moco_jax.runtime.metric_writer import read_metrics
  process = subprocess.Popen(**cli_command(RUN, gcs_data_dir, *ARGS),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while len(read_metrics(RUN)) < 2:
    assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=180)
  assert process.returncode == 0, stderr[-3000:]
  assert 'SIGTERM: saved step' in stdout + stderr
  interrupted_at = read_metrics(RUN)[-1]['step']
  assert interrupted_at < STEPS
  result = run_cli(RUN, gcs_data_dir, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return interrupted_at


def test_pretraining_into_gs_sigterm_and_resume_equal_a_local_run(
    gs_run, tiny_data_dir, local_reference):
  from moco_jax.runtime import paths
  from moco_jax.runtime.metric_writer import read_metrics
  assert_same_state(tiny_data_dir, RUN, local_reference)
  steps = [event['step'] for event in read_metrics(RUN) if 'loss' in event]
  assert steps[-1] == STEPS and set(range(1, STEPS + 1)) <= set(steps)
  local = {e['step']: e['loss'] for e in read_metrics(local_reference) if 'loss' in e}
  remote = {e['step']: e['loss'] for e in read_metrics(RUN) if 'loss' in e}
  assert remote[STEPS] == pytest.approx(local[STEPS], rel=1e-6)
  events = paths.listdir(paths.join(RUN, 'tensorboard'))
  assert events and all(name.startswith('events.out.tfevents') for name in events)
  assert not any('tmp' in name for name in paths.listdir(paths.join(RUN, 'checkpoints')))


def test_knn_cli_reads_and_logs_into_a_gs_workdir(gs_run):
  from moco_jax.runtime.metric_writer import read_metrics
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([*python(), '-m', 'moco_jax.knn', f'--workdir={RUN}',
                           '--step=4', '--config.eval.batch_size=24', '--config.eval.knn_k=10'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  from moco_jax.runtime import paths
  lines = paths.read_bytes(paths.join(RUN, 'knn_evaluations.jsonl')).decode().splitlines()
  last = json.loads(lines[-1])
  assert last['step'] == 4 and 0 <= last['knn_top1'] <= 100


def run_export(workdir, *args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([*python(), '-m', 'moco_jax.export', f'--workdir={workdir}',
                         '--format=flax', f'--step={STEPS}', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_export_into_gs_is_byte_equal_to_the_local_export(gs_run, local_reference, tmp_path):
  from moco_jax.runtime import paths
  remote = run_export(RUN)
  assert remote.returncode == 0, remote.stderr[-3000:]
  written = remote.stdout.strip().splitlines()[-1]
  assert written.startswith(f'{RUN}/export/')
  local = run_export(local_reference, f'--output={tmp_path}/backbone.msgpack')
  assert local.returncode == 0, local.stderr[-3000:]
  with open(tmp_path / 'backbone.msgpack', 'rb') as f:
    assert paths.read_bytes(written) == f.read()


def test_corrupt_gs_checkpoint_is_copied_to_quarantine_then_deleted(
    gs_run, gcs_data_dir, tiny_data_dir, local_reference):
  import tensorflow as tf
  from moco_jax.runtime import paths
  newest = f'{RUN}/checkpoints/{STEPS}'
  files = [tf.io.gfile.join(root, name) for root, _, names in tf.io.gfile.walk(newest)
           for name in names]
  files = [(tf.io.gfile.stat(path).length, path) for path in files]
  size, largest = max(files)
  whole = paths.read_bytes(largest)
  paths.write_bytes_atomic(largest, whole[:size // 2])   # truncated
  result = run_cli(RUN, gcs_data_dir, *ARGS)
  assert result.returncode == 0, result.stderr[-3000:]
  moved = f'{RUN}/corrupt_checkpoints/{STEPS}'
  assert f'moved to {moved}' in result.stdout + result.stderr
  assert paths.read_bytes(largest.replace(newest, moved)) == whole[:size // 2]
  assert_same_state(tiny_data_dir, RUN, local_reference)   # retrained from step 4


def png(value):
  import tensorflow as tf
  return tf.io.encode_png(np.full((4, 4, 3), value, np.uint8)).numpy()


def test_folder_dataset_on_gs_lists_and_reads_as_its_local_copy(gcs, tmp_path):
  import ml_collections
  import tensorflow as tf
  from moco_jax.data import sources
  from moco_jax.runtime import paths
  tree = {'train/cat/a.png': png(1), 'train/cat/deep/b.png': png(2),
          'train/dog/c.PNG': png(3), 'train/dog/notes.txt': b'x', 'val/dog/d.png': png(4)}
  for name, data in tree.items():
    paths.write_bytes_atomic(str(tmp_path / name), data)
    paths.write_bytes_atomic(f'gs://test-bucket/images/{name}', data)
  listings = {}
  for root in (str(tmp_path), 'gs://test-bucket/images'):
    config = ml_collections.ConfigDict({'dataset': f'folder:{root}', 'train_split': 'train',
                                        'eval_split': 'val'})
    listings[root] = [sources._folder_split(config, split) for split in ('train', 'val')]
  for local, remote in zip(listings[str(tmp_path)], listings['gs://test-bucket/images']):
    assert local.class_names == remote.class_names == ('cat', 'dog')
    assert local.labels == remote.labels
    relative = [p.decode()[len(str(tmp_path)):] for p in local.paths]
    assert [p.decode()[len('gs://test-bucket/images'):] for p in remote.paths] == relative
    for path, name in zip(remote.paths, relative):
      assert tf.io.read_file(path).numpy() == tree[name.lstrip('/')]


def test_missing_bucket_is_one_clear_line(gcs, tiny_data_dir):
  result = run_cli('gs://no-such-bucket/run', tiny_data_dir)
  assert result.returncode == 2
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'gs://no-such-bucket/' in errors[0], result.stderr[-2000:]
  assert 'does not exist' in errors[0] and 'Traceback' not in result.stderr
