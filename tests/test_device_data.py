"""Device-resident data (data.on_device): the crop + resize against PIL and
the host path, the window distribution against the host sampler, the epoch
order against the host pipeline, 1 device = 8 devices, exact resume, and the
npz format read without TensorFlow."""
import os
import subprocess
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from cli_runner import python
from conftest import REPO, smoke_config
from test_crops import TOLERANCES, assert_same_distribution, statistics, tf_windows
from moco_jax import train
from moco_jax.augment import resize as augment_resize, views as device_views
from moco_jax.data import device, device_batches, inputs, npz, pipeline
from moco_jax.data.info import DatasetError
from moco_jax.experiment import Experiment
from moco_jax.runtime import checkpointing
from moco_jax.runtime.metric_writer import read_metrics


def device_config(data_dir, **overrides):
  return smoke_config(data_dir, **{'data.on_device': True, **overrides})


# ----------------------------------------------------------------------------
# Crop + antialiased bilinear resize + flip.

# (H, W, S): CIFAR's own size (mostly upscaled crops), a downscale, an
# ImageNet-like image to 224 and a 2x upscale.
RESIZE_CASES = [(32, 32, 32), (64, 48, 16), (375, 500, 224), (32, 32, 64)]


def random_windows(rng, height, width, count):
  h = rng.integers(1, height + 1, count)
  w = rng.integers(1, width + 1, count)
  return np.stack([rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w], 1)


@pytest.mark.parametrize('height, width, size', RESIZE_CASES)
def test_resized_crop_matches_pil_crop_then_resize(height, width, size):
  """torchvision's PIL path: image.crop(window).resize(S, BILINEAR), which
  antialiases when downscaling. PIL resamples in two passes, rounding to
  uint8 in between, with 22-bit fixed-point weights; its weights are
  non-negative and sum to 1, so its result is within 1 level of exact
  arithmetic rounded once (ours): |diff| <= 1 everywhere, and rare."""
  rng = np.random.default_rng(height + size)
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  crop = jax.jit(augment_resize.resized_crop, static_argnums=2)
  diffs = []
  for top, left, h, w in random_windows(rng, height, width, 12):
    ours = np.asarray(crop(image, (top, left, h, w), size)).astype(int)
    pil = np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h)).resize(
        (size, size), Image.BILINEAR)).astype(int)
    diffs.append(np.abs(ours - pil))
  diffs = np.stack(diffs)
  assert diffs.max() <= 1
  assert diffs.mean() < 0.3     # measured 0.14-0.19 on noise images


@pytest.mark.parametrize('height, width, size', RESIZE_CASES)
def test_resized_crop_matches_the_host_pipelines_resize(height, width, size):
  """The host path: tf.image.resize(antialias=True) of the cropped image,
  rounded once: the same arithmetic up to float32 order, so at most a
  rounding tie flips (measured < 0.2% of values, by 1)."""
  import tensorflow as tf
  rng = np.random.default_rng(size)
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  crop = jax.jit(augment_resize.resized_crop, static_argnums=2)
  for top, left, h, w in random_windows(rng, height, width, 12):
    ours = np.asarray(crop(image, (top, left, h, w), size)).astype(int)
    host = pipeline._resize(tf.constant(image[top:top + h, left:left + w]), size)
    diff = np.abs(ours - host.numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_flip_mirrors_and_whole_window_at_own_size_is_identity():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  whole = (0, 0, 32, 32)
  np.testing.assert_array_equal(augment_resize.resized_crop(image, whole, 32), image)
  window = (3, 5, 20, 17)
  plain = np.asarray(augment_resize.resized_crop(image, window, 24))
  flipped = np.asarray(augment_resize.resized_crop(image, window, 24, flip=True))
  np.testing.assert_array_equal(flipped, plain[:, ::-1])


def sampled_views(height, width, scale, steps=40, batch=500):
  """Windows and flips as the training step draws them: crop_rngs of
  (rng, step, view) for several steps and both views."""
  sample = jax.jit(augment_resize.sample_views, static_argnums=(1, 2))
  windows, flips = [], []
  for step in range(steps // 2):
    for view in (0, 1):
      keys = device_views.crop_rngs(jax.random.PRNGKey(3), step, view, batch)
      (top, left, h, w), flip = sample(keys, (height, width), scale)
      windows.append(np.stack([top, left, h, w], 1))
      flips.append(np.asarray(flip))
  return np.concatenate(windows), np.concatenate(flips)


@pytest.mark.parametrize('height, width, scale', [(32, 32, (0.08, 1.0)),
                                                   (375, 500, (0.2, 1.0))])
def test_device_windows_follow_the_host_sampler(height, width, scale):
  """20,000 windows of the device path against 20,000 of the host sampler
  (data/crops.py, itself checked against torchvision in test_crops.py):
  mean area within 0.01, area quantiles within 0.02, edge contact within
  0.02; flips are fair."""
  windows, flips = sampled_views(height, width, scale)
  host = tf_windows(height, width, scale)
  assert set(TOLERANCES) >= {'mean area', 'area q10/50/90', 'edge share'}
  assert_same_distribution(windows, host, height, width)
  assert abs(statistics(windows, height, width)['mean area']
             - statistics(host, height, width)['mean area']) <= 0.01
  assert abs(flips.mean() - 0.5) < 0.02


def test_device_views_are_the_sampled_windows_resized():
  """random_resized_crop_flip = resized_crop of sample_views' windows."""
  images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), np.uint8)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  views = augment_resize.random_resized_crop_flip(images, keys, 16, (0.08, 1.0))
  (top, left, h, w), flip = augment_resize.sample_views(keys, (32, 32), (0.08, 1.0))
  for i in range(6):
    window = (top[i], left[i], h[i], w[i])
    np.testing.assert_array_equal(
        views[i], augment_resize.resized_crop(images[i], window, 16, flip[i]))


