"""The kNN monitor of the MoCo CIFAR-10 demo, batched and on the device.

Bank: L2-normalised features of the training split (evaluation transform,
BN in inference mode): `eval.knn_features = 'backbone'` the pooled backbone
features, `'head'` the query encoder's projection (backbone + head), as the
reference CIFAR demo's monitor. Each evaluation image takes its top-k
cosine neighbours in the bank, weighs each by exp(similarity / t), sums the
weights per class and predicts the arg-max.

The bank stays sharded over the 'data' mesh axis (a 1.28M × 2048 bank is
10 GB in float32): every device finds the top-k of each evaluation batch
among its own bank rows, chunk by chunk, and the devices' candidates are
merged into the global top-k.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax.augment import colour as augment
from moco_jax.data import inputs
from moco_jax.data.info import DatasetError, single_class_warning
from moco_jax.config.checks import KNN_FEATURES, ConfigError, image_size_problems
from moco_jax.config.ranges import range_problems
from moco_jax.models import build_backbone, build_encoder
from moco_jax.runtime.mesh import AXIS, sharded_jit
from moco_jax.runtime.progress import progress
from moco_jax.augment.normalization import MEAN_STD

# Bank rows compared with an evaluation batch at a time: a (batch, chunk)
# float32 similarity block, 16 MB for a batch of 512.
DEFAULT_CHUNK = 8192


def l2_normalize(x, eps=1e-12):
  """Rows of (N, F) to unit length (F.normalize's eps)."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, eps)


def knn_topk(test_features, bank_features, bank_labels, k: int, chunk: int,
             bank_mask=None):
  """The k most similar bank rows of each test row, scanning the bank in chunks.

  Args:
    test_features: (T, F) L2-normalised.
    bank_features: (M, F) L2-normalised.
    bank_labels: (M,) int.
    k: neighbours to keep. With fewer than k valid bank rows, the missing
      neighbours have similarity -inf (weight 0 in `knn_vote`).
    chunk: bank rows per similarity block (any size; the last block is
      smaller when it does not divide M).
    bank_mask: optional (M,) bool; False rows (padding) are never chosen.

  Returns:
    (similarities (T, k) float32, descending; labels (T, k) int32).
  """
  num_test, num_bank = test_features.shape[0], bank_features.shape[0]
  chunk = max(1, min(chunk, num_bank))
  bank_labels = bank_labels.astype(jnp.int32)
  if bank_mask is None:
    bank_mask = jnp.ones((num_bank,), bool)

  def merge(best, start, size):
    best_sims, best_labels = best
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)
    sims = jnp.dot(test_features, rows(bank_features).T,
                   preferred_element_type=jnp.float32)
    sims = jnp.where(rows(bank_mask)[None, :], sims, -jnp.inf)
    labels = jnp.broadcast_to(rows(bank_labels)[None, :], sims.shape)
    sims = jnp.concatenate([best_sims, sims], axis=1)
    labels = jnp.concatenate([best_labels, labels], axis=1)
    top_sims, where = jax.lax.top_k(sims, k)
    return top_sims, jnp.take_along_axis(labels, where, axis=1)

  best = (jnp.full((num_test, k), -jnp.inf, jnp.float32),
          jnp.zeros((num_test, k), jnp.int32))
  full_chunks, rest = divmod(num_bank, chunk)
  best = jax.lax.fori_loop(0, full_chunks,
                           lambda i, best: merge(best, i * chunk, chunk), best)
  if rest:
    best = merge(best, full_chunks * chunk, rest)
  return best


def knn_vote(similarities, labels, num_classes: int, temperature: float):
  """Weighted vote: arg-max over classes of sum of exp(similarity / t).

  similarities, labels: (T, k) from `knn_topk`. Returns (T,) int32.
  """
  # Subtracting each row's best similarity rescales its weights by a
  # constant (same arg-max) and keeps exp() finite for small t.
  shifted = similarities - similarities[:, :1]
  weights = jnp.exp(shifted / temperature)
  rows = jnp.arange(labels.shape[0])[:, None]
  scores = jnp.zeros((labels.shape[0], num_classes), jnp.float32)
  scores = scores.at[rows, labels].add(weights)
  return jnp.argmax(scores, axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('num_classes', 'k', 'chunk'))
