"""The downstream Flax API: a pretrained backbone that a user's own model embeds.

`load_flax_backbone(path)` (a `--format=flax` export) and
`load_backbone_from_workdir(workdir)` (a pretraining run's checkpoint) return
a `Backbone`: the linen module (models.ResNet or models.ViT), its variables
and what it expects (image size, the normalisation mean/std on the [0, 1]
scale, the feature width). A user's nn.Module takes `backbone.module` as a
submodule field and `backbone.insert(variables, 'backbone')` puts the
pretrained arrays into that model's variables; docs/downstream.md shows the
whole program, freezing with optax.multi_transform and the Flax NNX bridge.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moco_jax.models import is_vit, resnet
from moco_jax.models.vit import vit
from moco_jax.weights import export as export_lib


class BackboneError(ValueError):
  """Variables that do not fit the backbone, or images on the wrong scale."""


@dataclasses.dataclass(frozen=True)
class Backbone:
  """A pretrained backbone and what it expects.

  Attributes:
    module: models.ResNet or models.ViT (linen). `module.apply(variables,
      x, train=False)` maps normalised images (N, H, W, 3) to features
      (N, num_features) float32; `intermediates=True` gives the multi-scale
      maps instead (see `features`).
    variables: {'params', 'batch_stats'} as NumPy arrays; a ViT's
      batch_stats is {} (it has no BatchNorm).
    arch: 'resnet50', 'vit_small', ...
    image_size: the pretraining resolution (a ViT's position embedding grid
      was built for it; a ResNet accepts any size).
    mean, std: per-channel RGB normalisation of images scaled to [0, 1]:
      x = (pixels / 255 - mean) / std.
    num_features: width of the pooled features (2048 for ResNet-50, D for
      a ViT).
    step: the pretraining step the weights come from.

  For code written before this class: `module, variables = backbone` unpacks
  it as load_flax_backbone's old (module, variables) pair.
  """
  module: nn.Module
  variables: dict
  arch: str
  image_size: int
  mean: tuple
  std: tuple
  num_features: int
  step: int = 0

  def __iter__(self):
    return iter((self.module, self.variables))

  def normalize(self, images) -> jax.Array:
    """Raw RGB pixels on the 0-255 scale (uint8 or float, (N, H, W, 3)) ->
    the normalised float32 input the module expects.

    Raises:
      BackboneError: concrete float images whose values all lie in [0, 1]
        (already scaled: normalising them again would be silently wrong).
    """
    if (not isinstance(images, jax.core.Tracer)
        and jnp.issubdtype(jnp.asarray(images).dtype, jnp.floating)
        and images.size and float(jnp.max(images)) <= 1.0 and float(jnp.min(images)) >= 0):
      raise BackboneError('images look scaled to [0, 1]; Backbone.normalize takes '
                          'pixels on the 0-255 scale (uint8 or float)')
    mean = jnp.asarray(self.mean, jnp.float32) * 255.0
    std = jnp.asarray(self.std, jnp.float32) * 255.0
    return (jnp.asarray(images, jnp.float32) - mean) / std

  def features(self, images, intermediates: bool = False):
    """Inference features of raw RGB pixels (0-255, (N, H, W, 3)).

    Args:
      images: uint8 or float pixels on the 0-255 scale.
      intermediates: False: pooled features (N, num_features) float32. True,
        a ResNet: {'C2', 'C3', 'C4', 'C5'}, the maps after stages 1-4
        (N, H/s, W/s, C) with s = 4, 8, 16, 32 (1, 2, 4, 8 with the CIFAR
        stem), plus 'pooled'. True, a ViT: {'patch_tokens': (N, H/p, W/p,
        D), 'cls': (N, D)}, after the final LayerNorm.

    BatchNorm uses its running statistics (train=False).
    """
    return self.module.apply(self.variables, self.normalize(images), train=False,
                             intermediates=intermediates)

  def insert(self, variables: dict, name: str = 'backbone') -> dict:
    """A copy of a user model's `variables` with this backbone's arrays under
    the submodule `name` (params and, for a ResNet, batch_stats).

    Raises:
      BackboneError: `name` is missing from the variables, or an array's
        path or shape differs from the backbone's (e.g. another arch).
    """
    out = {collection: dict(tree) for collection, tree in variables.items()}
    for collection, tree in self.variables.items():
      if not tree:
        continue
      if name not in out.get(collection, {}):
        raise BackboneError(f'the model\'s variables have no {collection}/{name}: '
                            f'name the backbone submodule {name!r} or pass name=')
      _check_same_shapes(out[collection][name], tree, f'{collection}/{name}')
      out[collection][name] = jax.tree.map(jnp.asarray, tree)
    return out

  def to_nnx(self, rngs=None):
    """The backbone as a Flax NNX module (flax.nnx.bridge.ToNNX) holding
    these variables: `model(x, train=False)` equals `module.apply(variables,
    x, train=False)`; train mode needs `mutable=['batch_stats']`."""
    from flax import nnx  # pylint: disable=g-import-not-at-top
    sample = jnp.zeros((1, self.image_size, self.image_size, 3), jnp.float32)
    model = nnx.bridge.ToNNX(self.module, rngs=rngs or nnx.Rngs(0))
    model.lazy_init(sample, train=False)
    linen_vars = {k: v for k, v in self.variables.items() if v}
    nnx.update(model, nnx.bridge.variables.linen_vars_to_nnx_attrs(
        jax.tree.map(jnp.asarray, linen_vars)))
    return model


def _check_same_shapes(got, want, where: str):
  got_leaves = dict(jax.tree_util.tree_leaves_with_path(got))
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
  if got_leaves.keys() != want_leaves.keys():
    missing = sorted(map(jax.tree_util.keystr, want_leaves.keys() - got_leaves.keys()))
    extra = sorted(map(jax.tree_util.keystr, got_leaves.keys() - want_leaves.keys()))
    raise BackboneError(f'{where} has other arrays than the pretrained backbone '
                        f'(missing {missing[:3]}, unexpected {extra[:3]}): is it '
                        f'the same arch?')
  for path, leaf in want_leaves.items():
    if np.shape(got_leaves[path]) != np.shape(leaf):
      raise BackboneError(f'{where}{jax.tree_util.keystr(path)} is '
                          f'{np.shape(got_leaves[path])}, the pretrained one '
                          f'{np.shape(leaf)}')


def _build(info: dict, overrides: dict) -> nn.Module:
  if is_vit(info['arch']):
    return vit(info['arch'], image_size=info['image_size'], **overrides)
  return resnet(info['arch'], width_multiplier=info['width_multiplier'],
                cifar_stem=info['cifar_stem'], **overrides)


def _backbone(info: dict, params, batch_stats, step: int, overrides: dict) -> Backbone:
  module = _build(info, overrides)
  as_numpy = lambda tree: jax.tree.map(np.asarray, tree)
  return Backbone(module=module,
                  variables={'params': as_numpy(params),
                             'batch_stats': {} if is_vit(info['arch']) else as_numpy(batch_stats)},
                  arch=info['arch'], image_size=int(info['image_size']),
                  mean=tuple(info['mean']), std=tuple(info['std']),
                  num_features=int(module.num_features), step=int(step))


def load_flax_backbone(path: str, **overrides) -> Backbone:
  """An exported backbone (`python -m moco_jax.export --format=flax`).

  Args:
    path: the .msgpack export, local or gs://.
    **overrides: module attributes to set, e.g. dtype=jnp.bfloat16.

  Returns:
    A Backbone (unpacks as (module, variables) too).

  Raises:
    convert.WeightsError: the file is not a moco_jax Flax export.
  """
  tree = export_lib.read_flax_export(path)
  return _backbone(tree['model'], tree['params'], tree.get('batch_stats', {}),
                   tree.get('step', 0), overrides)


def load_backbone_from_workdir(workdir: str, step: int | None = None,
                               **overrides) -> Backbone:
  """The query encoder's backbone of a pretraining run's checkpoint.

  Args:
    workdir: a moco_jax pretraining workdir.
    step: its checkpoint (default: the newest).
    **overrides: module attributes to set, e.g. dtype=jnp.bfloat16.

  Raises:
    export.ExportError: no checkpoint in workdir, or none at `step`.
  """
  config, step, variables = export_lib.restore_encoder(workdir, step)
  return _backbone(export_lib.model_info(config), variables['params']['backbone'],
                   variables['batch_stats'].get('backbone', {}), step, overrides)
