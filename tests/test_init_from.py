"""config.init_from: a fresh run starts f_q and f_k from a weights file."""
import jax
import numpy as np
import pytest

from conftest import smoke_config
from moco_jax import train
from moco_jax.runtime import checkpointing
from moco_jax.weights import convert
from moco_jax.weights import export
from moco_jax.experiment import Experiment


def encoder_variables(config):
  """The initial f_q of a run with `config` (its seed decides)."""
  state = jax.device_get(Experiment(config).init_state())
  return {'params': state.params, 'batch_stats': state.batch_stats}


def test_init_from_starts_both_encoders_from_the_file(tiny_data_dir, tmp_path):
  source_config = smoke_config(tiny_data_dir, seed=7)
  source = encoder_variables(source_config)
  path = str(tmp_path / 'start.npz')
  np.savez(path, **export.torchvision_state_dict(source, with_head=True))

  config = smoke_config(tiny_data_dir, init_from=path)
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  experiment = Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir)
  state = jax.device_get(checkpointer.restore(experiment.abstract_state()))
  checkpointer.close()

  # After 4 steps with momentum 0.99, f_k is still within a hair of the file,
  # and far from the seed-0 initialisation it would otherwise have.
  fresh = encoder_variables(smoke_config(tiny_data_dir))
  distance = lambda a, b: max(jax.tree.leaves(jax.tree.map(
      lambda x, y: float(np.abs(x - y).max()), a, b)))
  assert distance(state.target_params, source['params']) < 1e-3
  assert distance(fresh['params'], source['params']) > 0.1
  assert distance(state.params, source['params']) < 0.05


def test_init_from_with_the_wrong_architecture_lists_the_bad_keys(tiny_data_dir,
                                                                  tmp_path):
  config = smoke_config(tiny_data_dir)
  variables = encoder_variables(config)
  flat = export.torchvision_state_dict(variables, with_head=True)
  flat['layer1.0.conv3.weight'] = flat.pop('layer1.0.conv2.weight')
  path = str(tmp_path / 'renamed.npz')
  np.savez(path, **flat)
  config.init_from = path
  with pytest.raises(convert.WeightsMismatchError,
                     match=r'missing 1: layer1.0.conv2.weight; unexpected 1: '
                           r'layer1.0.conv3.weight'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
