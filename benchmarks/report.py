"""The one JSON object every benchmark prints (and writes to --json), and the
one way the input benchmarks time an iterator."""
import datetime
import json
import statistics
import sys
import time


def emit_json(result: dict, path: str | None) -> None:
  """Adds `date` (UTC, ISO) and `command`, prints `result` as JSON and writes
  it to `path` when given."""
  result = dict(result, date=datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'), command=' '.join(sys.argv))
  text = json.dumps(result, indent=2)
  print(text)
  if path:
    with open(path, 'w') as f:
      f.write(text + '\n')


def images_per_second(batches, batch: int, steps: int, repeats: int):
  """(median, rates): images/s over `repeats` passes of `steps` batches of
  `batch` images, after one untimed pass (start-up: worker processes,
  autotune, page cache)."""
  for _ in range(steps):
    next(batches)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(batches)
    rates.append(steps * batch / (time.perf_counter() - start))
  return statistics.median(rates), rates
