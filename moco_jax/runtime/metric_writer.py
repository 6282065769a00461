"""Log events to workdir/metrics.jsonl (one JSON object each) and TensorBoard.

A local workdir appends; a gs:// one rewrites the object at each event
(paths.RewrittenFile: objects cannot be appended to), so a pre-empted writer
loses at most the last line, as locally. TensorBoard's event files on gs://
go through the same writer (tensorboardX's own gs:// writer needs
google-cloud-storage; ours uses the path layer).
"""
import json

import numpy as np

from moco_jax.runtime import paths


class MetricWriter:
  """Appends {'step': s, **scalars} lines; mirrors scalars to TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = paths.join(workdir, 'metrics.jsonl')
    self._tensorboard = None
    self._remote = paths.RewrittenFile(self.path) if enabled and paths.is_url(self.path) else None
    if enabled:
      from tensorboardX import SummaryWriter
      if paths.is_url(workdir):
        _register_tensorboardx_url_writer(workdir.split('://', 1)[0])
      self._tensorboard = SummaryWriter(paths.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    values = {key: _to_python(value) for key, value in scalars.items()}
    line = json.dumps({'step': int(step), **values}) + '\n'
    if self._remote is not None:
      self._remote.write(line)
      self._remote.flush()
    else:
      paths.append_text(self.path, line)
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
  path = paths.join(workdir, 'metrics.jsonl')
  if not paths.exists(path):
    return []
  with paths.open_file(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class _UrlRecordWriterFactory:
  """tensorboardX's writer-factory interface over paths.RewrittenFile."""

  def open(self, path):
    return paths.RewrittenFile(path, binary=True)

  def directory_check(self, path):
    paths.makedirs(path)


def _register_tensorboardx_url_writer(scheme: str) -> None:
  from tensorboardX import record_writer
  record_writer.register_writer_factory(scheme, _UrlRecordWriterFactory())
