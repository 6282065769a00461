"""notebooks/quickstart.ipynb runs top to bottom in its QUICK setting.

The notebook executes in a Jupyter kernel of this interpreter (nbclient,
kernel 'python3' of ipykernel) on real CIFAR-10 from the repository's
../shared/tfds, with a single CPU device, so it exercises the one-device
shuffle-BN path (moco.bn_groups 8 on one device) that Colab GPUs take.
"""
import glob
import os
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from moco_jax.runtime.metric_writer import read_metrics
from moco_jax.augment.normalization import MEAN_STD

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'quickstart.ipynb')
CIFAR_DATA_DIR = os.path.join(os.path.dirname(REPO), 'shared', 'tfds')
CELL_TIMEOUT_S = 600


def test_notebook_is_stored_without_outputs():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  for cell in notebook.cells:
    if cell.cell_type == 'code':
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def _kernel_env(workdir: str) -> dict:
  """This process's environment, QUICK and WORKDIR set for the notebook, and
  one CPU device instead of conftest.py's eight."""
  env = dict(os.environ, MOCO_QUICKSTART_QUICK='1', MOCO_QUICKSTART_WORKDIR=workdir,
             TFDS_DATA_DIR=CIFAR_DATA_DIR, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', '')).strip()
  return env


def test_quickstart_runs_in_quick_mode(tmp_path):
  if not os.path.isdir(os.path.join(CIFAR_DATA_DIR, 'cifar10')):
    pytest.skip(f'needs CIFAR-10 prepared by TFDS in {CIFAR_DATA_DIR} (no download in tests)')
  workdir = str(tmp_path / 'quickstart')
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}})
  client.execute(env=_kernel_env(workdir))  # raises CellExecutionError if a cell fails

  nbformat.write(notebook, str(tmp_path / 'quickstart.executed.ipynb'))  # for debugging
  (settings_cell,) = [cell for cell in notebook.cells if 'def choose(' in cell.source]
  settings = ''.join(output.get('text', '') for output in settings_cell.outputs)
  assert '1 CPU device' in settings and 'already installed' in settings, settings

  events = read_metrics(workdir)
  knn_steps = [e['step'] for e in events if 'knn_top1' in e]
  last_step = max(e['step'] for e in events if 'loss' in e)
  assert knn_steps[0] == 0 and knn_steps[-1] == last_step, knn_steps
  assert all(np.isfinite(e['loss']) for e in events if 'loss' in e)
  # The run's first metrics line says how BN groups the batch: 8 groups of 8.
  first = next(e for e in events if 'loss' in e)
  assert (first['bn_groups'], first['bn_groups_per_device'], first['bn_group_size']) == (8, 8, 8)
  lincls_events = read_metrics(os.path.join(workdir, 'lincls'))
  assert any('lincls_top1' in e for e in lincls_events), lincls_events

  from moco_jax.augment import colour as augment
  from moco_jax.weights import export
  from moco_jax.weights import pretrained
  config = pretrained.load_config(workdir)
  assert config.moco.bn_groups == 8 and config.train.batch_size == 64
  assert config.eval.knn_features == 'head'
  # CIFAR-10 trained and was evaluated from the device (data.on_device='auto').
  assert config.data.on_device == 'auto'
  (pretrain_cell,) = [cell for cell in notebook.cells
                      if 'moco_jax.train_and_evaluate(config' in cell.source]
  printed = ''.join(output.get('text', '') for output in pretrain_cell.outputs)
  assert ', on device)' in printed, printed[-2000:]
  for name in ('views.png', 'loss.png', 'knn.png', 'retrieval.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 1000, name

  (flax_path,) = glob.glob(os.path.join(workdir, 'export',
                                        f'flax_backbone_step{last_step}.msgpack'))
  backbone, variables = export.load_flax_backbone(flax_path)
  mean, std = MEAN_STD['cifar10']
  features = backbone.apply(variables, augment.normalize(np.zeros((2, 32, 32, 3)), mean, std),
                            train=False)
  assert features.shape == (2, backbone.num_features) and np.all(np.isfinite(features))
  (torchvision_path,) = glob.glob(os.path.join(workdir, 'export', 'torchvision_backbone_step*'))
  if torchvision_path.endswith('.npz'):
    state_dict = dict(np.load(torchvision_path))
    assert state_dict['conv1.weight'].shape == (8, 3, 3, 3)  # width 1/8, CIFAR stem
