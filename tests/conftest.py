"""Shared test setup: 8 fake CPU devices and a tiny on-disk TFDS dataset."""
import importlib.util
import os

# Must be set before JAX initialises its backends.
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# With libtpu installed (the plan's tests: pip install -e ".[tpu]") JAX would
# also try to open a TPU, and libtpu warns on stderr that there is none.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DATASET = 'tiny_images'


def build_tiny_dataset(data_dir, num_train=64, num_test=32, size=16, classes=4,
                       seed=0):
  """Writes a TFDS dataset `tiny_images` (uint8 images, labels) to data_dir.

  Images are class-dependent colour blobs plus noise, so classes are
  separable by colour alone.
  """
  import tensorflow as tf
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(seed)
  palette = rng.integers(0, 256, (classes, 3))

  def split(n):
    labels = rng.integers(0, classes, n)
    noise = rng.normal(0, 20, (n, size, size, 3))
    images = np.clip(palette[labels][:, None, None, :] + noise, 0, 255)
    return tf.data.Dataset.from_tensor_slices(
        {'image': images.astype(np.uint8), 'label': labels.astype(np.int64)})

  builder = tfds.dataset_builders.TfDataBuilder(
      name=TINY_DATASET, version='1.0.0', data_dir=str(data_dir),
      split_datasets={'train': split(num_train), 'test': split(num_test)},
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(size, size, 3)),
          'label': tfds.features.ClassLabel(num_classes=classes)}))
  builder.download_and_prepare()
  return str(data_dir)


def made_once_per_session(tmp_path_factory, name, make):
  """The directory `name`, made by `make(path)` once per test session, also when
  pytest-xdist spreads the session over worker processes: the first worker to
  ask makes it under a file lock in the base temp dir the workers share, the
  others wait for the lock and reuse it. Tests must not change it: one that
  needs to change a run works on a copy (`copy_of`)."""
  import fcntl
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent                  # pytest-N/, above each worker's popen-gwN/
  path = root / name
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)    # released when the file closes
    done = root / f'{name}.done'
    if not done.exists():
      if path.exists():                 # a make() that failed in another worker
        import shutil
        shutil.rmtree(path)
      path.mkdir()
      make(str(path))
      done.touch()
  return str(path)


def copy_of(directory, tmp_path):
  """A private copy of a shared directory (a run a test is about to change)."""
  import shutil
  copy = os.path.join(str(tmp_path), os.path.basename(directory))
  shutil.copytree(directory, copy)
  return copy


@pytest.fixture(scope='session')
def tiny_data_dir(tmp_path_factory):
  return made_once_per_session(tmp_path_factory, 'tfds', build_tiny_dataset)


