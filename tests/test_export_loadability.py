"""Every export format loads where it is used: without moco_jax or JAX, with
NumPy 2 and (when /tmp/np1 or $NUMPY1_PYTHON has it) NumPy 1.24, which lacks
the numpy._core module NumPy 2's own pickles name (1.26 has a shim), and the
.pth with torch 2.x where torch is there. The consumer is
tests/export_consumer.py, run as a separate interpreter."""
import glob
import hashlib
import json
import os
import pickle
import pickletools
import subprocess
import sys

import numpy as np
import pytest

from moco_jax.weights import convert, export, portable

HERE = os.path.dirname(os.path.abspath(__file__))
NUMPY1_PYTHON = os.environ.get('NUMPY1_PYTHON', '/tmp/np1/bin/python')


def _interpreters():
  found = [pytest.param(sys.executable, id='numpy2')]
  if os.path.exists(NUMPY1_PYTHON):
    found.append(pytest.param(NUMPY1_PYTHON, id='numpy1'))
  else:
    found.append(pytest.param(NUMPY1_PYTHON, id='numpy1', marks=pytest.mark.skip(
        reason=f'no NumPy 1.x interpreter at {NUMPY1_PYTHON} (python3.11 -m venv '
               f'/tmp/np1 && /tmp/np1/bin/pip install numpy==1.24.4 msgpack)')))
  return found


def _has_torch(python):
  return subprocess.run([python, '-c', 'import torch'], capture_output=True).returncode == 0


def _summary(arrays):
  return {name: [list(np.shape(a)), np.asarray(a).dtype.str,
                 hashlib.sha256(np.asarray(a, order='C').tobytes()).hexdigest()]
          for name, a in arrays.items()}


@pytest.fixture(scope='module')
def exports(smoke_pretrain_dir, tmp_path_factory):
  """{format: (path, expected summary)} of the smoke run's newest checkpoint."""
  out = tmp_path_factory.mktemp('exports')
  _, step, variables = export.restore_encoder(smoke_pretrain_dir)
  flat = export.torchvision_state_dict(variables, step)
  backbone = {'params': variables['params']['backbone'],
              'batch_stats': variables['batch_stats']['backbone']}
  flax_flat = {'.'.join(str(k.key) for k in path): leaf for path, leaf in
               __import__('jax').tree_util.tree_leaves_with_path(backbone)}
  found = {
      'detectron2': (export.export(smoke_pretrain_dir, 'detectron2', str(out / 'm.pkl')),
                     _summary(convert.to_detectron2(flat))),
      'npz': (export.export(smoke_pretrain_dir, 'torchvision', str(out / 'm.npz')),
              _summary(flat)),
      'flax': (export.export(smoke_pretrain_dir, 'flax', str(out / 'm.msgpack')),
               _summary(flax_flat)),
  }
  if export._torch() is not None:
    found['pth'] = (export.export(smoke_pretrain_dir, 'torchvision', str(out / 'm.pth')),
                    _summary(flat))
  return found


@pytest.mark.parametrize('python', _interpreters())
@pytest.mark.parametrize('fmt', ['detectron2', 'npz', 'flax', 'pth'])
def test_export_loads_without_moco_jax_or_jax(exports, fmt, python):
  if fmt == 'pth' and ('pth' not in exports or not _has_torch(python)):
    pytest.skip('torch is needed to write and read .pth')
  path, expected = exports[fmt]
  result = subprocess.run([python, os.path.join(HERE, 'export_consumer.py'), fmt, path],
                          capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = json.loads(result.stdout.strip().splitlines()[-1])
  assert loaded['arrays'] == expected
  assert loaded['numpy'].startswith('1.' if 'np1' in python or python == NUMPY1_PYTHON
                                    else '2.')


def test_detectron2_pickle_names_no_numpy2_only_module(exports):
  path, _ = exports['detectron2']
  with open(path, 'rb') as f:
    data = f.read()
  strings = [arg for op, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
  assert not any(s.startswith(('numpy._core', 'numpy.core')) for s in strings)
  # What NumPy 2's own pickling would have written: the test above can fail.
  plain = pickle.dumps({'w': np.zeros((2, 3), np.float32)}, protocol=4)
  if np.__version__.startswith('2.'):
    assert b'numpy._core' in plain


def test_portable_pickle_round_trips_dtypes_and_shapes():
  arrays = {'f': np.arange(6, dtype=np.float32).reshape(2, 3),
            'h': np.arange(4, dtype=np.float16), 'i': np.array(7, np.int64),
            'b': np.array([True, False]), 'empty': np.zeros((0, 4)),
            'strided': np.arange(12.0).reshape(3, 4)[:, ::2]}
  loaded = pickle.loads(portable.dumps(arrays))
  for name, array in arrays.items():
    assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
    np.testing.assert_array_equal(loaded[name], array)
    assert loaded[name].flags.writeable
