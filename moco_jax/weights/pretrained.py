"""A pretraining run's config and query-encoder backbone, read from its workdir."""
import dataclasses
from typing import Any

import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax.config.upgrade import upgrade
from moco_jax.experiment import abstract_state
from moco_jax.runtime import checkpointing, paths


class PretrainedError(ValueError):
  """The workdir holds no usable pretraining checkpoint."""


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """config: the run's saved config; step: the checkpoint's step;
  params / batch_stats: f_q's backbone variables (replicated on the mesh);
  encoder_params / encoder_batch_stats: the whole f_q's ({'backbone',
  'head'}), for evaluations of the head's output (eval.knn_features='head')."""
  config: ml_collections.ConfigDict
  step: int
  params: Any
  batch_stats: Any
  encoder_params: Any = None
  encoder_batch_stats: Any = None


def checkpoint_step(workdir: str, step: int | None = None, *,
                    workdir_name: str = 'pretrained', step_name: str = 'pretrained_step') -> int:
  """`step` if workdir has that checkpoint, else (None, -1) its newest: the
  one way to find a pretraining run's checkpoint (export, kNN, linear
  evaluation, load_pretrained). workdir_name/step_name: how the caller's
  flags name the two, for the error.

  Raises:
    PretrainedError (one line) when there is no such checkpoint; nothing is
    created on disk.
  """
  directory = paths.join(workdir, checkpointing.CHECKPOINT_SUBDIR)
  if not paths.isdir(directory):
    raise PretrainedError(f'{workdir_name}={workdir!r} has no {checkpointing.CHECKPOINT_SUBDIR}/ '
                          f'directory: not a moco_jax pretraining workdir')
  checkpointer = checkpointing.Checkpointer(workdir)
  steps = checkpointer.all_steps()
  checkpointer.close()
  if not steps:
    raise PretrainedError(f'{workdir_name}={workdir!r} has no complete checkpoint in '
                          f'{directory} yet')
  if step is None or step < 0:
    return max(steps)
  if step not in steps:
    raise PretrainedError(f'{step_name}={step} has no checkpoint in {workdir!r}; '
                          f'available: {", ".join(map(str, sorted(steps)))}')
  return step


def load_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config saved with the checkpoint at `step` (default: newest)."""
  step = checkpoint_step(workdir, step)
  checkpointer = checkpointing.Checkpointer(workdir)
  config = checkpointer.restore_config(step)
  checkpointer.close()
  # Older runs lack keys added since; filled here, once (config/upgrade.py).
  return upgrade(ml_collections.ConfigDict(config))


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
  """Sets each dotted key of `overrides` (e.g. {'eval.knn_k': 20}) in config."""
  for dotted, value in overrides.items():
    *sections, key = dotted.split('.')
    target = config
    for section in sections:
      target = target[section]
    target[key] = value
  return config


def load(workdir: str, mesh, step: int | None = None,
         config: ml_collections.ConfigDict | None = None) -> Pretrained:
  """Restores f_q's backbone from `workdir`'s checkpoint at `step` (newest).

  Args:
    workdir: a moco_jax pretraining workdir.
    mesh: the backbone variables are replicated over it.
    step: checkpoint step; None or -1 for the newest.
    config: the run's config if already loaded (e.g. with overrides).
  """
  step = checkpoint_step(workdir, step)
  config = config or load_config(workdir, step)
  # BN groups only matter in training and never change shapes, so runs saved
  # with the old per-device moco.bn_splits load too.
  abstract = abstract_state(config, NamedSharding(mesh, P()))
  checkpointer = checkpointing.Checkpointer(workdir)
  state = checkpointer.restore(abstract, step)
  checkpointer.close()
  return Pretrained(config=config, step=step, params=state.params['backbone'],
                    batch_stats=state.batch_stats.get('backbone', {}),  # ViT: none
                    encoder_params=state.params,
                    encoder_batch_stats=state.batch_stats)
