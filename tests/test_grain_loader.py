"""data.loader='grain' (data/grain_loader.py): the tf.data pipeline's batches
read at random from a TFDS array_record preparation, exact order and resume
at any size, one shard of each epoch per process, a one-line error for a
TFRecord-only preparation."""
import io
import os
import signal
import subprocess

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cli_runner import python
from conftest import REPO, smoke_config
from test_shuffle import CLASSES, assert_classes_mixed
from moco_jax.data import grain_loader, inputs, pipeline
from moco_jax.data.info import DatasetError

PER_CLASS, BATCH, SIZE = 32, 32, 16
TWIN = 'twin_images'


def jpeg(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=90)
  return out.getvalue()


def build_twin(data_dir, file_format: str, per_class=PER_CLASS, unique_labels=False):
  """The same examples as a TFDS dataset `twin_images` in `file_format`:
  JPEGs of varied sizes (16-40 px a side), sorted by class (10 classes), or
  with unique_labels each example its own label."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(3)
  count = CLASSES * per_class
  labels = np.arange(count) if unique_labels else np.repeat(np.arange(CLASSES), per_class)
  images = [jpeg(rng.integers(0, 256, (rng.integers(16, 41), rng.integers(16, 41), 3),
                              dtype=np.uint8)) for _ in range(count)]

  def examples():
    for image, label in zip(images, labels):
      yield {'image': image, 'label': int(label)}

  split = tf.data.Dataset.from_generator(examples, output_signature={
      'image': tf.TensorSpec([], tf.string), 'label': tf.TensorSpec([], tf.int64)})
  split = split.map(lambda e: {'image': tf.io.decode_jpeg(e['image']), 'label': e['label']})
  tfds.dataset_builders.TfDataBuilder(
      name=TWIN, version='1.0.0', data_dir=str(data_dir), file_format=file_format,
      split_datasets={'train': split},
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.ClassLabel(num_classes=int(labels.max()) + 1)}),
  ).download_and_prepare()
  return str(data_dir)


@pytest.fixture(scope='module')
def twins(tmp_path_factory):
  """{'tfrecord': data_dir, 'array_record': data_dir} of the same examples."""
  root = tmp_path_factory.mktemp('twins')
  return {fmt: build_twin(root / fmt, fmt) for fmt in ('tfrecord', 'array_record')}


def data_config(data_dir, loader='auto', **overrides):
  config = smoke_config(data_dir, **{'data.image_size': SIZE, 'data.loader': loader,
                                     **overrides})
  config.data.dataset = TWIN
  return config.data


def assert_same_batches(expected, got):
  for want, have in zip(expected, got, strict=True):
    assert sorted(want) == sorted(have)
    for key in want:
      assert want[key].dtype == have[key].dtype and want[key].shape == have[key].shape, key
      np.testing.assert_array_equal(have[key], want[key], err_msg=key)


def test_the_twins_hold_the_same_records_in_the_same_order(twins):
  """The premise of the comparisons below: both preparations list the same
  encoded images in the same order (what each loader then reads)."""
  import tensorflow_datasets as tfds
  from_tfrecord = [(r['image'], r['label']) for r in tfds.load(
      TWIN, data_dir=twins['tfrecord'], split='train',
      decoders={'image': tfds.decode.SkipDecoding()}).as_numpy_iterator()]
  source = tfds.data_source(TWIN, data_dir=twins['array_record'], split='train',
                            decoders={'image': tfds.decode.SkipDecoding()}, download=False)
  from_array_record = [(source[i]['image'], source[i]['label']) for i in range(len(source))]
  assert from_tfrecord == from_array_record and len(source) == CLASSES * PER_CLASS


def test_tf_data_and_grain_give_the_same_batches_over_an_epoch_boundary(twins):
  """Images (both views), labels and order, with 2 Grain worker processes."""
  tfdata = pipeline.pretrain_batches(data_config(twins['tfrecord'], 'tf.data'), BATCH, seed=4)
  grain = grain_loader.pretrain_batches(data_config(twins['array_record'], 'grain'), BATCH,
                                        seed=4, workers=2)
  steps = tfdata.steps_per_epoch + 2
  assert grain.steps_per_epoch == tfdata.steps_per_epoch == CLASSES * PER_CLASS // BATCH
  try:
    assert_same_batches([next(tfdata) for _ in range(steps)], [next(grain) for _ in range(steps)])
  finally:
    grain.close()


def test_linear_evaluation_batches_are_the_same_too(twins):
  """One view and int32 labels (labelled_batches), from a mid-epoch step."""
  tfdata = pipeline.labelled_batches(data_config(twins['tfrecord'], 'tf.data'), BATCH,
                                     seed=1, start_step=7)
  grain = grain_loader.labelled_batches(data_config(twins['array_record'], 'grain'), BATCH,
                                        seed=1, start_step=7, workers=0)
  assert_same_batches([next(tfdata) for _ in range(5)], [next(grain) for _ in range(5)])


def test_an_epoch_read_with_grain_is_a_uniform_permutation(twins):
  """Chi-square of (batch × class) counts as tests/test_shuffle.py, on a
  class-sorted split; every image exactly once per epoch; a new order in
  the next epoch."""
  batches = grain_loader.pretrain_batches(data_config(twins['array_record'], 'grain'),
                                          BATCH, seed=0, workers=0)
  steps = batches.steps_per_epoch
  counts = assert_classes_mixed(batches, steps)
  assert (counts.sum(0) == PER_CLASS).all()
  second = np.array([np.bincount(next(batches)['label'], minlength=CLASSES)
                     for _ in range(steps)])
  assert (second.sum(0) == PER_CLASS).all() and not np.array_equal(counts, second)


def test_a_resumed_grain_loader_reads_nothing_before_its_step(twins, monkeypatch):
  """Started at a step inside epoch 1, it gives the uninterrupted batches
  and decodes no image of an earlier position."""
  config = data_config(twins['array_record'], 'grain')
  straight = grain_loader.pretrain_batches(config, BATCH, seed=2, workers=0)
  start = straight.steps_per_epoch + 3
  expected = [next(straight) for _ in range(start + 3)][start:]
  decoded = []
  real_call = grain_loader._Views.__call__

  def recording(views, encoded, epoch, position):
    decoded.append((epoch, position))
    return real_call(views, encoded, epoch, position)

  monkeypatch.setattr(grain_loader._Views, '__call__', recording)
  resumed = grain_loader.pretrain_batches(config, BATCH, seed=2, start_step=start, workers=0)
  assert_same_batches(expected, [next(resumed) for _ in range(3)])
  assert min(decoded) == (1, 3 * BATCH), min(decoded)


def test_folders_give_the_same_batches_on_both_loaders(tmp_path):
  root = tmp_path / 'images'
  rng = np.random.default_rng(0)
  for label in range(3):
    os.makedirs(root / f'class{label}')
    for index in range(12):
      size = (rng.integers(16, 30), rng.integers(16, 30), 3)
      (root / f'class{label}' / f'{index}.jpg').write_bytes(
          jpeg(rng.integers(0, 256, size, dtype=np.uint8)))
  (root / 'class1' / '5.jpg').write_bytes(b'not an image')   # skipped by both
  config = data_config('', 'grain')
  config.dataset = f'folder:{root}'
  config.train_split = '.'
  assert grain_loader.resolve_loader(config) == 'grain'
  # 9 divides the 36 files: every epoch reads the bad one.
  tfdata, grain = (pipeline.pretrain_batches(config, 9, seed=3),
                   grain_loader.pretrain_batches(config, 9, seed=3, workers=0))
  assert_same_batches([next(tfdata) for _ in range(6)], [next(grain) for _ in range(6)])
  assert grain.skipped_images == tfdata.skipped_images == 1
  assert grain.unreadable_names == tfdata.unreadable_names == [
      os.fsencode(root / 'class1' / '5.jpg')]


def test_auto_picks_grain_for_array_record_without_the_approximate_shuffle_warning(
    twins, monkeypatch, capsys):
  """Even when the split is far larger than what tf.data could permute in
  memory: no 'approximates' warning, and the exact permutation."""
  from moco_jax.data import order
  monkeypatch.setattr(order, 'IN_MEMORY_BYTES', 1)
  monkeypatch.setattr(order, '_warned', set())
  assert grain_loader.resolve_loader(data_config(twins['tfrecord'])) == 'tf.data'
  folder = data_config('')
  folder.dataset = f'folder:{REPO}/docs'              # any folder: tf.data reads it exactly
  assert grain_loader.resolve_loader(folder) == 'tf.data'
  config = data_config(twins['array_record'], worker_count=0)
  assert grain_loader.resolve_loader(config) == 'grain'
  batches = inputs.train_batches(config, BATCH, 0, 0)
  assert isinstance(batches, grain_loader.GrainTrainBatches)
  labels = next(batches)['label']
  out = capsys.readouterr().out
  assert 'approximates' not in out and "input: grain (data.loader='auto')" in out
  order_0 = grain_loader.ProcessRecords(config, 'train')
  want = [order_0.read(int(i))[1] for i in
          order.epoch_permutation(CLASSES * PER_CLASS, 0, 0, 0)[:BATCH]]
  np.testing.assert_array_equal(labels, want)


def test_grain_on_a_tfrecord_only_preparation_is_a_one_line_error(twins, tmp_path):
  with pytest.raises(DatasetError) as error:
    grain_loader.resolve_loader(data_config(twins['tfrecord'], 'grain'))
  message = str(error.value)
  version_dir = os.path.join(twins['tfrecord'], TWIN, '1.0.0')
  assert '\n' not in message
  assert (f'tfds convert_format --dataset_version_dir={version_dir} '
          '--out_file_format=array_record') in message
  with pytest.raises(DatasetError, match='prepared only as array_record') as error:
    grain_loader.resolve_loader(data_config(twins['array_record'], 'tf.data'))
  assert '\n' not in str(error.value)
  # The command line: exit 1 with that line, before any compile, nothing saved.
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [*python(), '-m', 'moco_jax.main', '--config=configs/smoke.py',
       f'--workdir={workdir}', f'--config.data.dataset={TWIN}',
       f'--config.data.data_dir={twins["tfrecord"]}', '--config.data.loader=grain'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'})
  assert result.returncode != 0
  lines = [line for line in (result.stdout + result.stderr).splitlines() if 'convert_format' in line]
  assert len(lines) == 1 and 'data.loader=\'grain\' needs random access' in lines[0], result.stderr[-2000:]
  assert not (workdir / 'checkpoints').exists()


def test_two_processes_read_each_epoch_exactly_once(tmp_path):
  """2 real JAX processes: each reads its own shard of every epoch; together
  every example once, none twice, and each process's batches equal tf.data's."""
  from test_multihost import child_env, free_port, run_together
  dirs = {fmt: build_twin(tmp_path / fmt, fmt, per_class=8, unique_labels=True)
          for fmt in ('tfrecord', 'array_record')}
  address, out = f'127.0.0.1:{free_port()}', tmp_path / 'out'
  out.mkdir()
  worker = [*python(), os.path.join('tests', 'grain_multihost_worker.py'),
            f'--coordinator_address={address}', '--num_processes=2',
            f'--grain_dir={dirs["array_record"]}', f'--tfdata_dir={dirs["tfrecord"]}',
            '--batch=8', '--epochs=2', f'--out={out}']
  run_together([(worker + [f'--process_id={i}'], child_env(1)) for i in range(2)], tmp_path)
  parts = [np.load(out / f'labels_{i}.npz') for i in range(2)]
  for part in parts:
    assert part['images_equal'] and np.array_equal(part['grain'], part['tfdata'])
  for epoch in range(2):
    seen = np.concatenate([part['grain'][epoch] for part in parts])
    assert sorted(seen) == list(range(CLASSES * 8))         # all 80, none twice
  assert not np.array_equal(parts[0]['grain'][0], parts[0]['grain'][1])


STEPS = 12


def cli(workdir, data_dir, loader, *extra):
  command = [*python(), '-m', 'moco_jax.main', '--config=configs/smoke.py',
             f'--workdir={workdir}', f'--config.data.dataset={TWIN}',
             f'--config.data.data_dir={data_dir}', f'--config.data.loader={loader}',
             '--config.data.worker_count=1', f'--config.train.num_steps={STEPS}',
             '--config.train.log_every=1', '--config.train.checkpoint_every=100',
             '--config.eval.knn_every=0', *extra]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return dict(args=command, cwd=REPO, env=env, text=True)


def test_grain_resume_after_sigterm_inside_an_epoch_equals_the_uninterrupted_run(tmp_path):
  """SIGTERM during epoch 1 of a Grain run (1 worker process), rerun to the
  end: the final state equals an uninterrupted run's, which also equals an
  uninterrupted tf.data run's (switching loaders changes nothing)."""
  import jax
  from test_reliability import wait_for, logged_steps
  from conftest import restored_state
  from moco_jax.runtime import checkpointing
  from moco_jax.runtime.metric_writer import read_metrics
  dirs = {fmt: build_twin(tmp_path / fmt, fmt, per_class=8) for fmt in ('tfrecord', 'array_record')}
  steps_per_epoch = CLASSES * 8 // 16                     # smoke batch 16: 5
  runs = {name: str(tmp_path / name) for name in ('tfdata', 'grain', 'interrupted')}
  for name, loader, fmt in (('tfdata', 'tf.data', 'tfrecord'), ('grain', 'grain', 'array_record')):
    result = subprocess.run(**cli(runs[name], dirs[fmt], loader), capture_output=True,
                            timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
  process = subprocess.Popen(**cli(runs['interrupted'], dirs['array_record'], 'grain'),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  wait_for(lambda: logged_steps(runs['interrupted']) >= steps_per_epoch + 1, process,
           f'step {steps_per_epoch + 1}')
  process.send_signal(signal.SIGTERM)
  stdout, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  saved = checkpointing.Checkpointer(runs['interrupted']).all_steps()[-1]
  assert f'SIGTERM: saved step {saved}' in stdout + stderr
  assert saved < STEPS and saved % steps_per_epoch, saved         # inside an epoch
  assert saved == read_metrics(runs['interrupted'])[-1]['step']
  result = subprocess.run(**cli(runs['interrupted'], dirs['array_record'], 'grain'),
                          capture_output=True, timeout=400)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resumed from step {saved}' in result.stdout + result.stderr
  config = smoke_config(dirs['array_record'], **{'data.dataset': TWIN, 'data.loader': 'grain'})
  final = {name: restored_state(config, workdir, STEPS) for name, workdir in runs.items()}
  for name in ('grain', 'interrupted'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 final['tfdata'], final[name])
