"""Exports the query encoder's backbone of a pretraining run
(the command line is moco_jax/export.py).

Formats:
  flax         .msgpack: {'model': arch info, 'params', 'batch_stats', ...};
               `backbone, variables = load_flax_backbone(path)`.
  torchvision  a state_dict with torchvision names: .pth when torch is
               installed, else .npz (same names; `np.load`).
  detectron2   .pkl as the MoCo reference conversion writes it:
               {'model': {name: array}, '__author__': 'MOCO',
               'matching_heuristics': True}.
  timm         a ViT backbone as a timm VisionTransformer state_dict
               (`vit_*_patch16_224` names, with the fixed sin-cos pos_embed;
               load with num_classes=0): .pth with torch, else .npz.
The projection head is left out unless --with_head (torchvision/Detectron2:
under the reference's names `fc.*` or `fc.0.*`/`fc.2.*`; timm: MoCo v3's
base_encoder names `head.*` and `predictor.*`).
ResNets export to flax, torchvision and detectron2; ViTs to flax and timm.
"""
import io
import sys

import flax.serialization
import jax
import numpy as np

from moco_jax.runtime import paths
from moco_jax.runtime.mesh import make_mesh
from moco_jax.weights import convert, portable, pretrained, timm
from moco_jax.models import is_vit, resnet
from moco_jax.models.vit import vit
from moco_jax.augment.normalization import MEAN_STD

FORMATS = ('flax', 'torchvision', 'detectron2', 'timm')
FLAX_FORMAT = 'moco_jax.backbone'


class ExportError(ValueError):
  """A bad workdir, step, format or output path; one line naming it."""


def _torch():
  try:
    import torch
    return torch
  except ImportError:
    return None


def restore_encoder(workdir: str, step: int | None = None):
  """The query encoder of a run's checkpoint (pretrained.load on the CPU).

  Returns:
    (config, step, variables): the run's ConfigDict, the checkpoint's step and
    the encoder's {'params': {'backbone', 'head'}, 'batch_stats':
    {'backbone'}} as numpy arrays.

  Raises:
    ExportError: no checkpoints in workdir, or no checkpoint at `step`.
  """
  try:
    step = pretrained.checkpoint_step(workdir, step, workdir_name='--workdir',
                                      step_name='--step')
  except pretrained.PretrainedError as error:
    raise ExportError(str(error)) from None
  run = pretrained.load(workdir, make_mesh(jax.local_devices(backend='cpu')[:1]), step)
  variables = {'params': run.encoder_params, 'batch_stats': run.encoder_batch_stats}
  return run.config, step, jax.tree.map(np.asarray, variables)


def model_info(config) -> dict:
  """What load_flax_backbone needs to rebuild the ResNet, plus input facts."""
  mean, std = MEAN_STD[config.data.normalization]
  return dict(arch=config.model.arch,
              patch_size=int(vit_patch(config.model.arch)),
              width_multiplier=float(config.model.width_multiplier),
              cifar_stem=bool(config.model.cifar_stem),
              image_size=int(config.data.image_size), mean=list(mean),
              std=list(std))


def vit_patch(arch: str) -> int:
  """A ViT arch's patch size; 0 for a ResNet."""
  from moco_jax.models.vit import ARCHS  # pylint: disable=g-import-not-at-top
  return ARCHS[arch].patch if is_vit(arch) else 0


def _backbone(variables):
  # A ViT has no batch statistics.
  return {'params': variables['params']['backbone'],
          'batch_stats': variables['batch_stats'].get('backbone', {})}


