"""The one-axis device mesh every step and evaluator is mapped over, the one
jit + shard_map wrapper they are compiled with, and this device's rows of a
per-example array."""
import jax
from jax.sharding import Mesh

AXIS = 'data'  # the batch axis: each device holds its slice of the global batch


def make_mesh(devices=None) -> Mesh:
  """A one-axis ('data') mesh over all (or the given) devices."""
  devices = jax.devices() if devices is None else devices
  return Mesh(devices, (AXIS,))


def sharded_jit(per_device, mesh: Mesh, in_specs, out_specs, *, donate=(),
                out_shardings=None, check_vma: bool = False):
  """jax.jit(jax.shard_map(per_device, ...)): `per_device` runs on each
  device's shard (PartitionSpecs `in_specs`/`out_specs` over AXIS), the
  arguments at positions `donate` are donated, `out_shardings` (optional)
  fixes the outputs' shardings. check_vma: shard_map's replication check
  (off where outputs are made replicated by a pmean/psum the check cannot
  follow)."""
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=in_specs,
                         out_specs=out_specs, check_vma=check_vma)
  extra = {} if out_shardings is None else {'out_shardings': out_shardings}
  return jax.jit(mapped, donate_argnums=donate, **extra)


def device_rows(rows, local: int):
  """Inside shard_map over AXIS: this device's `local` consecutive rows of a
  global per-example array (e.g. the (global_batch,) keys of a step), the
  rows of the examples this device holds."""
  start = jax.lax.axis_index(AXIS) * local
  return jax.lax.dynamic_slice_in_dim(rows, start, local, axis=0)
