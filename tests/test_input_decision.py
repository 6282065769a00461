"""data.on_device is decided once per run, from every split the run reads.

The case of issue 20: data.on_device='auto' with kNN off, and
data.on_device_max_fraction between the training split's size and the size
of training + eval splits. The run reads only the training split, which
fits, so it must train from the devices; a second decision that also counts
the eval split used to hand host batches to the device step
(KeyError: 'indices').
"""
import jax
import numpy as np

from conftest import smoke_config
from moco_jax import train
from moco_jax.data import device
from moco_jax.runtime.mesh import make_mesh

# The tiny dataset of conftest: 64 train and 32 test images of 16x16x3 uint8.
TRAIN_BYTES, EVAL_BYTES = 64 * 16 * 16 * 3, 32 * 16 * 16 * 3


def between_the_two_sizes() -> float:
  """An on_device_max_fraction under which the training split fits on a
  device and training + eval do not (as data/device.resolve_on_device
  counts: the bytes of the splits against one device's memory)."""
  have = device.device_memory_bytes(make_mesh())
  fraction = (TRAIN_BYTES + EVAL_BYTES / 2) / have
  assert TRAIN_BYTES + 1 < fraction * have < TRAIN_BYTES + EVAL_BYTES
  return fraction


def test_auto_without_knn_trains_on_device_when_only_the_train_split_fits(
    tiny_data_dir, tmp_path, capsys):
  config = smoke_config(tiny_data_dir, **{
      'data.on_device': 'auto', 'eval.knn_every': 0.0, 'eval.knn_at_start': False,
      'train.num_steps': 2})
  config.data.on_device_max_fraction = between_the_two_sizes()
  metrics = train.train_and_evaluate(config, str(tmp_path / 'run'))
  summary = capsys.readouterr().out
  assert ', on device)' in summary, summary        # the split was placed on the devices
  assert np.isfinite(metrics['loss']) and 'knn_top1' not in metrics
  # With kNN on, the same fraction no longer fits both splits: the host path.
  config.eval.knn_every = 1.0
  from moco_jax.experiment import Experiment
  assert not Experiment(config).on_device
  assert jax.device_count() == 8
