"""What a compiled XLA program costs per device: memory, FLOPs, collectives,
and the roofline lower bound of its run time (no MoCo knowledge here).

Reads `jax.stages.Compiled`: memory_analysis() (argument, output, temporary
and aliased bytes of one device), cost_analysis() (FLOPs and bytes accessed
of the per-device program, as XLA counts them: every op, augmentation
included) and the optimised HLO text (the collectives and their shapes).
"""
import re

_COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all',
                'collective-permute')
_OP = re.compile(r'=\s*(\([^=]*?\)|[a-z0-9]+\[[\d,]*\](?:\{[^}]*\})?)\s+('
                 + '|'.join(_COLLECTIVES) + r')(-start)?\(')
_ARRAY = re.compile(r'\b(pred|[su](?:4|8|16|32|64)|bf16|f16|f32|f64|c64|c128|f8e\w+)'
                    r'\[([\d,]*)\]')
_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2,
          'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
          'c128': 16}
_COMMENT = re.compile(r'/\*.*?\*/')
_GROUPS_IOTA = re.compile(r'replica_groups=\[(\d+),(\d+)\]')
_GROUPS_LIST = re.compile(r'replica_groups=\{\{([\d,]*)\}')


def _arrays(shape_text: str) -> list[tuple[str, int]]:
  """'(f32[8,4], bf16[2])' -> [('f32[8,4]', 128), ('bf16[2]', 4)]."""
  found = []
  for dtype, dims in _ARRAY.findall(shape_text):
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    found.append((f'{dtype}[{dims}]', count * _BYTES.get(dtype, 1)))
  return found


def _group_size(line: str, num_devices: int) -> int:
  match = _GROUPS_IOTA.search(line)
  if match:
    return int(match.group(2))
  match = _GROUPS_LIST.search(line)
  if match:
    return max(1, len([d for d in match.group(1).split(',') if d]))
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> list[dict]:
  """The collectives of an optimised HLO module, one dict per op:
  {'op', 'shape', 'bytes' (its result on one device), 'group' (devices taking
  part), 'bytes_per_chip' (bytes each chip sends or receives: ring all-gather
  and all-to-all (n-1)/n of the result, all-reduce 2(n-1)/n, reduce-scatter
  (n-1) × the result, collective-permute the result)}."""
  found = []
  for line in hlo_text.splitlines():
    # XLA numbers long tuples inside the shape (`/*index=5*/` every fifth
    # element); the '=' in those comments hid every collective of 6 or more
    # arrays, the combined gradient all-reduce among them.
    line = _COMMENT.sub('', line)
    match = _OP.search(line)
    if not match:
      continue
    shape_text, op, start = match.groups()
    arrays = _arrays(shape_text)
    if not arrays:
      continue
    if start and op in ('all-gather', 'collective-permute'):
      # (operand, result, …) tuples: the result is the largest.
      shape, size = max(arrays, key=lambda a: a[1])
    else:
      shape, size = ', '.join(a[0] for a in arrays), sum(a[1] for a in arrays)
    n = _group_size(line, num_devices)
    factor = {'all-gather': (n - 1) / n, 'all-to-all': (n - 1) / n,
              'all-reduce': 2 * (n - 1) / n, 'reduce-scatter': n - 1,
              'collective-permute': 1.0}[op]
    if n <= 1:
      factor = 0.0
    found.append({'op': op, 'shape': shape, 'bytes': size, 'group': n,
                  'bytes_per_chip': size * factor})
  return found


def _first(analysis):
  """cost_analysis() is a dict, or a list of one dict in older JAX."""
  if isinstance(analysis, (list, tuple)):
    return analysis[0] if analysis else {}
  return analysis or {}


def program_costs(compiled, num_devices: int) -> dict:
  """Per-device costs of a `jax.stages.Compiled`.

  Returns:
    {'memory': {'arguments', 'outputs', 'temporaries', 'aliased', 'code',
     'total'} in bytes (total = arguments + outputs + temporaries − aliased
     (donated buffers reused for outputs) + code),
     'flops': FLOPs per device per call, 'bytes_accessed': HBM bytes read and
     written, 'collectives': collectives(...)}.
  """
  memory = compiled.memory_analysis()
  parts = {
      'arguments': int(memory.argument_size_in_bytes),
      'outputs': int(memory.output_size_in_bytes),
      'temporaries': int(memory.temp_size_in_bytes),
      'aliased': int(memory.alias_size_in_bytes),
      'code': int(getattr(memory, 'generated_code_size_in_bytes', 0) or 0),
  }
  parts['total'] = (parts['arguments'] + parts['outputs'] + parts['temporaries']
                    - parts['aliased'] + parts['code'])
  cost = _first(compiled.cost_analysis())
  return {'memory': parts, 'flops': float(cost.get('flops', 0.0)),
          'bytes_accessed': float(cost.get('bytes accessed', 0.0)),
          'collectives': collectives(compiled.as_text(), num_devices)}


def roofline_seconds(costs: dict, peak_flops: float, hbm_bandwidth: float,
                     ici_bandwidth: float) -> dict:
  """Lower bounds of one call's time on one chip, in seconds: compute
  (FLOPs / peak), memory (bytes accessed / HBM bandwidth), collectives (bytes
  per chip / inter-chip bandwidth), and `bound`, the largest (they can
  overlap at best completely)."""
  times = {'compute': costs['flops'] / peak_flops,
           'memory': costs['bytes_accessed'] / hbm_bandwidth,
           'collectives': sum(c['bytes_per_chip'] for c in costs['collectives'])
                          / ici_bandwidth}
  times['bound'] = max(times.values())
  return times
