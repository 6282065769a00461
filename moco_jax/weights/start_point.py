"""Where a fine-tuning run starts: a pretraining workdir, a Flax export, an
official MoCo v1/v2/v3 (or torchvision/timm/Detectron2) checkpoint, or the same
architecture from a random initialisation.

Every start point is read into the same thing: the backbone's model section,
the mean/std its inputs were normalised with, and its variables as NumPy
arrays (None for a random start, which the caller initialises from its seed).
"""
import dataclasses
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from moco_jax.augment.normalization import MEAN_STD
from moco_jax.models import build_backbone
from moco_jax.runtime import paths
from moco_jax.weights import export, import_weights, pretrained

FLAX_SUFFIX = '.msgpack'
MODEL_KEYS = ('arch', 'width_multiplier', 'cifar_stem')


@dataclasses.dataclass(frozen=True)
class StartPoint:
  """model: a `model` section (arch, width_multiplier, cifar_stem); mean, std: per-channel normalisation on the 0-255 scale;
  variables: the backbone's {'params', 'batch_stats'} (NumPy), None for a
  random start; description: one line for logs; step: the checkpoint's step
  (-1 when not a workdir)."""
  model: ml_collections.ConfigDict
  mean: tuple
  std: tuple
  variables: Optional[Any]
  description: str
  step: int = -1


def _model_section(arch: str, width_multiplier: float,
                   cifar_stem: bool) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      arch=arch, width_multiplier=float(width_multiplier), cifar_stem=bool(cifar_stem)))


def _check_arch(config, model) -> None:
  wanted = config.model.arch
  if wanted and wanted != model.arch:
    raise pretrained.PretrainedError(
        f'model.arch={wanted!r} but {config.pretrained!r} holds a {model.arch}; '
        f'leave model.arch empty to fine-tune the start point\'s model')


def _normalization(config, default_name: str = '', numbers=None):
  name = config.data.normalization or default_name
  if name:
    mean, std = MEAN_STD[name]
    return tuple(map(float, mean)), tuple(map(float, std))
  return tuple(map(float, numbers[0])), tuple(map(float, numbers[1]))


def _random_backbone(model, image_size: int, seed: int):
  import jax.numpy as jnp
  backbone = build_backbone(model, image_size=image_size)
  variables = jax.jit(lambda rng: backbone.init(
      rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False))(
          jax.random.PRNGKey(seed))
  return jax.tree.map(np.asarray, {'params': variables['params'],
                                   'batch_stats': variables.get('batch_stats', {})})


def resolve(config: ml_collections.ConfigDict, mesh, with_weights: bool = True) -> StartPoint:
  """Reads config.pretrained (and config.init, config.model) into a StartPoint.

  with_weights: False skips reading the weights (variables None), e.g. when
  the run resumes from its own checkpoint.

  Raises:
    pretrained.PretrainedError: one line, when `pretrained` is empty with
      init='pretrained', names nothing, holds no checkpoint, or holds a model
      other than model.arch.
    convert.WeightsError: a file of weights that do not fit model.arch.
  """
  source = config.pretrained
  load = with_weights and config.init == 'pretrained'
  if not source:
    if config.init == 'pretrained':
      raise pretrained.PretrainedError(
          'pretrained is empty: give --config.pretrained=PRETRAIN_DIR (a workdir), '
          'a .msgpack Flax export or an official checkpoint, or init=random')
    if not config.model.arch:
      raise pretrained.PretrainedError('init=random with no pretrained needs model.arch')
    model = _model_section(config.model.arch, config.model.width_multiplier,
                           config.model.cifar_stem)
    mean, std = _normalization(config, 'imagenet')
    return StartPoint(model, mean, std, None, f'random {model.arch}')
  if paths.isdir(source):
    step = pretrained.checkpoint_step(source, config.pretrained_step)
    run_config = pretrained.load_config(source, step)
    # Pretraining's frozen patch projection (stop_grad_conv1) is not carried
    # over: fine-tuning trains it, as moco-v3 does in DeiT.
    model = _model_section(run_config.model.arch, run_config.model.width_multiplier,
                           run_config.model.cifar_stem)
    _check_arch(config, model)
    mean, std = _normalization(config, run_config.data.normalization)
    variables = None
    if load:
      run = pretrained.load(source, mesh, step, run_config)
      variables = jax.device_get({'params': run.params, 'batch_stats': run.batch_stats})
    return StartPoint(model, mean, std, variables,
                      f'{source} (pretraining step {step})', step)
  if not paths.exists(source):
    raise pretrained.PretrainedError(
        f'pretrained={source!r} holds nothing: no such directory or file; give a '
        f'pretraining workdir, a .msgpack Flax export or an official checkpoint')
  if source.endswith(FLAX_SUFFIX):
    tree = export.read_flax_export(source)
    info = tree['model']
    model = _model_section(info['arch'], info.get('width_multiplier', 1.0),
                           info.get('cifar_stem', False))
    _check_arch(config, model)
    mean, std = _normalization(config, numbers=(info['mean'], info['std']))
    variables = None
    if load:
      variables = {'params': tree['params'], 'batch_stats': tree.get('batch_stats') or {}}
    return StartPoint(model, mean, std, variables, f'{source} (Flax export)')
  if not config.model.arch:
    raise pretrained.PretrainedError(
        f'pretrained={source!r} is a weights file: give its model.arch (and '
        f'model.width_multiplier, model.cifar_stem if not the defaults)')
  model = _model_section(config.model.arch, config.model.width_multiplier,
                         config.model.cifar_stem)
  mean, std = _normalization(config, 'imagenet')
  variables = None
  if load:
    template = _random_backbone(model, config.data.image_size, 0)
    variables = import_weights.load_weights(source, template)
  return StartPoint(model, mean, std, variables, f'{source} (weights file)')

