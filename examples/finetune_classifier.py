"""A user's own Flax classifier that fine-tunes a MoCo backbone end to end.

  python examples/finetune_classifier.py --export=backbone.msgpack [--steps=30]

The backbone is a submodule of the user's nn.Module (one line); its
pretrained arrays go into the model's variables with `Backbone.insert`; the
whole model trains (BatchNorm in train mode, its running statistics
updated). The task is synthetic (which colour channel is brightest), so the
program needs no dataset. Prints one JSON line: the loss before and after,
and how far the backbone's weights moved (they must: it is fine-tuned).
"""
import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import moco_jax


class Classifier(nn.Module):
  """The user's model: the pretrained backbone and a new linear head."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(self.num_classes, name='head')(self.backbone(x, train=train))


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
  model = Classifier(backbone=backbone.module, num_classes=3)
  rng = np.random.default_rng(0)
  images, _ = synthetic_batch(rng, 2, backbone.image_size)
  variables = model.init(jax.random.PRNGKey(0), backbone.normalize(images), train=False)
  variables = backbone.insert(variables, 'backbone')   # the pretrained arrays
  params, batch_stats = variables['params'], variables['batch_stats']
  optimizer = optax.sgd(args.lr, momentum=0.9)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({'params': params, 'batch_stats': batch_stats},
                                    backbone.normalize(images), train=True,
                                    mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  @jax.jit
  def eval_loss(params, batch_stats, images, labels):
    logits = model.apply({'params': params, 'batch_stats': batch_stats},
                         backbone.normalize(images), train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  test_images, test_labels = synthetic_batch(np.random.default_rng(1), 64, backbone.image_size)
  loss_before = float(eval_loss(params, batch_stats, test_images, test_labels))
  for _ in range(args.steps):
    params, batch_stats, opt_state, _ = train_step(
        params, batch_stats, opt_state, *synthetic_batch(rng, args.batch, backbone.image_size))
  loss_after = float(eval_loss(params, batch_stats, test_images, test_labels))
  moved = jax.tree.map(lambda new, old: float(jnp.max(jnp.abs(new - old))),
                       params['backbone'], backbone.variables['params'])
  result = dict(loss_before=loss_before, loss_after=loss_after,
                backbone_max_change=max(jax.tree.leaves(moved)),
                backbone_arrays_changed=sum(v > 0 for v in jax.tree.leaves(moved)),
                backbone_arrays=len(jax.tree.leaves(moved)))
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
