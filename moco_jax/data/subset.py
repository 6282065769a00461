"""Low-label subsets: `data.labels_per_class` examples of every class of the
training split, drawn with `data.labels_seed`.

The subset is a function of the split's labels and the seed alone, so every
process and any device count select the same examples; each process then
reads its part of the subset. The draw is big_vision's few-shot one: per
class, a permutation of the class's example positions by
np.random.default_rng(seed), of which the first `per_class` are kept (so
for one seed, the 1-shot subset lies inside the 5-shot one, and so on).

For ImageNet's semi-supervised protocol use the fixed subsets that TFDS
ships instead: data.dataset='imagenet2012_subset/1pct' or '/10pct'
(their train splits; validation is ImageNet's).
"""
import functools

import numpy as np

from moco_jax.data import npz
from moco_jax.data.info import DatasetError


def balanced_subset(labels: np.ndarray, per_class: int, seed: int,
                    num_classes: int | None = None) -> np.ndarray:
  """Positions of `per_class` examples of every class, sorted.

  Args:
    labels: (N,) int labels of the whole split (all processes).
    per_class: examples per class (> 0).
    seed: the draw's seed.
    num_classes: classes expected (default: max(labels) + 1); every one
      must have `per_class` examples.

  Returns:
    (num_classes * per_class,) int64 positions into `labels`, ascending.

  Raises:
    DatasetError: a class with fewer than `per_class` examples, or labels
      that are negative (no labels).
  """
  labels = np.asarray(labels)
  if labels.size == 0 or labels.min() < 0:
    raise DatasetError('data.labels_per_class needs a labelled training split; '
                       'this one has examples without a label')
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  rng = np.random.default_rng(seed)
  chosen = []
  for label in range(num_classes):
    positions = rng.permutation(np.flatnonzero(labels == label))
    if len(positions) < per_class:
      raise DatasetError(
          f'data.labels_per_class={per_class} is more than the {len(positions)} '
          f'examples of class {label} in the training split; at most '
          f'{min(np.bincount(labels, minlength=num_classes))} for every class')
    chosen.append(positions[:per_class])
  return np.sort(np.concatenate(chosen))


@functools.lru_cache(maxsize=8)
def _labels(dataset: str, data_dir: str, split: str) -> np.ndarray:
  if npz.is_npz(dataset):
    return npz.split_arrays(dataset, split)[1]
  from moco_jax.data import sources  # pylint: disable=g-import-not-at-top (TensorFlow)
  return sources.split_labels(dataset, data_dir, split)


def subset_of(data_config, split: str) -> np.ndarray | None:
  """The positions in `split` that the run uses: balanced_subset when
  data.labels_per_class > 0 and `split` is data.train_split, else None
  (the whole split). Evaluation splits are never subsampled."""
  per_class = data_config.get('labels_per_class', 0)
  if not per_class or split != data_config.train_split:
    return None
  if per_class < 0:
    raise DatasetError(f'data.labels_per_class={per_class} must be positive, or 0 '
                       f'for every label of the split')
  labels = _labels(data_config.dataset, data_config.get('data_dir', '') or '', split)
  return balanced_subset(labels, per_class, data_config.get('labels_seed', 0))


def subset_key(data_config) -> tuple:
  """What distinguishes two subsets of one split (for caches)."""
  return (data_config.get('labels_per_class', 0), data_config.get('labels_seed', 0))
