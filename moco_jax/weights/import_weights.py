"""Reads weights from other MoCo/ResNet checkpoints into our Flax variables.

Accepted files:
  .pth / .pth.tar / .pt  the reference MoCo checkpoint (`state_dict` with
                         `module.encoder_q.*`, with or without `module.`; v1
                         `fc.*` or v2 `fc.0.*`/`fc.2.*` head; encoder_k and the
                         queue are ignored) or a torchvision ResNet state_dict
                         (its `fc` 1000-way classifier is ignored). Needs torch.
  .npz                   torchvision names, as `moco_jax.export` writes them.
  .pkl                   Detectron2 names (`{"model": {...}}`), as exported.
  .msgpack               our Flax export (`moco_jax.export --format=flax`).
MoCo v3 (ViT or ResNet models, or any ViT template):
  .pth / .pth.tar        the official moco-v3 checkpoint (`module.base_encoder.*`,
                         `module.momentum_encoder.*`, `module.predictor.*`):
                         f_q's backbone, projector and predictor are read; the
                         momentum encoder is ignored (f_k starts as f_q).
  .pth / .npz            a timm ViT state_dict (our --format=timm export, or
                         timm's own; a classifier `head.weight/bias` is ignored).
Every file must hold the whole backbone; a projection head is optional (the
template's is kept when the file has none), but one that is there must fit.
"""
import io
import pickle

import jax
import numpy as np
from absl import logging

from moco_jax import moco
from moco_jax.runtime import paths
from moco_jax.weights import convert
from moco_jax.weights import export
from moco_jax.weights import timm


class TorchMissingError(convert.WeightsError, ImportError):
  """A .pth file and no PyTorch to read it."""


_MOCO_PREFIXES = ('module.encoder_q.', 'encoder_q.')
HEAD_PREFIX = 'fc.'


def _torch_state_dict(path: str) -> dict:
  try:
    import torch  # optional dependency: only needed to read .pth files
  except ImportError:
    raise TorchMissingError(f'reading {path} needs PyTorch (pip install torch), '
                            'or convert it to .npz where torch is installed') from None
  try:
    obj = torch.load(io.BytesIO(paths.read_bytes(path)), map_location='cpu',
                     weights_only=True)
  except Exception as error:  # torch raises many types, often multi-line
    raise convert.WeightsError(f'torch.load cannot read {path}: '
                               f'{str(error).strip().splitlines()[0]}') from None
  if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_weights_file(path: str) -> tuple[dict, str]:
  """Returns ({name: numpy array}, naming), naming 'torchvision' or 'detectron2'.

  Raises:
    convert.WeightsError: no such file, or not an accepted type.
    TorchMissingError: a torch file and no torch installed.
  """
  if not paths.isfile(path):
    raise convert.WeightsError(f'weights file {path!r} does not exist')
  if path.endswith('.npz'):
    with np.load(io.BytesIO(paths.read_bytes(path))) as data:
      return dict(data), 'torchvision'
  if path.endswith('.pkl'):
    # Detectron2's format; only load files you trust.
    obj = pickle.loads(paths.read_bytes(path))
    return {k: np.asarray(v) for k, v in obj.get('model', obj).items()}, 'detectron2'
  if path.endswith('.msgpack'):
    return export.flax_export_to_torchvision(path), 'torchvision'
  if path.endswith(('.pth', '.pth.tar', '.pt', '.tar')):
    return _torch_state_dict(path), 'torchvision'
  raise convert.WeightsError(
      f'weights file {path!r} has an unknown type; valid: .pth, .pth.tar, .pt '
      '(torch), .npz, .pkl (Detectron2), .msgpack (Flax)')


def split_state_dict(flat: dict, naming: str = 'torchvision'):
  """Separates backbone, projection head and ignored keys.

  A reference MoCo state_dict keeps only `[module.]encoder_q.*` (prefix
  removed); otherwise a leading `module.` (DataParallel) is removed.

  Returns:
    (backbone {name: array}, head {name: array}, ignored [names]); head names
    start with 'fc.' (Detectron2 naming: 'stem.fc.').
  """
  ignored = []
  moco = [p for p in _MOCO_PREFIXES if any(k.startswith(p) for k in flat)]
  if moco:
    prefix = moco[0]
    ignored = [k for k in flat if not k.startswith(prefix)]
    flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  else:
    flat = {k.removeprefix('module.'): v for k, v in flat.items()}
  is_head = lambda k: convert.NAMINGS[naming][1](k).startswith(HEAD_PREFIX)
  backbone = {k: v for k, v in flat.items() if not is_head(k)}
  head = {k: v for k, v in flat.items() if is_head(k)}
  return backbone, head, ignored


