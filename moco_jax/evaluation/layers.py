"""Which layer of a classifier each variable belongs to: what freezing a backbone
up to a named stage and layer-wise lr decay are defined on.

Layers are numbered from the input: a ResNet's stem (conv1, bn1) is 0, its
stages layer1..layer4 are 1..4 and the head is 5; a ViT's patch embedding
and class token are 0, block i is i + 1, and the final norm and the head are
depth + 1 (BEiT's and MAE's `get_layer_id_for_vit` numbering, so that
their layer_decay values carry over).
"""
import re

import jax
import numpy as np

FREEZE_ALL = 'all'


def _keys(path) -> tuple:
  return tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def num_layers(backbone_params) -> int:
  """The head's layer index: 5 for a ResNet, depth + 1 for a ViT."""
  if 'cls_token' in backbone_params:
    return 1 + sum(1 for name in backbone_params if name.startswith('blocks_'))
  return 1 + sum(1 for name in {n.split('_')[0] for n in backbone_params}
                 if re.fullmatch(r'layer\d+', name))


def layer_of(keys: tuple, head_layer: int) -> int:
  """The layer of a variable at `keys` (('backbone', 'layer2_0', ...) or
  ('head', ...)) in a classifier whose head is layer `head_layer`."""
  if keys[0] != 'backbone':
    return head_layer
  name = keys[1]
  if name in ('conv1', 'bn1', 'patch_embed', 'cls_token', 'pos_embed'):
    return 0
  match = re.fullmatch(r'layer(\d+)_\d+', name)
  if match:
    return int(match.group(1))
  match = re.fullmatch(r'blocks_(\d+)', name)
  if match:
    return int(match.group(1)) + 1
  return head_layer   # a ViT's final norm


def stage_names(backbone_params) -> tuple[str, ...]:
  """The values finetune.freeze_to accepts for this backbone, input first."""
  if 'cls_token' in backbone_params:
    depth = num_layers(backbone_params) - 1
    return ('patch_embed',) + tuple(f'blocks_{i}' for i in range(depth)) + (FREEZE_ALL,)
  stages = num_layers(backbone_params) - 1
  return ('stem',) + tuple(f'layer{i}' for i in range(1, stages + 1)) + (FREEZE_ALL,)


def frozen_through(freeze_to: str, backbone_params) -> int:
  """The last frozen layer for finetune.freeze_to: -1 for '' (nothing).

  Raises:
    ValueError: one line naming freeze_to and the valid names.
  """
  if not freeze_to:
    return -1
  names = stage_names(backbone_params)
  if freeze_to not in names:
    raise ValueError(f'finetune.freeze_to={freeze_to!r} is not a stage of this '
                     f'backbone; valid: {", ".join(names)} or empty')
  if freeze_to == FREEZE_ALL:
    return num_layers(backbone_params)   # a ViT's final norm shares the head's index
  return names.index(freeze_to)


def update_scales(variables, freeze_to: str, layer_decay: float):
  """A tree like `variables` ({'backbone', 'head'} params or batch_stats) of
  float32 factors: 0 for a frozen layer, else layer_decay^(head - layer)."""
  backbone = variables.get('backbone', {})
  head_layer = num_layers(backbone) if backbone else 0
  last_frozen = frozen_through(freeze_to, backbone) if backbone else -1

  def scale(path, _):
    keys = _keys(path)
    layer = layer_of(keys, head_layer)
    if keys[0] == 'backbone' and layer <= last_frozen:
      return np.float32(0.0)
    return np.float32(layer_decay ** (head_layer - layer))

  return jax.tree_util.tree_map_with_path(scale, variables)


def backbone_mask(variables):
  """A tree like `variables` of bools: True under 'backbone'."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _keys(path)[0] == 'backbone', variables)
