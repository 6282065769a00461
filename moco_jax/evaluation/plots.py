"""Pictures of a pretraining run as PNGs (the command line is moco_jax/plots.py):

  loss.png       contrastive loss (and instance-discrimination top-1) per step
  knn.png        kNN top-1 per step (when the run logged it)
  views.png      the two augmented views of a few training images, as the
                 encoders see them (host crops + on-device colour ops)
  retrieval.png  a few evaluation images and their nearest training images by
                 backbone-feature cosine similarity (green: same class)
"""
import io

import matplotlib

matplotlib.use('Agg')  # files only, no display

import matplotlib.pyplot as plt
import numpy as np

from moco_jax.augment.normalization import MEAN_STD
from moco_jax.runtime import paths


def plot_curves(events: list[dict], workdir: str) -> list[str]:
  """loss.png and knn.png from metrics.jsonl events; returns the paths written."""
  written = []
  train = [e for e in events if 'loss' in e]
  if train:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e['step'] for e in train], [e['loss'] for e in train], label='loss')
    ax.set_xlabel('step')
    ax.set_ylabel('InfoNCE loss')
    if 'instance_top1' in train[0]:
      acc = ax.twinx()
      acc.plot([e['step'] for e in train], [e['instance_top1'] for e in train],
               color='tab:orange', alpha=0.6, label='top-1 (positive key)')
      acc.set_ylabel('instance discrimination top-1 (%)')
      lines = ax.get_lines() + acc.get_lines()
      ax.legend(lines, [line.get_label() for line in lines], loc='center right',
                fontsize=8)
    ax.set_title(f'pretraining loss: {paths.basename(paths.absolute(workdir))}')
    written.append(_save(fig, paths.join(workdir, 'loss.png')))
  knn = [e for e in events if 'knn_top1' in e]
  if knn:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([e['step'] for e in knn], [e['knn_top1'] for e in knn], 'o-')
    for e in knn[-1:]:
      ax.annotate(f'{e["knn_top1"]:.1f}', (e['step'], e['knn_top1']),
                  textcoords='offset points', xytext=(0, 6), ha='center')
    ax.set_xlabel('step')
    ax.set_ylabel('kNN top-1 (%)')
    ax.set_title('kNN monitor (eval split)')
    ax.grid(alpha=0.3)
    written.append(_save(fig, paths.join(workdir, 'knn.png')))
  return written


def _save(fig, path: str) -> str:
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=100, format='png')
  plt.close(fig)
  paths.write_bytes_atomic(path, buffer.getvalue())   # local or gs://
  return path


def displayable(images, mean, std):
  """Normalised float images (..., 3) -> float RGB in [0, 1]."""
  return np.clip(np.asarray(images) * np.asarray(std) + np.asarray(mean), 0, 1)


def augmented_views(config, num_images: int, seed: int = 0):
  """Two augmented views of `num_images` training images, as the step sees them.

  Returns:
    (view_q, view_k): float (num_images, S, S, 3) RGB in [0, 1].
  """
  import jax
  from moco_jax.augment import colour as augment
  from moco_jax.data import pipeline
  batch = next(pipeline.pretrain_batches(config.data, num_images, seed))
  mean, std = MEAN_STD[config.data.normalization]
  rng = jax.random.PRNGKey(seed)
  views = []
  for view, images in enumerate((batch['images_q'], batch['images_k'])):
    example_rngs = jax.random.split(jax.random.fold_in(rng, view), num_images)
    x = augment.augment_batch(images, example_rngs, config.data.augment, view,
                              mean, std)
    views.append(displayable(x, mean, std))
  return views


def plot_views(view_q, view_k, path: str) -> str:
  n = len(view_q)
  fig, axes = plt.subplots(2, n, figsize=(1.3 * n, 3), squeeze=False)
  for column in range(n):
    for row, views in enumerate((view_q, view_k)):
      ax = axes[row, column]
      ax.imshow(views[column], interpolation='nearest')
      ax.set_xticks([])
      ax.set_yticks([])
    axes[0, column].set_title(f'image {column}', fontsize=8)
  axes[0, 0].set_ylabel('query view')
  axes[1, 0].set_ylabel('key view')
  return _save(fig, path)


def _features_and_images(features_fn, params, batch_stats, batches, limit: int,
                         desc: str = 'features'):
  """(features (N, F), uint8 images, labels) of up to `limit` examples."""
  from moco_jax.runtime.progress import progress
  features, images, labels = [], [], []
  count = 0
  total = min(len(batches), -(-limit // batches.local_batch))
  for batch in progress(batches, desc, total=total):
    keep = batch['mask']
    features.append(np.asarray(features_fn(params, batch_stats, batch['image']))[keep])
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
    count += int(keep.sum())
    if count >= limit:
      break
  cat = lambda parts: np.concatenate(parts)[:limit]
  return cat(features), cat(images), cat(labels)


def retrieval(config, params, batch_stats, num_queries: int, bank_size: int,
              neighbours: int):
  """Nearest training images of the first eval images by cosine similarity.

  Returns:
    dict(queries (Q, S, S, 3) uint8, query_labels (Q,), neighbours
    (Q, n, S, S, 3) uint8, neighbour_labels (Q, n), similarities (Q, n)).
  """
  import jax
  from moco_jax.evaluation import knn
  from moco_jax.data import pipeline
  mean, std = MEAN_STD[config.data.normalization]
  features_fn = jax.jit(knn.features_fn(knn.backbone_from_config(config),
                                             mean, std))
  batch = min(config.eval.batch_size, 256)
  bank = _features_and_images(
      features_fn, params, batch_stats,
      pipeline.eval_batches(config.data, config.data.train_split, batch), bank_size,
      'retrieval bank')
  query = _features_and_images(
      features_fn, params, batch_stats,
      pipeline.eval_batches(config.data, config.data.eval_split, num_queries),
      num_queries)
  similarities = query[0] @ bank[0].T
  nearest = np.argsort(-similarities, axis=1)[:, :neighbours]
  return dict(queries=query[1], query_labels=query[2], neighbours=bank[1][nearest],
              neighbour_labels=bank[2][nearest],
              similarities=np.take_along_axis(similarities, nearest, axis=1))


def plot_retrieval(found: dict, class_names, path: str) -> str:
  rows, columns = found['neighbours'].shape[:2]
  fig, axes = plt.subplots(rows, columns + 1, figsize=(1.3 * (columns + 1), 1.45 * rows),
                           squeeze=False)
  name = lambda label: class_names[label] if class_names else str(label)
  for row in range(rows):
    ax = axes[row, 0]
    ax.imshow(found['queries'][row], interpolation='nearest')
    ax.set_title(f'query: {name(found["query_labels"][row])}', fontsize=7)
    for column in range(columns):
      ax = axes[row, column + 1]
      ax.imshow(found['neighbours'][row, column], interpolation='nearest')
      same = found['neighbour_labels'][row, column] == found['query_labels'][row]
      for spine in ax.spines.values():
        spine.set_color('tab:green' if same else 'tab:red')
        spine.set_linewidth(3)
      ax.set_title(f'{found["similarities"][row, column]:.2f}', fontsize=7)
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle('nearest training images (cosine similarity of backbone features)',
               fontsize=9)
  return _save(fig, path)


def class_names(data_config):
  from moco_jax.data import sources
  return list(sources.dataset_info(data_config).class_names)
