"""The one JSON object every benchmark prints (and writes to --json)."""
import datetime
import json
import sys


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