def _is_moco_head(head_flat: dict, from_moco: bool, head_template,
                  naming: str) -> bool:
  """Whether `fc.*` arrays are a projection head to load (and check) rather
  than a classifier to ignore.

  Everything under encoder_q is the head. Elsewhere a lone `fc.weight/bias`
  is torchvision's classifier unless it fits the model's linear head exactly.
  """
  if head_template is None:  # loading a backbone alone
    return False
  rename = convert.NAMINGS[naming][0]
  if from_moco or set(head_flat) != {rename('fc.weight'), rename('fc.bias')}:
    return True
  try:
    convert.from_torchvision(head_flat, head_template, naming)
  except convert.WeightsMismatchError:
    return False
  return True


def load_weights(path: str, template) -> dict:
  """Weights in `path` as variables shaped like `template`.

  Args:
    path: a file of a type listed in this module's docstring.
    template: variables of an Encoder ({'params': {'backbone', 'head'},
      'batch_stats': {'backbone'}}) or of a ResNet alone; arrays (the head is
      kept from them when the file has none) or ShapeDtypeStructs.

  Returns:
    {'params', 'batch_stats'} with template's structure, as numpy arrays.

  Raises:
    convert.WeightsMismatchError: listing every missing, unexpected or
      mis-shaped key (architecture, width or head kind differ).
    convert.WeightsError: no such file, or not an accepted type.
    TorchMissingError (an ImportError): a torch file and no torch installed.
  """
  flat, naming = read_weights_file(path)
  if _is_v3_input(flat, template):
    return load_v3_weights(flat, template, path)
  backbone_flat, head_flat, ignored = split_state_dict(flat, naming)
  is_encoder = 'backbone' in template['params']
  backbone_template = ({'params': template['params']['backbone'],
                        'batch_stats': template['batch_stats']['backbone']}
                       if is_encoder else template)
  head_template = {'params': template['params']['head']} if is_encoder else None
  from_moco = any(k.startswith(_MOCO_PREFIXES) for k in flat)
  if head_flat and not _is_moco_head(head_flat, from_moco, head_template, naming):
    logging.warning('%s: ignoring %s: a classifier, not this model\'s '
                    'projection head', path, ', '.join(
                        f'{k} {np.shape(v)}' for k, v in head_flat.items()))
    head_flat = {}
  if ignored:
    logging.info('%s: ignoring %d keys outside encoder_q (%s, ...)', path,
                 len(ignored), ', '.join(ignored[:3]))

  problems, backbone, head = [], None, None
  try:
    backbone = convert.from_torchvision(backbone_flat, backbone_template, naming,
                                        what=f'weights in {path}')
  except convert.WeightsMismatchError as error:
    problems.append(str(error))
  if is_encoder and head_flat:
    try:
      head = convert.from_torchvision(head_flat, head_template, naming,
                                      what=f'projection head in {path}')['params']
    except convert.WeightsMismatchError as error:
      problems.append(str(error))
  if problems:
    raise convert.WeightsMismatchError(' / '.join(problems))
  if not is_encoder:
    return backbone
  if head is None:
    logging.warning('%s has no projection head: keeping the model\'s initial '
                    'head', path)
    head = jax.tree.map(np.asarray, template['params']['head'])
  return {'params': {'backbone': backbone['params'], 'head': head},
          'batch_stats': {'backbone': backbone['batch_stats']}}


def _is_v3_input(flat: dict, template) -> bool:
  """An official MoCo v3 checkpoint, or any weights for a ViT template."""
  params = template['params']
  backbone = params.get('backbone', params)
  return (any(k.removeprefix('module.').startswith('base_encoder.') for k in flat)
          or 'cls_token' in backbone)


