"""The same classifier in Flax NNX: the MoCo backbone through nnx.bridge.

  python examples/nnx_classifier.py --export=backbone.msgpack [--steps=30]

`Backbone.to_nnx()` wraps the linen backbone with flax.nnx.bridge.ToNNX and
loads its pretrained params and batch statistics into it; the user's
nnx.Module holds it as an attribute next to an nnx.Linear head. Inference
(train=False) equals the linen module's output; training calls the backbone
with mutable=['batch_stats'] so BatchNorm's running statistics update.
Prints one JSON line: the largest difference between the NNX and linen
features, the loss before and after fine-tuning, and the backbone's change.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import moco_jax


class Classifier(nnx.Module):
  """The pretrained backbone (bridged) and a new linear head."""

  def __init__(self, backbone: 'moco_jax.Backbone', num_classes: int, rngs: nnx.Rngs):
    self.backbone = backbone.to_nnx(rngs)
    self.head = nnx.Linear(backbone.num_features, num_classes, rngs=rngs)

  def __call__(self, x, train: bool):
    mutable = ['batch_stats'] if train else False
    return self.head(self.backbone(x, train=train, mutable=mutable))


def synthetic_batch(rng: np.random.Generator, batch: int, size: int):
  """uint8 images whose label is the brightest colour channel (3 classes)."""
  labels = rng.integers(0, 3, batch)
  images = rng.integers(0, 150, (batch, size, size, 3))
  images[np.arange(batch), :, :, labels] += 100
  return images.astype(np.uint8), labels.astype(np.int32)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--export', required=True, help='a --format=flax export')
  parser.add_argument('--steps', type=int, default=30)
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--lr', type=float, default=0.05)
  args = parser.parse_args(argv)

  backbone = moco_jax.load_flax_backbone(args.export)
  model = Classifier(backbone, num_classes=3, rngs=nnx.Rngs(0))
  test_images, test_labels = synthetic_batch(np.random.default_rng(1), 64, backbone.image_size)
  x = backbone.normalize(test_images)
  linen_features = backbone.module.apply(backbone.variables, x, train=False)
  nnx_features = model.backbone(x, train=False)
  before = jax.tree.map(np.array, nnx.state(model.backbone, nnx.Param))

  optimizer = nnx.Optimizer(model, optax.sgd(args.lr, momentum=0.9), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, images, labels):
    def loss_fn(model):
      logits = model(backbone.normalize(images), train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def eval_loss(model, images, labels):
    logits = model(backbone.normalize(images), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  loss_before = float(eval_loss(model, test_images, test_labels))
  rng = np.random.default_rng(0)
  for _ in range(args.steps):
    train_step(model, optimizer, *synthetic_batch(rng, args.batch, backbone.image_size))
  loss_after = float(eval_loss(model, test_images, test_labels))
  after = nnx.state(model.backbone, nnx.Param)
  change = max(float(jnp.max(jnp.abs(jnp.asarray(a) - b)))
               for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)))
  result = dict(nnx_linen_max_difference=float(jnp.max(jnp.abs(nnx_features - linen_features))),
                loss_before=loss_before, loss_after=loss_after, backbone_max_change=change)
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