def timm_state_dict(variables, image_size: int, with_head: bool = False, step: int = 0):
  """Encoder variables of a ViT -> {timm name: array}; with_head adds the
  v3 projector and predictor under MoCo v3's base_encoder names (`head.*`,
  and `predictor.*`), i.e. {**backbone, **head} is a base_encoder state_dict,
  their BN counters (`num_batches_tracked`) at `step`, as the torchvision
  export writes them."""
  flat = timm.to_timm({'params': variables['params']['backbone']}, image_size)
  if with_head:
    for name in ('head', 'predictor'):
      if name in variables['params']:
        part = {'params': variables['params'][name]}
        if name in variables['batch_stats']:
          part['batch_stats'] = variables['batch_stats'][name]
        flat.update(timm.to_state_dict(part, num_batches_tracked=step))
  return flat


def torchvision_state_dict(variables, step: int = 0, with_head: bool = False):
  """Encoder variables -> {torchvision name: numpy array}."""
  flat = convert.to_torchvision(_backbone(variables), num_batches_tracked=step)
  if with_head and 'fc_1' in variables['params']['head']:
    # MoCo v3's projector (BN, bias-free Linear) and predictor: the
    # reference's names fc.{0,1,3,4}.*, predictor.*.
    for name in ('head', 'predictor'):
      if name in variables['params']:
        part = {'params': variables['params'][name]}
        if name in variables['batch_stats']:
          part['batch_stats'] = variables['batch_stats'][name]
        flat.update(timm.to_state_dict(part, num_batches_tracked=step))
  elif with_head:
    flat.update(convert.to_torchvision({'params': variables['params']['head']}))
  return flat


def save_flax(path: str, config, step: int, variables, with_head: bool = False):
  """Writes the backbone (and head) as one msgpack file."""
  tree = dict(format=FLAX_FORMAT, version=1, step=int(step),
              model=model_info(config), **_backbone(variables))
  if with_head and config.model.head == 'v3':
    tree['head'] = dict(kind='v3', dim=int(config.model.dim), variables={
        name: {'params': variables['params'][name],
               'batch_stats': variables['batch_stats'].get(name, {})}
        for name in ('head', 'predictor') if name in variables['params']})
  elif with_head:
    head = variables['params']['head']
    hidden = head['fc_0']['kernel'].shape[1] if 'fc_0' in head else 0
    tree['head'] = dict(kind=config.model.head, dim=int(config.model.dim),
                        hidden_dim=int(hidden), params=head)
  _write(path, flax.serialization.msgpack_serialize(tree))


def read_flax_export(path: str) -> dict:
  """The raw tree of a flax export: format, version, step, model, params,
  batch_stats[, head]."""
  tree = flax.serialization.msgpack_restore(paths.read_bytes(path))
  if not isinstance(tree, dict) or tree.get('format') != FLAX_FORMAT:
    raise convert.WeightsError(f'{path!r} is not a moco_jax Flax export (written by '
                      '`python -m moco_jax.export --format=flax`)')
  return tree


def load_flax_backbone(path: str, **overrides):
  """Rebuilds an exported backbone: weights/backbone.py's load_flax_backbone
  (a Backbone, which unpacks as (module, variables))."""
  from moco_jax.weights import backbone  # pylint: disable=g-import-not-at-top (it imports this module)
  return backbone.load_flax_backbone(path, **overrides)


def flax_export_to_torchvision(path: str) -> dict:
  """A flax export's arrays under torchvision names (head: fc.*)."""
  tree = read_flax_export(path)
  if is_vit(tree['model']['arch']):   # timm names (weights/timm.py)
    return timm.to_timm({'params': tree['params']}, tree['model']['image_size'])
  flat = convert.to_torchvision({'params': tree['params'],
                                 'batch_stats': tree['batch_stats']})
  if 'head' in tree:
    flat.update(convert.to_torchvision({'params': tree['head']['params']}))
  return flat


def _write(path: str, data: bytes):
  """Writes all or nothing (paths.write_bytes_atomic), local or gs://."""
  paths.write_bytes_atomic(path, data)