def _part(template, name):
  """{'params', 'batch_stats'} of the encoder's sub-module `name`."""
  return {'params': template['params'][name],
          'batch_stats': template.get('batch_stats', {}).get(name, {})}


def load_v3_weights(flat: dict, template, path: str = 'weights') -> dict:
  """An official MoCo v3 checkpoint or a timm ViT state_dict as variables
  shaped like `template` (an Encoder's, or a backbone's alone).

  The backbone must be complete; the projector and predictor are read when
  both the file and the template have them (a head of another kind is an
  error), else the template's are kept with a warning.

  Raises:
    convert.WeightsMismatchError: one line naming the keys that do not fit.
  """
  v3 = any(k.removeprefix('module.').startswith('base_encoder.') for k in flat)
  try:
    parts = (timm.from_moco_v3_checkpoint(flat) if v3 else
             {'backbone': {k.removeprefix('module.'): v for k, v in flat.items()
                           if not k.removeprefix('module.').startswith('head.')},
              'projector': {}, 'predictor': {}})
  except ValueError as error:
    raise convert.WeightsMismatchError(f'{path}: {error}') from None
  is_encoder = 'backbone' in template['params']
  backbone_template = _part(template, 'backbone') if is_encoder else template
  problems, out = [], {'params': {}, 'batch_stats': {}}

  def read(name, fn):
    try:
      return fn()
    except (ValueError, convert.WeightsMismatchError) as error:
      problems.append(str(error))
      return None

  if 'cls_token' in backbone_template['params']:
    backbone = read('backbone', lambda: timm.from_timm(
        parts['backbone'], backbone_template, what=f'ViT weights in {path}'))
  else:
    backbone = read('backbone', lambda: convert.from_torchvision(
        parts['backbone'], backbone_template, 'torchvision',
        what=f'ResNet weights in {path}'))
  if not is_encoder:
    if problems:
      raise convert.WeightsMismatchError(' / '.join(problems))
    return {'params': backbone['params'],
            'batch_stats': backbone.get('batch_stats', {})}
  loaded = {'backbone': backbone}
  for name, part in (('head', 'projector'), ('predictor', 'predictor')):
    if name not in template['params']:
      if parts[part]:
        logging.warning('%s: ignoring its %s (this model has none)', path, part)
      continue
    if not parts[part]:
      logging.warning('%s has no %s: keeping the model\'s initial one', path, part)
      loaded[name] = jax.tree.map(np.asarray, _part(template, name))
      continue
    loaded[name] = read(name, lambda: timm.from_state_dict(
        parts[part], _part(template, name), what=f'{part} in {path}'))
  if problems:
    raise convert.WeightsMismatchError(' / '.join(problems))
  for name, variables in loaded.items():
    out['params'][name] = variables['params']
    if variables.get('batch_stats'):
      out['batch_stats'][name] = variables['batch_stats']
  return out


def load_torch_weights(path: str, template) -> dict:
  """load_weights for a .pth/.pth.tar (reference MoCo or torchvision) file."""
  return load_weights(path, template)


def init_state_from(state, variables):
  """`state` with f_q and f_k both set to `variables` ({'params',
  'batch_stats'} of the encoder), on the state's shardings.

  Meant for a fresh state: the optimiser state is kept (every optax optimiser
  used here starts from zeros, whatever the params), the step stays 0.
  """
  def place(new, old):
    new = np.asarray(new, old.dtype)
    if new.shape != old.shape:
      raise ValueError(f'weights of shape {new.shape} for a state array of '
                       f'shape {old.shape}')
    return jax.make_array_from_callback(old.shape, old.sharding,
                                        lambda index: new[index])

  params = jax.tree.map(place, variables['params'], state.params)
  batch_stats = jax.tree.map(place, variables['batch_stats'], state.batch_stats)
  # f_k has no predictor (MoCo v3): it starts as f_q's other parts.
  target_params = jax.tree.map(place, moco.key_encoder_part(variables['params']),
                               state.target_params)
  target_batch_stats = jax.tree.map(
      place, moco.key_encoder_part(variables['batch_stats']), state.target_batch_stats)
  return state.replace(params=params, batch_stats=batch_stats,
                       target_params=target_params,
                       target_batch_stats=target_batch_stats)
