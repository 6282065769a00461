"""What a dataset is, without TensorFlow: its description and its error.

Shared by the host pipeline (sources.py, TensorFlow) and the device-resident
path (device.py, npz.py), which must import no TensorFlow for `npz:` data.
"""
import dataclasses


class DatasetError(ValueError):
  """The configured dataset cannot be read (bad name, missing data_dir, …)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  data_dir: str | None
  num_examples: int   # in the described split, all processes together
  num_classes: int
  class_names: tuple[str, ...]
