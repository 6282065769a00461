"""Orbax checkpoints of the whole MoCoState (queue and rng included) + config.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), so an interrupted save never becomes "latest".
"""
import json
import os

import jax
import orbax.checkpoint as ocp

from moco_jax.state import MoCoState

CHECKPOINT_SUBDIR = 'checkpoints'


class Checkpointer:
  """Keeps the newest `keep` checkpoints of a run under workdir/checkpoints."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_SUBDIR)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save),
        item_names=('state', 'config'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: MoCoState, config: dict) -> None:
    """Starts an (asynchronous) save of the state and the config at `step`."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(json.loads(json.dumps(config)))))

  def restore(self, abstract_state: MoCoState, step: int | None = None) -> MoCoState:
    """The state at `step` (default: newest) with abstract_state's structure,
    shapes and shardings (e.g. from jax.eval_shape)."""
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    """Blocks until the pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_like(state) -> MoCoState:
  """ShapeDtypeStructs (with shardings) describing `state`, for restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