def smoke_config(data_dir, **overrides):
  """configs/smoke.py pointed at the tiny dataset, with dotted overrides."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dataset = TINY_DATASET
  config.data.data_dir = data_dir
  for dotted, value in overrides.items():
    section, key = dotted.split('.') if '.' in dotted else (None, dotted)
    target = config[section] if section else config
    target[key] = value
  return config


# Recompiling the same step in several tests (and CLI subprocesses) is the
# suite's main cost on CPU: share XLA's persistent compilation cache.
_CACHE = os.path.join(REPO, '.pytest_cache', 'jax_compilation_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')


@pytest.fixture(scope='session')
def smoke_pretrain_dir(tiny_data_dir, tmp_path_factory):
  """A pretraining workdir of the smoke config with checkpoints at steps 0, 2, 4,
  made once per session and shared by every test (and xdist worker) that reads
  a finished run; read-only by convention (see made_once_per_session).

  Step 0 (the initialisation, saved before training) separates the tiny
  classes better than step 4, whose BN running statistics have moved only
  part of the way (momentum 0.9) towards the activations' statistics.
  """
  def pretrain(workdir):
    from moco_jax import train
    from moco_jax.experiment import Experiment
    from moco_jax.runtime import checkpointing
    config = smoke_config(tiny_data_dir, **{'train.keep_checkpoints': 3})
    checkpointer = checkpointing.Checkpointer(workdir, keep=3)
    checkpointer.save(0, Experiment(config).init_state(), config.to_dict())
    checkpointer.wait()
    checkpointer.close()
    train.train_and_evaluate(config, workdir)               # resumes at step 0
  return made_once_per_session(tmp_path_factory, 'pretrain', pretrain)


def restored_state(config, workdir, step):
  """The checkpoint of `workdir` at `step`, restored on the host."""
  import jax
  from moco_jax.experiment import Experiment
  from moco_jax.runtime import checkpointing
  experiment = Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir)
  state = checkpointer.restore(experiment.abstract_state(), step)
  checkpointer.close()
  return jax.device_get(state)


def straight_and_resumed_runs(config, tmp_path, monkeypatch, run=None):
  """Trains `config` with `run(config, workdir)` (default: pretraining's
  train_and_evaluate) into tmp_path/straight uninterrupted, and into
  tmp_path/interrupted with a crash during step 3 (checkpoint 2 kept) followed
  by a rerun that resumes; returns the two workdirs."""
  from moco_jax import train
  from moco_jax.data import pipeline
  from moco_jax.runtime import checkpointing
  run = run or train.train_and_evaluate
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  run(config, straight)

  real_next, served = pipeline.TrainBatches.__next__, []

  def dies_at_the_fourth_batch(batches):
    # The loop reads batch n+1 while step n runs, after step n-1's checkpoint
    # was started: a KeyboardInterrupt here (not Ctrl-C, which the loop turns
    # into a stop request) hits during step 3.
    if len(served) == 3:
      raise KeyboardInterrupt
    served.append(1)
    return real_next(batches)

  monkeypatch.setattr(pipeline.TrainBatches, '__next__', dies_at_the_fourth_batch)
  with pytest.raises(KeyboardInterrupt):
    run(config, interrupted)
  monkeypatch.setattr(pipeline.TrainBatches, '__next__', real_next)
  assert checkpointing.Checkpointer(interrupted).all_steps() == [2]
  run(config, interrupted)             # resumes at step 2
  return straight, interrupted


def recipe_config(filename, pretrain_dir, data_dir, **overrides):
  """configs/<filename> with `pretrained` and the tiny dataset filled in and
  dotted overrides ('train.batch_size': 16) applied."""
  spec = importlib.util.spec_from_file_location(
      filename.removesuffix('.py'), os.path.join(REPO, 'configs', filename))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.pretrained = pretrain_dir
  config.data.dataset, config.data.data_dir = TINY_DATASET, data_dir
  config.data.image_size = 16
  for dotted, value in overrides.items():
    section, key = dotted.split('.') if '.' in dotted else (None, dotted)
    (config[section] if section else config)[key] = value
  return config


# Under `-n auto --dist loadfile` each test file runs whole on one worker, and
# pytest-xdist by default hands out files in order of their number of tests,
# so the files that take longest (few tests, each a CLI run or a notebook)
# started last and one worker finished minutes after the other. Hand out the
# longest first instead (slowest first, from `--durations` on a 2-core CPU),
# then the rest by number of tests, as xdist would.
LONGEST_FILES_FIRST = ('test_readme.py', 'test_cli_errors.py', 'test_notebook.py',
                       'test_interrupts.py', 'test_reliability.py', 'test_v3.py',
                       'test_multihost.py', 'test_train.py')


def pytest_configure(config):
  if hasattr(config.option, 'loadscopereorder'):   # pytest-xdist is loaded
    config.option.loadscopereorder = False         # keep the order made below


def pytest_collection_modifyitems(session, config, items):
  tests_in = {}
  for item in items:
    tests_in[item.path.name] = tests_in.get(item.path.name, 0) + 1

  def rank(item):
    name = item.path.name
    first = (LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST
             else len(LONGEST_FILES_FIRST))
    return first, -tests_in[name], name
  items.sort(key=rank)                             # stable: order within a file kept
