"""Configuration checks that run before any compilation or data loading."""
from moco_jax.augment import colour as augment
from moco_jax.data.grain_loader import LOADERS, worker_count_problem
from moco_jax.models import fast_conv
from moco_jax.models.encoder import ENCODER_HEADS, is_vit
from moco_jax.models.resnet import ARCHS
from moco_jax.models.vit import ARCHS as VIT_ARCHS
from moco_jax.moco import MOMENTUM_SCHEDULES, SHUFFLE_BN_MODES
from moco_jax.optim import OPTIMIZERS, SCHEDULES
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.config.ranges import range_problems

DTYPES = ('float32', 'bfloat16')
KNN_FEATURES = ('backbone', 'head')


class ConfigError(ValueError):
  """One or more configuration values are invalid; the message lists all."""


def _choice(problems, name, value, valid):
  if value not in valid:
    problems.append(f'{name}={value!r} is not one of {", ".join(map(str, valid))}')


def config_problems(config, num_devices: int) -> list[str]:
  """Every problem with `config` for a run on `num_devices` devices, as
  one-line messages naming the value and what would be valid. Each key's
  own range is config/ranges.py's; the checks here combine keys."""
  problems = range_problems(config)
  _choice(problems, 'model.arch', config.model.arch, tuple(ARCHS) + tuple(VIT_ARCHS))
  _choice(problems, 'model.head', config.model.head, ENCODER_HEADS)
  _choice(problems, 'moco.momentum_schedule',
          config.moco.momentum_schedule, MOMENTUM_SCHEDULES)
  _choice(problems, 'moco.shuffle_bn_mode', config.moco.shuffle_bn_mode, SHUFFLE_BN_MODES)
  _choice(problems, 'model.conv_impl', config.model.conv_impl, fast_conv.IMPLS)
  _choice(problems, 'data.augment', config.data.augment, augment.RECIPES)
  _choice(problems, 'data.normalization', config.data.normalization,
          tuple(MEAN_STD))
  _choice(problems, 'optim.name', config.optim.name, OPTIMIZERS)
  _choice(problems, 'optim.schedule', config.optim.schedule, SCHEDULES)
  _choice(problems, 'dtype', config.dtype, DTYPES)
  _choice(problems, 'data.loader', config.data.get('loader', 'auto'), LOADERS)
  problems += filter(None, [worker_count_problem(config.data.get('worker_count', 'auto'))])

  _choice(problems, 'eval.knn_features', config.eval.knn_features,
          KNN_FEATURES)

  batch, queue = config.train.batch_size, config.moco.queue_size
  vit = is_vit(config.model.arch)
  if not vit:   # a ViT backbone has no BN: no group layout to check
    problems += bn_group_problems(config, num_devices)
  problems += v3_problems(config)
  # The symmetric loss enqueues both views' keys: 2B per step.
  keys = batch * (2 if config.moco.symmetric else 1)
  what = ('2 × train.batch_size (moco.symmetric enqueues both views\' keys) = '
          if keys != batch else 'the global batch train.batch_size=')
  # K = 0: MoCo v3, the negatives are the global batch's keys (no queue).
  if batch > 0 and queue >= 0 and queue % keys:   # negative: config/ranges.py
    problems.append(
        f'moco.queue_size={queue} is not a positive multiple of {what}{keys} '
        f'(e.g. {max(1, queue // keys) * keys})')
  return problems + train_section_problems(config)


def v3_problems(config) -> list[str]:
  """Problems with the MoCo v3 options (ViT archs, queue-free loss,
  predictor, frozen patch projection)."""
  problems, model = [], config.model
  vit = is_vit(model.arch)
  problems += image_size_problems(model.arch, config.data.image_size)
  if vit:
    if config.moco.shuffle_bn:
      problems.append(f'moco.shuffle_bn=True with model.arch={model.arch!r}: a ViT '
                      f'has no BatchNorm to shuffle; set moco.shuffle_bn=False')
  if config.moco.queue_size == 0 and config.moco.shuffle_bn and not vit:
    problems.append('moco.queue_size=0 (MoCo v3: the batch\'s keys are the '
                    'negatives) runs without shuffle BN, as the reference; set '
                    'moco.shuffle_bn=False')
  if model.predictor and model.head != 'v3':
    problems.append(f'model.predictor=True needs model.head=\'v3\' (MoCo v3\'s '
                    f'projector), not {model.head!r}')
  if model.stop_grad_conv1 and not vit:
    problems.append(f'model.stop_grad_conv1=True freezes a ViT\'s patch '
                    f'projection; model.arch={model.arch!r} is not a ViT')
  return problems


def image_size_problems(arch: str, image_size: int) -> list[str]:
  """A ViT's image side must be a multiple of its patch (pretraining, kNN
  and linear evaluation alike); other archs take any size."""
  if not is_vit(arch) or image_size % VIT_ARCHS[arch].patch == 0:
    return []
  patch = VIT_ARCHS[arch].patch
  return [f'data.image_size={image_size} is not a multiple of {arch}\'s patch size '
          f'{patch} (e.g. --config.data.image_size={max(1, image_size // patch) * patch})']


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
    return []   # config/ranges.py reports it
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
  return problems   # each key's own range: config/ranges.py


def check_config(config, num_devices: int) -> None:
  """Raises ConfigError listing every problem (one line), if any."""
  problems = config_problems(config, num_devices)
  if problems:
    raise ConfigError('; '.join(problems))


def queue_warning(queue_size: int, images_per_epoch: int, keys_per_step: int) -> str | None:
  """A warning when K >= the training images of an epoch: the queue then holds
  keys of the very images being trained on (each image among its own
  negatives). Suggests the largest K that is a multiple of the keys enqueued
  per step and at most half the epoch (below the epoch in any case)."""
  if queue_size <= 0 or queue_size < images_per_epoch:
    return None
  problem = (f'warning: moco.queue_size={queue_size} is at least the {images_per_epoch} '
             f'training images of an epoch, so every image sits in the queue as '
             f'its own negative; ')
  if images_per_epoch <= keys_per_step:
    return problem + (f'no queue below that is a multiple of the {keys_per_step} keys '
                      f'enqueued per step: use a smaller train.batch_size or more data')
  suggestion = max(keys_per_step, (images_per_epoch // 2) // keys_per_step * keys_per_step)
  return problem + (f'use a smaller queue, e.g. --config.moco.queue_size={suggestion}, '
                    f'or more data')