def knn_predict(test_features, bank_features, bank_labels, num_classes: int,
                k: int = 200, temperature: float = 0.1, chunk: int = DEFAULT_CHUNK):
  """kNN class predictions of the MoCo CIFAR demo.

  Args:
    test_features: (T, F) L2-normalised features.
    bank_features: (M, F) L2-normalised features of the labelled bank.
    bank_labels: (M,) int labels in [0, num_classes).
    num_classes: number of classes.
    k: neighbours (200 in the demo).
    temperature: weight of a neighbour is exp(similarity / temperature).
    chunk: bank rows compared at a time (memory (T, chunk + k)).

  Returns:
    (T,) int32 predicted labels.
  """
  similarities, labels = knn_topk(test_features, bank_features, bank_labels, k, chunk)
  return knn_vote(similarities, labels, num_classes, temperature)


def backbone_from_config(config: ml_collections.ConfigDict):
  """The pretraining config's backbone (for inference, no BN groups): a
  ResNet (pooled features) or a ViT (the final-norm class token)."""
  return build_backbone(config.model, 1, jnp.dtype(config.dtype),
                        config.model.conv_impl,
                        image_size=config.data.image_size)


def knn_features(config: ml_collections.ConfigDict) -> str:
  """eval.knn_features (saved configs: upgraded when loaded)."""
  return config.eval.knn_features


def feature_model(config: ml_collections.ConfigDict):
  """(module, width) whose inference output kNN compares: the backbone
  ('backbone', width F) or the whole query encoder ('head', width model.dim).

  Raises ConfigError for another eval.knn_features.
  """
  kind = knn_features(config)
  if kind == 'backbone':
    backbone = backbone_from_config(config)
    return backbone, backbone.num_features
  if kind == 'head':
    encoder = build_encoder(config.model, 1, jnp.dtype(config.dtype),
                            config.model.conv_impl,
                            image_size=config.data.image_size)
    return encoder, config.model.dim
  raise ConfigError(f'eval.knn_features={kind!r} is not one of '
                    f'{", ".join(KNN_FEATURES)}')


def features_fn(model, mean, std):
  """f(params, batch_stats, uint8 images (N, S, S, 3)) -> (N, F) unit rows,
  with BN in inference mode; `model` a backbone or an Encoder (then params
  and batch_stats are the encoder's, {'backbone', 'head'})."""
  def features(params, batch_stats, images):
    x = augment.normalize(images, mean, std)
    out = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                      train=False)
    return l2_normalize(out.astype(jnp.float32))
  return features


def clamped_k(k: int, bank_size: int) -> int:
  """min(k, bank_size), with a one-line note when k is larger than the bank
  (the extra neighbours would have weight 0: the result is the same)."""
  if k <= bank_size:
    return k
  if jax.process_index() == 0:
    print(f'note: eval.knn_k={k} is more than the {bank_size} images of the kNN '
          f'bank (data.train_split); using k={bank_size}', flush=True)
  return bank_size


