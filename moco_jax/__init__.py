"""moco_jax: MoCo (Momentum Contrast) self-supervised pretraining in JAX/Flax.

The public API; these names stay stable:
  train_and_evaluate(config, workdir)   pretrain (moco_jax.train)
  load_pretrained(workdir, mesh, step)  a run's query-encoder backbone (weights.pretrained)
  load_flax_backbone(path)              a Flax export -> (backbone, variables) (weights.export)
  build_encoder, resnet, ResNet         the model builders (models)
  crop_window(image_shape, seed, scale) torchvision's RandomResizedCrop window (data.crops)

Names are imported on first use, so `import moco_jax.models` alone loads
neither TensorFlow nor the training loop.
"""
import importlib

_PUBLIC = {
    'train_and_evaluate': ('moco_jax.train', 'train_and_evaluate'),
    'load_pretrained': ('moco_jax.weights.pretrained', 'load'),
    'load_flax_backbone': ('moco_jax.weights.export', 'load_flax_backbone'),
    'build_encoder': ('moco_jax.models', 'build_encoder'),
    'resnet': ('moco_jax.models', 'resnet'),
    'ResNet': ('moco_jax.models', 'ResNet'),
    'crop_window': ('moco_jax.data.crops', 'crop_window'),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name not in _PUBLIC:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module, attribute = _PUBLIC[name]
  return getattr(importlib.import_module(module), attribute)


def __dir__():
  return sorted(list(globals()) + __all__)
