"""A dense (segmentation) head on a frozen MoCo backbone's C4 map.

  python examples/frozen_dense_head.py --export=backbone.msgpack [--steps=60]

`Backbone.features(images, intermediates=True)` gives the ResNet's C2-C5
maps (a ViT's patch-token grid); a 1x1 conv on C4 predicts, per C4 cell,
whether it lies inside a bright square (a synthetic segmentation task).
The backbone is frozen the way docs/downstream.md describes: BatchNorm in
inference mode (train=False), jax.lax.stop_gradient on its params (no
backward pass through it) and optax.multi_transform giving them
optax.set_to_zero() (no update, no weight decay), so only the head changes. Prints one JSON
line: pixel accuracy of the head against always predicting the majority
class, and whether the backbone's arrays are bit-identical afterwards.
"""
import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

import moco_jax


class DenseModel(nn.Module):
  """Backbone C4 map -> LayerNorm (features of any scale) -> a 1x1 conv ->
  one logit per C4 cell."""
  backbone: nn.Module

  @nn.compact
  def __call__(self, x):
    maps = self.backbone(x, train=False, intermediates=True)
    c4 = maps['C4'] if 'C4' in maps else maps['patch_tokens']
    return nn.Conv(1, (1, 1), name='head')(nn.LayerNorm(name='norm')(c4))[..., 0]


def synthetic_batch(rng: np.random.Generator, batch: int, size: int, grid: int):
  """Images with one bright square on noise, and its mask on the grid x grid
  cells of the map (1 where the cell's centre lies inside the square)."""
  images = rng.integers(0, 120, (batch, size, size, 3)).astype(np.int32)
  masks = np.zeros((batch, grid, grid), np.float32)
  cell = size // grid
  for i in range(batch):
    side = rng.integers(size // 2, 3 * size // 4 + 1)   # 25-56% of the image
    top, left = rng.integers(0, size - side + 1, 2)
    images[i, top:top + side, left:left + side] += 130
    centres = np.arange(grid) * cell + cell // 2
    inside_rows = (centres >= top) & (centres < top + side)
    inside_cols = (centres >= left) & (centres < left + side)
    masks[i] = np.outer(inside_rows, inside_cols)
  return images.astype(np.uint8), masks


def freeze(params, frozen: str = 'backbone'):
  """optax.multi_transform labels: 'frozen' under `frozen`, else 'trained'."""
  return traverse_util.path_aware_map(
      lambda path, _: 'frozen' if path[0] == frozen else 'trained', params)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--export', required=True, help='a --format=flax export')
  parser.add_argument('--steps', type=int, default=60)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--lr', type=float, default=0.03)
  args = parser.parse_args(argv)

  backbone = moco_jax.load_flax_backbone(args.export)
  size = backbone.image_size
  grid = backbone.features(np.zeros((1, size, size, 3), np.uint8), intermediates=True)
  grid = (grid['C4'] if 'C4' in grid else grid['patch_tokens']).shape[1]
  model = DenseModel(backbone=backbone.module)
  rng = np.random.default_rng(0)
  images, _ = synthetic_batch(rng, 2, size, grid)
  variables = model.init(jax.random.PRNGKey(0), backbone.normalize(images))
  variables = backbone.insert(variables, 'backbone')
  params = variables['params']
  optimizer = optax.multi_transform(
      {'trained': optax.adam(args.lr), 'frozen': optax.set_to_zero()}, freeze(params))
  opt_state = optimizer.init(params)

  def logits_fn(params, images):
    return model.apply(dict(variables, params=params), backbone.normalize(images))

  @jax.jit
  def train_step(params, opt_state, images, masks):
    def loss_fn(params):
      # No gradient through the frozen backbone: XLA then skips its backward.
      params = dict(params, backbone=jax.lax.stop_gradient(params['backbone']))
      return optax.sigmoid_binary_cross_entropy(logits_fn(params, images), masks).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(args.steps):
    params, opt_state, _ = train_step(params, opt_state,
                                      *synthetic_batch(rng, args.batch, size, grid))
  test_images, test_masks = synthetic_batch(np.random.default_rng(1), 128, size, grid)
  predicted = np.asarray(logits_fn(params, test_images)) > 0
  majority = max(test_masks.mean(), 1 - test_masks.mean())
  same = jax.tree.leaves(jax.tree.map(
      lambda new, old: bool(np.array_equal(np.asarray(new), old)),
      params['backbone'], backbone.variables['params']))
  result = dict(grid=int(grid), pixel_accuracy=float(np.mean(predicted == (test_masks > 0.5))),
                majority_accuracy=float(majority), backbone_unchanged=all(same),
                backbone_arrays=len(same))
  print(json.dumps(result))
  return result


if __name__ == '__main__':
  main()
