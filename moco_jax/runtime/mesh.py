"""The one-axis device mesh every step and evaluator is mapped over."""
import jax
from jax.sharding import Mesh

AXIS = 'data'  # the batch axis: each device holds its slice of the global batch


def make_mesh(devices=None) -> Mesh:
  """A one-axis ('data') mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(devices, (AXIS,))
