"""Configuration checks that run before any compilation or data loading."""
from moco_jax import augment
from moco_jax.models import fast_conv
from moco_jax.models.encoder import ENCODER_HEADS, is_vit
from moco_jax.models.resnet import ARCHS
from moco_jax.models.vit import ARCHS as VIT_ARCHS
from moco_jax.moco import MOMENTUM_SCHEDULES, SHUFFLE_BN_MODES
from moco_jax.optim import OPTIMIZERS, SCHEDULES
from moco_jax.config.normalization import MEAN_STD

DTYPES = ('float32', 'bfloat16')
KNN_FEATURES = ('backbone', 'head')


class ConfigError(ValueError):
  """One or more configuration values are invalid; the message lists all."""


def _choice(problems, name, value, valid):
  if value not in valid:
    problems.append(f'{name}={value!r} is not one of {", ".join(map(str, valid))}')


def config_problems(config, num_devices: int) -> list[str]:
  """Every problem with `config` for a run on `num_devices` devices, as
  one-line messages naming the value and what would be valid."""
  problems = []
  _choice(problems, 'model.arch', config.model.arch, tuple(ARCHS) + tuple(VIT_ARCHS))
  _choice(problems, 'model.head', config.model.head, ENCODER_HEADS)
  _choice(problems, 'moco.momentum_schedule',
          config.moco.get('momentum_schedule', 'constant'), MOMENTUM_SCHEDULES)
  _choice(problems, 'moco.shuffle_bn_mode',
          config.moco.get('shuffle_bn_mode', 'statistics'), SHUFFLE_BN_MODES)
  _choice(problems, 'model.conv_impl', config.model.conv_impl, fast_conv.IMPLS)
  _choice(problems, 'data.augment', config.data.augment, augment.RECIPES)
  _choice(problems, 'data.normalization', config.data.normalization,
          tuple(MEAN_STD))
  _choice(problems, 'optim.name', config.optim.name, OPTIMIZERS)
  _choice(problems, 'optim.schedule', config.optim.schedule, SCHEDULES)
  _choice(problems, 'dtype', config.dtype, DTYPES)

  _choice(problems, 'eval.knn_features', config.eval.get('knn_features', 'backbone'),
          KNN_FEATURES)

  batch, queue = config.train.batch_size, config.moco.queue_size
  if batch <= 0:
    problems.append(f'train.batch_size={batch} must be positive')
  vit = is_vit(config.model.arch)
  if not vit:   # a ViT backbone has no BN: no group layout to check
    problems += bn_group_problems(config, num_devices)
  problems += v3_problems(config)
  # The symmetric loss enqueues both views' keys: 2B per step.
  keys = batch * (2 if config.moco.get('symmetric', False) else 1)
  what = ('2 × train.batch_size (moco.symmetric enqueues both views\' keys) = '
          if keys != batch else 'the global batch train.batch_size=')
  # K = 0: MoCo v3, the negatives are the global batch's keys (no queue).
  if batch > 0 and (queue < 0 or queue % keys):
    problems.append(
        f'moco.queue_size={queue} is not a positive multiple of {what}{keys} '
        f'(e.g. {max(1, queue // keys) * keys})')
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


def v3_problems(config) -> list[str]:
  """Problems with the MoCo v3 options (ViT archs, queue-free loss,
  predictor, frozen patch projection)."""
  problems, model = [], config.model
  vit = is_vit(model.arch)
  if vit:
    patch = VIT_ARCHS[model.arch].patch
    if config.data.image_size % patch:
      problems.append(f'data.image_size={config.data.image_size} is not a multiple '
                      f'of {model.arch}\'s patch size {patch} (e.g. '
                      f'{max(1, config.data.image_size // patch) * patch})')
    if config.moco.shuffle_bn:
      problems.append(f'moco.shuffle_bn=True with model.arch={model.arch!r}: a ViT '
                      f'has no BatchNorm to shuffle; set moco.shuffle_bn=False')
  if config.moco.queue_size == 0 and config.moco.shuffle_bn and not vit:
    problems.append('moco.queue_size=0 (MoCo v3: the batch\'s keys are the '
                    'negatives) runs without shuffle BN, as the reference; set '
                    'moco.shuffle_bn=False')
  if model.get('predictor', False) and model.head != 'v3':
    problems.append(f'model.predictor=True needs model.head=\'v3\' (MoCo v3\'s '
                    f'projector), not {model.head!r}')
  if model.get('stop_grad_conv1', False) and not vit:
    problems.append(f'model.stop_grad_conv1=True freezes a ViT\'s patch '
                    f'projection; model.arch={model.arch!r} is not a ViT')
  return problems


def bn_group_problems(config, num_devices: int) -> list[str]:
  """Problems with moco.bn_groups, the BN groups of the global batch.

  Each device normalises bn_groups / num_devices groups of its shard, so
  bn_groups must be a multiple of the device count (a group never spans two
  devices: that would need a cross-device BN sync the reference does not
  have) and divide the global batch. No fallback is silent: 16 devices with
  the recipes' 8 groups is an error that names the valid counts.
  """
  if 'bn_splits' in config.moco:
    return ['moco.bn_splits is no longer a setting (it counted BN groups per '
            'device): use moco.bn_groups, the BN groups of the whole global batch '
            '(= old bn_splits × devices; 8 in every recipe, as the reference)']
  groups, batch = config.moco.bn_groups, config.train.batch_size
  if groups <= 0:
    return [f'moco.bn_groups={groups} must be positive (8 in every recipe)']
  problems = []
  if groups % num_devices or (batch > 0 and batch % groups):
    valid = [g for g in range(num_devices, max(batch, 1) + 1, num_devices)
             if batch > 0 and batch % g == 0
             and (g > 1 or not config.moco.shuffle_bn)][:4]
    devices = f'{num_devices} device' + ('s' if num_devices != 1 else '')
    problems.append(
        f'moco.bn_groups={groups} with {devices} and '
        f'train.batch_size={batch}: the BN groups must be a multiple of the '
        f'device count and divide the global batch; valid: '
        f'{", ".join(map(str, valid)) or "none (change train.batch_size)"}'
        f'{", …" if len(valid) == 4 else ""}')
  if config.moco.shuffle_bn and groups == 1:
    problems.append('moco.shuffle_bn=True with moco.bn_groups=1: with a single BN '
                    'group the shuffle changes nothing; set moco.bn_groups to 8 '
                    '(the recipes) or moco.shuffle_bn=False')
  return problems


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
