"""Configuration checks that run before any compilation or data loading."""
from moco_jax import augment
from moco_jax.models import fast_conv
from moco_jax.models.heads import HEADS
from moco_jax.models.resnet import ARCHS
from moco_jax.optim import OPTIMIZERS, SCHEDULES
from moco_jax.config.normalization import MEAN_STD

DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """One or more configuration values are invalid; the message lists all."""


def _choice(problems, name, value, valid):
  if value not in valid:
    problems.append(f'{name}={value!r} is not one of {", ".join(map(str, valid))}')


def config_problems(config, num_devices: int) -> list[str]:
  """Every problem with `config` for a run on `num_devices` devices, as
  one-line messages naming the value and what would be valid."""
  problems = []
  _choice(problems, 'model.arch', config.model.arch, tuple(ARCHS))
  _choice(problems, 'model.head', config.model.head, HEADS)
  _choice(problems, 'model.conv_impl', config.model.conv_impl, fast_conv.IMPLS)
  _choice(problems, 'data.augment', config.data.augment, augment.RECIPES)
  _choice(problems, 'data.normalization', config.data.normalization,
          tuple(MEAN_STD))
  _choice(problems, 'optim.name', config.optim.name, OPTIMIZERS)
  _choice(problems, 'optim.schedule', config.optim.schedule, SCHEDULES)
  _choice(problems, 'dtype', config.dtype, DTYPES)

  batch, splits, queue = (config.train.batch_size, config.moco.bn_splits,
                          config.moco.queue_size)
  if batch <= 0:
    problems.append(f'train.batch_size={batch} must be positive')
  if splits <= 0:
    problems.append(f'moco.bn_splits={splits} must be positive')
  if batch > 0 and splits > 0 and batch % (num_devices * splits):
    problems.append(
        f'train.batch_size={batch} is not divisible by devices × moco.bn_splits '
        f'= {num_devices} × {splits} = {num_devices * splits}')
  if batch > 0 and (queue <= 0 or queue % batch):
    problems.append(
        f'moco.queue_size={queue} is not a positive multiple of the global batch '
        f'train.batch_size={batch} (e.g. {max(1, queue // max(batch, 1)) * batch})')
  if not 0 <= config.moco.momentum < 1:
    problems.append(f'moco.momentum={config.moco.momentum} must be in [0, 1)')
  if config.moco.temperature <= 0:
    problems.append(f'moco.temperature={config.moco.temperature} must be > 0')
  if config.data.image_size < 8:
    problems.append(f'data.image_size={config.data.image_size} must be at least 8')
  low, high = config.data.crop_scale
  if not 0 < low <= high <= 1:
    problems.append(f'data.crop_scale={tuple(config.data.crop_scale)} must satisfy '
                    f'0 < low <= high <= 1')
  if config.optim.base_lr < 0:
    problems.append(f'optim.base_lr={config.optim.base_lr} must be >= 0')
  if config.model.width_multiplier <= 0:
    problems.append(f'model.width_multiplier={config.model.width_multiplier} must be > 0')
  if config.model.dim <= 0:
    problems.append(f'model.dim={config.model.dim} must be positive')
  return problems + train_section_problems(config)


def train_section_problems(config) -> list[str]:
  """Problems with the `train` section's run length and intervals (shared by
  pretraining and linear evaluation)."""
  problems = []
  if config.train.num_steps <= 0 and config.train.num_epochs <= 0:
    problems.append('train.num_epochs or train.num_steps must be positive')
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    if config.train[key] <= 0:
      problems.append(f'train.{key}={config.train[key]} must be positive')
  return problems


def check_config(config, num_devices: int) -> None:
  """Raises ConfigError listing every problem (one line), if any."""
  problems = config_problems(config, num_devices)
  if problems:
    raise ConfigError('; '.join(problems))