def save_torchvision(path: str, flat: dict):
  """.pth (torch.save of a state_dict of tensors) or .npz, by extension."""
  if path.endswith('.npz'):
    buffer = io.BytesIO()
    np.savez(buffer, **flat)
    _write(path, buffer.getvalue())
    return
  torch = _torch()
  if torch is None:
    raise ExportError(f'--output={path!r} needs PyTorch (pip install torch); '
                      'or write a .npz with the same names')
  state_dict = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in flat.items()}
  buffer = io.BytesIO()
  torch.save(state_dict, buffer)
  _write(path, buffer.getvalue())


def save_detectron2(path: str, flat: dict):
  """The pickle Detectron2's checkpointer reads (arrays written so that
  NumPy 1.x and 2.x both load them: weights/portable.py)."""
  obj = {'model': convert.to_detectron2(flat), '__author__': 'MOCO',
         'matching_heuristics': True}
  _write(path, portable.dumps(obj))


_EXTENSIONS = {'flax': ('.msgpack',), 'torchvision': ('.pth', '.pt', '.npz'),
               'detectron2': ('.pkl',), 'timm': ('.pth', '.pt', '.npz')}


def default_output(workdir: str, fmt: str, step: int, with_head: bool) -> str:
  ext = {'flax': '.msgpack', 'detectron2': '.pkl',
         'torchvision': '.pth' if _torch() else '.npz',
         'timm': '.pth' if _torch() else '.npz'}[fmt]
  what = 'encoder' if with_head else 'backbone'
  return paths.join(workdir, 'export', f'{fmt}_{what}_step{step}{ext}')


def export(workdir: str, fmt: str, output: str | None = None,
           step: int | None = None, with_head: bool = False) -> str:
  """Exports the newest (or `step`'s) query encoder; returns the file written.

  Raises:
    ExportError: bad workdir, step, format or output extension.
  """
  if fmt not in FORMATS:
    raise ExportError(f'--format={fmt!r} is not one of {", ".join(FORMATS)}')
  if output and not output.endswith(_EXTENSIONS[fmt]):
    raise ExportError(f'--output={output!r} for --format={fmt} must end with '
                      f'{" or ".join(_EXTENSIONS[fmt])}')
  if output and output.endswith(('.pth', '.pt')) and _torch() is None:
    raise ExportError(f'--output={output!r} needs PyTorch (pip install torch); '
                      'or write a .npz with the same names')
  config, step, variables = restore_encoder(workdir, step)
  output = output or default_output(workdir, fmt, step, with_head)
  vit_model = is_vit(config.model.arch)
  if fmt == 'timm' and not vit_model:
    raise ExportError(f'--format=timm is for ViT backbones; {config.model.arch} '
                      f'exports with --format=torchvision or detectron2')
  if vit_model and fmt in ('torchvision', 'detectron2'):
    raise ExportError(f'--format={fmt} is for ResNets; the ViT '
                      f'{config.model.arch} exports with --format=timm or flax')
  if fmt == 'flax':
    save_flax(output, config, step, variables, with_head)
    return output
  if fmt == 'timm':
    flat = timm_state_dict(variables, config.data.image_size, with_head, step)
    save_torchvision(output, flat)
    grid = round((flat[timm.POS_EMBED].shape[1] - 1) ** 0.5)
    print(f'note: written for {config.data.image_size}x{config.data.image_size} images '
          f'(pos_embed: a {grid}x{grid} grid of {config.data.image_size // grid}-pixel '
          f'patches + the class token); create the timm model with '
          f'img_size={config.data.image_size}', file=sys.stderr)
    return output
  changes = ((['conv1 3x3 stride 1 and no max-pool'] if config.model.cifar_stem else [])
             + ([f'every width x{config.model.width_multiplier:g}']
                if config.model.width_multiplier != 1 else []))
  if changes:
    print(f'note: this {config.model.arch} is not a stock torchvision/Detectron2 '
          f'one; build the model with {" and ".join(changes)} to load it',
          file=sys.stderr)
  flat = torchvision_state_dict(variables, step, with_head)
  if fmt == 'torchvision':
    save_torchvision(output, flat)
  else:
    save_detectron2(output, flat)
  return output