# ----------------------------------------------------------------------------
# The split on the devices: order, equivalence, resume.


def test_epoch_order_is_the_host_pipelines(tiny_data_dir):
  """The device path's examples at each step are the host path's: the
  labels of 10 batches (across an epoch boundary) agree one by one."""
  config = device_config(tiny_data_dir)
  mesh = Mesh(jax.devices()[:1], ('data',))
  host = pipeline.pretrain_batches(config.data, 16, config.seed, start_step=1)
  split = device.device_split(config.data, 'train', mesh, drop_remainder=True)
  on_device = device_batches.DeviceTrainBatches(split, 16, config.seed, start_step=1)
  for _ in range(10):
    np.testing.assert_array_equal(next(host)['label'],
                                  split.labels[next(on_device)['indices']])


def run_steps(config, mesh, steps):
  experiment = Experiment(config, mesh)
  assert experiment.on_device
  state, step = experiment.init_state(), experiment.train_step()
  batches = experiment.train_batches(0)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, *experiment.step_inputs(next(batches)))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def test_one_device_equals_eight_devices(tiny_data_dir):
  """Gather + crop + flip + step on 8 devices = the same on 1 device with
  8 BN groups (crop keys follow the global example index)."""
  config = device_config(tiny_data_dir)
  state_8, losses_8 = run_steps(config, Mesh(jax.devices()[:8], ('data',)), 2)
  state_1, losses_1 = run_steps(config, Mesh(jax.devices()[:1], ('data',)), 2)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  tolerance = dict(rtol=2e-4, atol=2e-5)
  for part in ('params', 'target_params', 'batch_stats', 'queue'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **tolerance),
                 getattr(state_8, part), getattr(state_1, part))
  assert losses_8[0] != losses_8[1]


def test_device_data_resume_is_exact(tiny_data_dir, tmp_path, monkeypatch):
  """4 straight steps = 2 steps, a crash, a restart and 2 more."""
  config = device_config(tiny_data_dir)
  straight, interrupted = str(tmp_path / 'straight'), str(tmp_path / 'interrupted')
  train.train_and_evaluate(config, straight)
  real_next, served = device_batches.DeviceTrainBatches.__next__, []

  def dies_at_the_fourth_batch(batches):
    if len(served) == 3:
      raise KeyboardInterrupt
    served.append(1)
    return real_next(batches)

  monkeypatch.setattr(device_batches.DeviceTrainBatches, '__next__',
                      dies_at_the_fourth_batch)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, interrupted)
  monkeypatch.setattr(device_batches.DeviceTrainBatches, '__next__', real_next)
  assert checkpointing.Checkpointer(interrupted).all_steps() == [2]
  train.train_and_evaluate(config, interrupted)
  experiment = Experiment(config)

  def restored(workdir):
    checkpointer = checkpointing.Checkpointer(workdir)
    state = checkpointer.restore(experiment.abstract_state(), 4)
    checkpointer.close()
    return jax.device_get(state)

  want, got = restored(straight), restored(interrupted)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               want, got)
  logged = lambda workdir: {e['step']: e['loss'] for e in read_metrics(workdir)}
  assert logged(straight)[4] == pytest.approx(logged(interrupted)[4], rel=1e-6)


def test_knn_from_device_split_equals_host(tiny_data_dir):
  """The kNN monitor gives the same top-1 from the devices' copy as from the
  host pipeline (same images: the eval transform is a resize of the whole
  image, 16 -> 16 here, and 16 -> 8 with a real resize)."""
  from moco_jax.evaluation.knn import KnnEvaluator
  for size in (16, 8):
    results = []
    for on in (False, True):
      config = smoke_config(tiny_data_dir, **{'data.on_device': on, 'data.image_size': size,
                                              'eval.batch_size': 24, 'eval.knn_k': 5})
      experiment = Experiment(config)
      evaluator = KnnEvaluator(config, experiment.mesh)
      assert isinstance(evaluator.bank_batches, device_batches.DeviceEvalBatches) == on
      state = experiment.init_state()
      results.append(evaluator.predict(state.params['backbone'],
                                       state.batch_stats['backbone']))
    np.testing.assert_array_equal(results[0][0], results[1][0])   # labels
    assert np.mean(results[0][1] == results[1][1]) >= 0.95         # predictions


