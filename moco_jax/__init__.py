"""moco_jax: MoCo (Momentum Contrast) self-supervised pretraining in JAX/Flax.

The public API; these names stay stable:
  train_and_evaluate(config, workdir)   pretrain (moco_jax.train)
  load_pretrained(workdir, mesh, step)  a run's query-encoder backbone (weights.pretrained)
  load_flax_backbone(path)              a Flax export -> Backbone: module, variables,
                                        image_size, mean/std, num_features (weights.backbone)
  load_backbone_from_workdir(workdir)   the same from a pretraining checkpoint (weights.backbone)
  Backbone                              what both return; .features(images, intermediates=True)
                                        gives multi-scale maps, .to_nnx() a Flax NNX module
  few_shot_accuracy(train_x, train_y, test_x, test_y, classes)
                                        closed-form few-shot linear evaluation (evaluation.fewshot)
  build_encoder, resnet, ResNet         the model builders (models)
  crop_window(image_shape, seed, scale) torchvision's RandomResizedCrop window (data.crops)

Names are imported on first use, so `import moco_jax.models` alone loads
neither TensorFlow nor the training loop.
"""
import importlib

_PUBLIC = {
    'train_and_evaluate': ('moco_jax.train', 'train_and_evaluate'),
    'load_pretrained': ('moco_jax.weights.pretrained', 'load'),
    'load_flax_backbone': ('moco_jax.weights.backbone', 'load_flax_backbone'),
    'load_backbone_from_workdir': ('moco_jax.weights.backbone', 'load_backbone_from_workdir'),
    'Backbone': ('moco_jax.weights.backbone', 'Backbone'),
    'few_shot_accuracy': ('moco_jax.evaluation.fewshot', 'few_shot_accuracy'),
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
