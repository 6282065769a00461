"""Pure name/array mapping: Flax ViT and MoCo v3 heads <-> timm / PyTorch names.

Our module names are the PyTorch ones with '_' for '.' (`blocks_3/attn/qkv` is
`blocks.3.attn.qkv`, `head_4` is `head.4`), so every array maps by name:

  conv       kernel (kh, kw, Cin, Cout) [, bias]  <->  weight (Cout, Cin, kh, kw)
  dense      kernel (Cin, Cout) [, bias]          <->  weight (Cout, Cin) [, bias]
  LayerNorm  scale, bias                          <->  weight, bias
  BatchNorm  [scale, bias] + batch_stats mean, var <-> [weight, bias] +
             running_mean, running_var (+ num_batches_tracked, int64)
  a param leaf outside a module (cls_token)       <->  the same array

The ViT's fixed 2-D sin-cos `pos_embed` is no variable of ours (see
moco_jax/models/vit.py): to_timm writes it for the export's image size;
from_timm checks that a file's pos_embed is that fixed embedding.

Official MoCo v3 checkpoints (torch.save({'state_dict': ...})) hold, under
`module.`: base_encoder.* (the query backbone, with its projector as `head.*`
for a ViT or `fc.*` for a ResNet), momentum_encoder.* (the same for the key
encoder) and predictor.*; from_moco_v3_checkpoint splits them.

Nothing here reads files or imports torch; arrays are numpy. The layout
helpers (transposes, module names) are weights/convert.py's.
"""
from typing import Any, Mapping, Optional

import numpy as np

from moco_jax.weights.convert import (WeightsMismatchError, array_modules, compact_names,
                                      from_torch_array, get_path, mismatch_problems,
                                      set_path, to_torch_array, torch_module_name,
                                      torch_shape)

COUNTER = 'num_batches_tracked'
POS_EMBED = 'pos_embed'
# Tolerance of from_timm's pos_embed check (torch's float32 sin/cos vs ours).
POS_EMBED_ATOL = 1e-4


def entries(variables) -> list[tuple[str, str, tuple[str, ...], str]]:
  """(torch name, collection, path in that collection, kind) of every array.

  Args:
    variables: {'params'[, 'batch_stats']} of a ViT, a MoCo v3 head or any
      tree of conv, dense, LayerNorm and BatchNorm modules (and top-level
      param leaves such as cls_token); arrays or ShapeDtypeStructs.

  Returns:
    kind is 'conv', 'dense' or 'copy'; tree order, params first.

  Raises:
    ValueError: for a module that is none of those.
  """
  params = variables.get('params', {})
  stats = dict(array_modules(variables.get('batch_stats', {})))
  out = []
  for path, leaves in array_modules(params):
    module = torch_module_name(path)
    prefix = f'{module}.' if module else ''
    kernel = leaves.get('kernel')
    if not path:                                  # cls_token and the like
      out += [(name, 'params', (name,), 'copy') for name in leaves]
    elif kernel is not None and set(leaves) <= {'kernel', 'bias'} and (
        len(kernel.shape) in (2, 4)):
      kind = 'conv' if len(kernel.shape) == 4 else 'dense'
      out.append((f'{prefix}weight', 'params', path + ('kernel',), kind))
      if 'bias' in leaves:
        out.append((f'{prefix}bias', 'params', path + ('bias',), 'copy'))
    elif set(leaves) == {'scale', 'bias'}:       # LayerNorm, or BN with stats
      out += [(f'{prefix}weight', 'params', path + ('scale',), 'copy'),
              (f'{prefix}bias', 'params', path + ('bias',), 'copy')]
    else:
      raise ValueError(f'cannot convert module {"/".join(path)!r} with arrays '
                       f'{sorted(leaves)}; valid: conv or dense (kernel[, '
                       f'bias]), LayerNorm or BatchNorm (scale, bias)')
  for path, leaves in stats.items():
    if set(leaves) != {'mean', 'var'}:
      raise ValueError(f'cannot convert batch_stats {"/".join(path)!r} with '
                       f'arrays {sorted(leaves)}; valid: mean, var')
    module = torch_module_name(path)
    out += [(f'{module}.running_mean', 'batch_stats', path + ('mean',), 'copy'),
            (f'{module}.running_var', 'batch_stats', path + ('var',), 'copy')]
  return out


