"""The order of a training epoch as a pure function, without TensorFlow.

Shared by the host pipeline (data/order.py) and the device-resident split
(data/device.py), so both visit the examples of an epoch in the same order.
"""
import numpy as np


def epoch_permutation(num_examples: int, seed: int, process: int, epoch: int) -> np.ndarray:
  """(num_examples,) int64: a uniformly random permutation, a pure function of
  (seed, process, epoch) (NumPy's PCG64, stable across NumPy versions)."""
  entropy = [seed % 2**64, process, epoch]
  return np.random.Generator(np.random.PCG64(entropy)).permutation(num_examples)
