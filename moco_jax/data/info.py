"""What a dataset is, without TensorFlow: its description, its error, and
which part of a split each process reads.

Shared by the host pipeline (sources.py, TensorFlow) and the device-resident
path (device.py, npz.py), which must import no TensorFlow for `npz:` data.
"""
import dataclasses

import jax
import numpy as np


class DatasetError(ValueError):
  """The configured dataset cannot be read (bad name, missing data_dir, …)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  data_dir: str | None
  num_examples: int   # in the described split, all processes together
  num_classes: int
  class_names: tuple[str, ...]


def single_class_warning(metric: str, data_config) -> str:
  """The line printed when an accuracy is measured on one class: every
  prediction is then that class, so 100% says nothing about the features."""
  return (f'warning: data.dataset {data_config.dataset!r} has a single class, so '
          f'{metric} is 100% whatever the features are; kNN and linear accuracy need '
          f'labelled data with several classes (unlabelled images in one class folder '
          f'are fine for pretraining: set eval.knn_every=0)')


def process_part(count: int, drop_remainder: bool) -> slice:
  """This process's contiguous part of `count` examples, as
  tfds.split_for_jax_process divides a split (drop_remainder: equal parts,
  the last count % processes examples read by none)."""
  processes, index = jax.process_count(), jax.process_index()
  if drop_remainder:
    per = count // processes
    return slice(index * per, (index + 1) * per)
  bounds = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(count), processes)])
  return slice(int(bounds[index]), int(bounds[index + 1]))