# ----------------------------------------------------------------------------
# data.on_device='auto' and npz files.


@pytest.fixture(scope='module')
def tiny_npz(tiny_data_dir, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('npz') / 'tiny.npz')
  counts = npz.export_npz('tiny_images', tiny_data_dir, ('train', 'test'), path)
  assert counts == {'train': 64, 'test': 32}
  return path


def test_npz_export_round_trips(tiny_data_dir, tiny_npz):
  import tensorflow_datasets as tfds
  config = smoke_config(tiny_data_dir)
  for split in ('train', 'test'):
    want = tfds.as_numpy(tfds.load('tiny_images', data_dir=tiny_data_dir, split=split,
                                   batch_size=-1))
    images, labels = npz.split_arrays(f'npz:{tiny_npz}', split)
    np.testing.assert_array_equal(images, want['image'])
    np.testing.assert_array_equal(labels, want['label'])
  info = inputs.dataset_info(smoke_config(tiny_data_dir, **{'data.dataset': f'npz:{tiny_npz}'}).data)
  assert (info.num_examples, info.num_classes) == (64, 4)
  assert info.num_classes == inputs.dataset_info(config.data).num_classes


def test_auto_and_bad_values(tiny_data_dir, tiny_npz):
  mesh = Mesh(jax.devices()[:1], ('data',))
  auto = smoke_config(tiny_data_dir, **{'data.on_device': 'auto'})
  assert inputs.on_device(auto.data, mesh)[0]
  auto.data.on_device_max_fraction = 1e-12
  assert not inputs.on_device(auto.data, mesh)[0]
  auto.data.dataset = f'npz:{tiny_npz}'
  with pytest.raises(DatasetError, match='on_device_max_fraction'):
    inputs.on_device(auto.data, mesh)
  off = smoke_config(tiny_data_dir, **{'data.dataset': f'npz:{tiny_npz}'})
  with pytest.raises(DatasetError, match='data.on_device=True'):
    inputs.on_device(off.data, mesh)
  off.data.on_device = 'yes'
  with pytest.raises(DatasetError, match="data.on_device='yes'"):
    inputs.on_device(off.data, mesh)
  missing = smoke_config(tiny_data_dir, **{'data.dataset': f'npz:{tiny_npz}x',
                                           'data.on_device': True})
  with pytest.raises(DatasetError, match='is not a file'):
    inputs.dataset_info(missing.data)


def test_npz_trains_and_evaluates_without_tensorflow(tiny_data_dir, tiny_npz, tmp_path):
  """train_and_evaluate with kNN on an npz: dataset, in a fresh interpreter
  where importing TensorFlow fails."""
  script = textwrap.dedent(f'''
      import sys
      sys.modules['tensorflow'] = None          # any import of it raises
      sys.modules['tensorflow_datasets'] = None
      sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
      from conftest import smoke_config
      from moco_jax import train
      config = smoke_config('', **{{'data.dataset': 'npz:{tiny_npz}',
                                    'data.on_device': True, 'eval.knn_every': 1.0,
                                    'eval.batch_size': 16}})
      metrics = train.train_and_evaluate(config, {str(tmp_path / 'run')!r})
      assert 'knn_top1' in metrics, metrics
      print('ok', metrics['knn_top1'])
      ''')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run([*python(), '-c', script], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'ok' in result.stdout


def test_on_device_true_is_refused_when_the_splits_do_not_fit(tiny_data_dir, monkeypatch):
  """64 + 32 images of 16×16×3 bytes: 73,729 bytes (one process); a device
  of 40,000 bytes takes at most 36,000 (0.9): refused, naming both sizes."""
  from moco_jax.data import device
  from moco_jax.runtime.mesh import make_mesh
  config = device_config(tiny_data_dir)
  monkeypatch.setattr(device, 'device_memory_bytes', lambda mesh: 40_000)
  need = (64 + 32) * 16 * 16 * 3 + 1
  assert need > 0.9 * 40_000
  with pytest.raises(DatasetError) as error:
    inputs.on_device(config.data, make_mesh())
  message = str(error.value)
  assert message.startswith('data.on_device=True: the splits train, test take '
                            f'{need / 2**30:.2f} GiB per device, more than 0.9 of')
  monkeypatch.setattr(device, 'device_memory_bytes', lambda mesh: 10 * need)
  assert inputs.on_device(config.data, make_mesh()) == (True, 'data.on_device=True')
