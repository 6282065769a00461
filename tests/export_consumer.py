"""Loads moco_jax exports as a consumer would, where neither moco_jax nor JAX
(nor Flax, TensorFlow) can be imported; run as a script by
test_export_loadability.py, also under a NumPy 1.x interpreter.

  python export_consumer.py FORMAT PATH  ->  prints JSON {name: [shape, dtype, sha256]}
"""
import hashlib
import importlib.abc
import json
import pickle
import sys

BLOCKED = ('jax', 'jaxlib', 'flax', 'moco_jax', 'tensorflow', 'orbax')


class _Block(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError(f'{name} is not installed here')
    return None


sys.meta_path.insert(0, _Block())

import numpy as np  # noqa: E402


class _PortableOnly(pickle.Unpickler):
  """pickle.Unpickler (Detectron2 uses pickle.load(f, encoding='latin1'))
  that refuses every global but the two a portable pickle needs; a pickle
  made with NumPy 2's own reduction names numpy._core, which NumPy 1.x lacks."""

  def find_class(self, module, name):
    if (module, name) not in {('numpy', 'ndarray'), ('builtins', 'bytearray')}:
      raise pickle.UnpicklingError(f'pickle references {module}.{name}')
    return super().find_class(module, name)


def load_msgpack(path):
  """A Flax msgpack export with msgpack and NumPy only (README's recipe)."""
  import msgpack

  def ext_hook(code, data):
    if code in (1, 3):  # ndarray, NumPy scalar: (shape, dtype name, bytes)
      shape, dtype, buffer = msgpack.unpackb(data)
      array = np.frombuffer(buffer, dtype=dtype).reshape(shape)
      return array if code == 1 else array[()]
    return msgpack.ExtType(code, data)

  with open(path, 'rb') as f:
    return msgpack.unpackb(f.read(), ext_hook=ext_hook, raw=False, strict_map_key=False)


def flatten(tree, prefix=''):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from flatten(value, f'{prefix}{key}.')
  else:
    yield prefix[:-1], tree


def load(fmt, path):
  if fmt == 'detectron2':
    with open(path, 'rb') as f:
      checked = _PortableOnly(f, encoding='latin1').load()
    with open(path, 'rb') as f:
      data = pickle.load(f, encoding='latin1')
    assert data['__author__'] == 'MOCO' and data['matching_heuristics'] is True
    assert checked['model'].keys() == data['model'].keys()
    # Writable, so torch.from_numpy (Detectron2's loader) takes it silently.
    assert all(v.flags.writeable for v in data['model'].values())
    return data['model']
  if fmt == 'npz':
    with np.load(path, allow_pickle=False) as data:
      return {name: data[name] for name in data.files}
  if fmt == 'pth':
    import torch
    state = torch.load(path, map_location='cpu', weights_only=True)
    return {name: tensor.numpy() for name, tensor in state.items()}
  if fmt == 'flax':
    tree = load_msgpack(path)
    assert tree['format'] == 'moco_jax.backbone', tree.get('format')
    return dict(flatten({'params': tree['params'], 'batch_stats': tree['batch_stats']}))
  raise ValueError(fmt)


if __name__ == '__main__':
  fmt, path = sys.argv[1:]
  arrays = load(fmt, path)
  summary = {}
  for name, value in arrays.items():
    array = np.asarray(value, order='C')
    assert isinstance(value, np.ndarray), (name, type(value))
    summary[name] = [list(array.shape), array.dtype.str,
                     hashlib.sha256(array.tobytes()).hexdigest()]
  print(json.dumps({'numpy': np.__version__, 'arrays': summary}))