def to_state_dict(variables, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """Flax variables -> {PyTorch name: numpy array}, in PyTorch layouts.

  Every BatchNorm also gets `num_batches_tracked` (int64 scalar), which
  PyTorch's strict load_state_dict expects.
  """
  flat = {}
  for name, collection, path, kind in entries(variables):
    flat[name] = to_torch_array(get_path(variables[collection], path), kind)
    if name.endswith('.running_var'):
      flat[name[:-len('running_var')] + COUNTER] = np.array(num_batches_tracked,
                                                            np.int64)
  return flat


def from_state_dict(flat: Mapping[str, Any], template, what: str = 'weights',
                    ignore: tuple[str, ...] = ()):
  """{PyTorch name: array} -> variables shaped like `template`.

  Args:
    flat: arrays by name (numpy, or anything np.asarray accepts).
    template: {'params'[, 'batch_stats']} of the target module; arrays or
      jax.ShapeDtypeStructs (only shapes and dtypes are used).
    what: how to call `flat` in errors (e.g. the file name).
    ignore: names in `flat` neither required nor unexpected (besides every
      `num_batches_tracked`).

  Returns:
    New variables with template's structure and dtypes (numpy arrays).

  Raises:
    WeightsMismatchError (a ValueError): one line listing every missing,
      unexpected and mis-shaped key.
  """
  wanted = {name: (collection, path, kind)
            for name, collection, path, kind in entries(template)}
  missing = [n for n in wanted if n not in flat]
  unexpected = [n for n in flat if n not in wanted and n not in ignore
                and not n.endswith(COUNTER)]
  wrong_shape = []
  variables = {}
  for name, (collection, path, kind) in wanted.items():
    if name not in flat:
      continue
    like = get_path(template[collection], path)
    want = torch_shape(like.shape, kind)
    got = tuple(np.shape(flat[name]))
    if got != want:
      wrong_shape.append(f'{name} {got} (model: {want})')
      continue
    set_path(variables.setdefault(collection, {}), path,
         from_torch_array(flat[name], kind).astype(like.dtype))
  problems = mismatch_problems(missing, unexpected, wrong_shape)
  if problems:
    raise WeightsMismatchError(f'{what} do not fit the model: ' + '; '.join(problems))
  return variables


def _sincos(grid, dim):
  from moco_jax.models.vit import sincos_pos_embed  # pylint: disable=g-import-not-at-top
  return sincos_pos_embed(grid, grid, dim)


def _patch_and_dim(params):
  try:
    kernel = params['patch_embed']['proj']['kernel']
    cls_token = params['cls_token']
  except KeyError:
    raise ValueError('not ViT variables: no patch_embed/proj/kernel or '
                     'cls_token in params') from None
  return kernel.shape[0], cls_token.shape[-1]


def to_timm(variables, image_size: int) -> dict[str, np.ndarray]:
  """ViT variables -> timm VisionTransformer state_dict content (numpy).

  Args:
    variables: {'params': ...} of moco_jax.models.vit.ViT.
    image_size: the resolution the weights are for (the ViT's image_size):
      sets the grid of the fixed sin-cos `pos_embed` written out.

  Returns:
    {timm name: array}: patch_embed.proj.*, cls_token, pos_embed,
    blocks.{i}.*, norm.*; load into timm's VisionTransformer(img_size,
    patch_size, embed_dim, depth, num_heads, num_classes=0) strictly.
  """
  patch, dim = _patch_and_dim(variables['params'])
  if image_size % patch:
    raise ValueError(f'image_size {image_size} is not a multiple of the '
                     f'patch size {patch}')
  flat = to_state_dict({'params': variables['params']})
  grid = image_size // patch
  flat[POS_EMBED] = _sincos(grid, dim)
  return flat


def from_timm(flat: Mapping[str, Any], template, image_size: Optional[int] = None,
              what: str = 'weights'):
  """timm ViT arrays -> {'params': ...} shaped like `template`.

  Args:
    flat: {timm name: array}, e.g. to_timm's output or a state_dict; a
      classifier `head.*` must be removed first (it is unexpected here).
    template: {'params': ...} of the ViT (arrays or ShapeDtypeStructs).
    image_size: the model's resolution; when given, `pos_embed` must have its
      grid.
    what: how to call `flat` in errors.

  `pos_embed` is optional; when present it must be the fixed 2-D sin-cos
  embedding (this ViT cannot use a learned one).

  Raises:
    ValueError: one line naming missing / unexpected / mis-shaped keys, or a
      pos_embed that is not the fixed embedding.
  """
  params = template['params']
  variables = from_state_dict(flat, {'params': params}, what, ignore=(POS_EMBED,))
  if POS_EMBED in flat:
    patch, dim = _patch_and_dim(params)
    pos = np.asarray(flat[POS_EMBED])
    tokens = pos.shape[1] - 1 if pos.ndim == 3 else -1
    grid = int(round(np.sqrt(max(tokens, 0))))
    want_grid = grid if image_size is None else image_size // patch
    want = (1, 1 + want_grid**2, dim)
    if pos.shape != want:
      raise ValueError(f'{what}: pos_embed has shape {pos.shape}, the model '
                       f'needs {want}')
    diff = float(np.max(np.abs(pos - _sincos(grid, dim))))
    if diff > POS_EMBED_ATOL:
      raise ValueError(f'{what}: pos_embed is not the fixed 2-D sin-cos '
                       f'embedding this ViT uses (max |diff| {diff:.3g}); a '
                       f'learned position embedding cannot be loaded')
  return variables


# from_moco_v3_checkpoint: part -> the prefix its keys carry in the checkpoint.
MOCO_V3_PARTS = {'base_encoder': 'base_encoder.',
                 'momentum_encoder': 'momentum_encoder.',
                 'predictor': 'predictor.'}


def from_moco_v3_checkpoint(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Splits an official MoCo v3 pretraining state_dict into its parts.

  Args:
    flat: checkpoint['state_dict'] of facebookresearch/moco-v3's main_moco.py:
      names `module.base_encoder.*`, `module.momentum_encoder.*`,
      `module.predictor.*` (the leading `module.` of DistributedDataParallel
      may be absent).

  Returns:
    {'backbone', 'projector', 'predictor', 'momentum_backbone',
    'momentum_projector', 'kind'}: each part a {name: numpy array} with the
    names relative to its owner, i.e. the names our modules convert to:
      backbone, momentum_backbone: timm ViT names (`patch_embed.proj.weight`,
        `pos_embed`, `blocks.0.…`) or torchvision ResNet names (`conv1.weight`,
        `layer1.0.…`), for from_timm / the torchvision converter;
      projector, momentum_projector: `head.{0,1,3,4,6,7}.*` (ViT) or
        `fc.{0,1,3,4}.*` (ResNet), our projector's names (MLPHead prefix
        'head' / 'fc');
      predictor: `predictor.{0,1,3[,4]}.*`, our predictor's names.
    'kind' is 'vit' (the projector sits in `head.`) or 'resnet' (`fc.`).

  Raises:
    ValueError: for keys outside these parts, or no projector found.
  """
  parts = {p: {} for p in MOCO_V3_PARTS}
  unexpected = []
  for name, value in flat.items():
    short = name.removeprefix('module.')
    part = next((p for p, prefix in MOCO_V3_PARTS.items()
                 if short.startswith(prefix)), None)
    if part is None:
      unexpected.append(name)
      continue
    key = short if part == 'predictor' else short[len(MOCO_V3_PARTS[part]):]
    parts[part][key] = np.asarray(value)
  if unexpected:
    raise ValueError('not a MoCo v3 checkpoint: unexpected ' + compact_names(unexpected)
                     + '; valid: [module.]{base_encoder,momentum_encoder,predictor}.*')
  base = parts['base_encoder']
  if any(k.startswith('head.') for k in base):
    kind, head = 'vit', 'head.'
  elif any(k.startswith('fc.') for k in base):
    kind, head = 'resnet', 'fc.'
  else:
    raise ValueError('MoCo v3 checkpoint without a projector: no '
                     'base_encoder.head.* (ViT) nor base_encoder.fc.* (ResNet)')

  def split(encoder):
    backbone = {k: v for k, v in encoder.items() if not k.startswith(head)}
    return backbone, {k: v for k, v in encoder.items() if k.startswith(head)}

  backbone, projector = split(base)
  momentum_backbone, momentum_projector = split(parts['momentum_encoder'])
  return {'backbone': backbone, 'projector': projector,
          'predictor': parts['predictor'], 'momentum_backbone': momentum_backbone,
          'momentum_projector': momentum_projector, 'kind': kind}
