"""Pickles that load anywhere NumPy does: NumPy 1.x or 2.x, no JAX, no moco_jax.

NumPy 2 pickles an array as a call of `numpy._core.multiarray._reconstruct`,
a module NumPy 1.x does not have, so such a pickle fails to load in an older
environment (Detectron2 installs commonly pin NumPy 1.2x). Here an array is
written as `numpy.ndarray(shape, dtype_str, bytearray(data))`: only the
`numpy.ndarray` and `builtins.bytearray` names, present in every NumPy and
Python 3, and the result is a writable array (torch.from_numpy takes it
without a warning).
"""
import copyreg
import io
import pickle

import numpy as np

# Pickle protocol 4: Python >= 3.4 reads it.
PROTOCOL = 4


def _reduce_array(array: np.ndarray):
  array = np.asarray(array, order='C')  # (ascontiguousarray makes 0-d 1-d)
  if array.dtype.hasobject:
    raise TypeError(f'cannot write an object array ({array.dtype}) portably')
  return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))


class _Pickler(pickle.Pickler):
  dispatch_table = copyreg.dispatch_table.copy()
  dispatch_table[np.ndarray] = _reduce_array


def dumps(obj) -> bytes:
  """pickle.dumps(obj) with every NumPy array (also 0-d) written portably.

  NumPy scalars (np.float32(1.0)) are not converted: pass arrays or Python
  numbers.
  """
  buffer = io.BytesIO()
  _Pickler(buffer, protocol=PROTOCOL).dump(obj)
  return buffer.getvalue()