class KnnEvaluator:
  """kNN top-1 of a query encoder: bank = data.train_split, queries =
  data.eval_split, features per eval.knn_features.

  Usage: `KnnEvaluator(config, mesh)(state.params, state.batch_stats)` (the
  whole encoder's variables) -> {'knn_top1': percent}. The evaluation batch
  (`eval.batch_size`, global) must be divisible by the mesh size. Datasets
  are opened once, so calling it every epoch re-reads (or, with data.cache,
  reuses) the same images. on_device: the run's data.on_device decision
  (experiment.Experiment's); None for a kNN run of its own, which decides
  from the two splits it reads.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh,
               chunk: int = DEFAULT_CHUNK, on_device: bool | None = None):
    batch, devices = config.eval.batch_size, mesh.size
    problems = range_problems(config) + image_size_problems(config.model.arch,
                                                            config.data.image_size)
    if not problems and batch % devices:
      problems.append(f'eval.batch_size={batch} must be a positive multiple of '
                      f'the {devices} devices')
    if problems:
      raise ConfigError('; '.join(problems))
    self.config, self.mesh = config, mesh
    self.k, self.temperature, self.chunk = config.eval.knn_k, config.eval.knn_t, chunk
    self.num_classes = inputs.dataset_info(config.data).num_classes
    if self.num_classes <= 0:
      raise DatasetError(
          f'data.dataset {config.data.dataset!r} has no class labels for kNN')
    if self.num_classes == 1 and jax.process_index() == 0:
      print(single_class_warning('knn_top1', config.data), flush=True)
    local_batch = batch // jax.process_count()
    if on_device is None:
      on_device = inputs.on_device(config.data, mesh, with_eval=True)[0]
    # From the devices' copy of the splits with data.on_device (inputs.py).
    self.bank_batches = inputs.eval_batches(
        config.data, config.data.train_split, local_batch, mesh, on_device)
    self.test_batches = inputs.eval_batches(
        config.data, config.data.eval_split, local_batch, mesh, on_device)
    self.k = clamped_k(self.k, self.bank_batches.num_examples)
    mean, std = MEAN_STD[config.data.normalization]
    model, self.num_features = feature_model(config)
    self.use_head = knn_features(config) == 'head'
    self.features = features_fn(model, mean, std)
    self._bank_sharding = NamedSharding(mesh, P(None, AXIS))
    self._store = self._make_store()
    self._classify = self._make_classify()

  def _make_store(self):
    """Jitted: write one batch's features into row `index` of the bank."""
    def store(bank, params, batch_stats, images, labels, mask, index):
      features, bank_labels, bank_mask = bank
      put = lambda rows, new: jax.lax.dynamic_update_index_in_dim(rows, new, index, 0)
      return (put(features, self.features(params, batch_stats, images)),
              put(bank_labels, labels), put(bank_mask, mask))

    bank_spec = (P(None, AXIS),) * 3
    return sharded_jit(store, self.mesh, out_specs=bank_spec, donate=(0,), check_vma=True,
                       in_specs=(bank_spec, P(), P(), P(AXIS), P(AXIS), P(AXIS), P()))

  def _make_classify(self):
    """Jitted: predictions for one global batch, from the sharded bank."""
    def classify(bank, params, batch_stats, images, labels, mask):
      features, bank_labels, bank_mask = (x.reshape((-1,) + x.shape[2:]) for x in bank)
      queries = jax.lax.all_gather(self.features(params, batch_stats, images),
                                   AXIS, tiled=True)
      sims, neighbour_labels = knn_topk(queries, features, bank_labels, self.k,
                                        self.chunk, bank_mask)
      # Every device's local top-k, then the global top-k among them.
      sims = jax.lax.all_gather(sims, AXIS, axis=1, tiled=True)
      neighbour_labels = jax.lax.all_gather(neighbour_labels, AXIS, axis=1, tiled=True)
      sims, where = jax.lax.top_k(sims, self.k)
      neighbour_labels = jnp.take_along_axis(neighbour_labels, where, axis=1)
      predictions = knn_vote(sims, neighbour_labels, self.num_classes, self.temperature)
      gather = lambda x: jax.lax.all_gather(x, AXIS, tiled=True)
      return predictions, gather(labels), gather(mask)

    return sharded_jit(classify, self.mesh, out_specs=(P(), P(), P()),
                       in_specs=((P(None, AXIS),) * 3, P(), P(), P(AXIS), P(AXIS), P(AXIS)))

  def bank(self, params, batch_stats):
    """Features of the whole training split, sharded over devices.

    Returns:
      (features (B, global_batch, F) float32, labels (B, global_batch) int32,
       mask (B, global_batch) bool) with B batches; padding has mask False.
    """
    num_batches, global_batch = len(self.bank_batches), self.config.eval.batch_size
    width = self.num_features
    zeros = jax.jit(lambda: (jnp.zeros((num_batches, global_batch, width), jnp.float32),
                             jnp.zeros((num_batches, global_batch), jnp.int32),
                             jnp.zeros((num_batches, global_batch), bool)),
                    out_shardings=(self._bank_sharding,) * 3)
    bank = zeros()
    for index, batch in enumerate(progress(self.bank_batches, 'kNN bank')):
      bank = self._store(bank, params, batch_stats, batch['image'], batch['label'],
                         batch['mask'],
                         jnp.int32(index))
      bank[2].block_until_ready()  # the bar counts computed batches
    return bank

  def predict(self, params, batch_stats):
    """(labels, predictions): int32 NumPy arrays over the whole eval split."""
    bank = self.bank(params, batch_stats)
    labels, predictions = [], []
    for batch in progress(self.test_batches, 'kNN queries'):
      predicted, label, mask = jax.device_get(self._classify(
          bank, params, batch_stats, batch['image'], batch['label'], batch['mask']))
      labels.append(label[mask])
      predictions.append(predicted[mask])
    return np.concatenate(labels), np.concatenate(predictions)

  def __call__(self, params, batch_stats) -> dict:
    """{'knn_top1': percent of the eval split classified correctly}.

    params, batch_stats: the query encoder's ({'backbone', 'head'}; the
    backbone's alone are enough for eval.knn_features='backbone').
    """
    if not self.use_head and 'backbone' in params:
      # A ViT backbone has no BN statistics.
      params, batch_stats = params['backbone'], batch_stats.get('backbone', {})
    labels, predictions = self.predict(params, batch_stats)
    # From the integer count: 100 * mean() rounds twice (40.760000000000005).
    correct = int(np.sum(labels == predictions))
    return {'knn_top1': 100.0 * correct / max(1, len(labels))}
