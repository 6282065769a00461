"""Log events to workdir/metrics.jsonl (one JSON object each) and TensorBoard."""
import json
import os

import numpy as np


class MetricWriter:
  """Appends {'step': s, **scalars} lines; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    if enabled:
      from tensorboardX import SummaryWriter
      self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    values = {key: _to_python(value) for key, value in scalars.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')
    for key, value in values.items():
      if isinstance(value, (int, float)):
        self._tensorboard.add_scalar(key, value, int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _to_python(value):
  value = np.asarray(value)
  if value.dtype.kind in 'iub':
    return int(value)
  return float(value)


def read_metrics(workdir: str) -> list[dict]:
  """All logged events of a workdir, in order."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
