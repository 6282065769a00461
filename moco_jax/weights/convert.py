"""Pure name/array mapping: Flax variables <-> torchvision <-> Detectron2.

Our module names are torchvision's with '_' for '.' (`layer1_0/downsample_0`
is `layer1.0.downsample.0`), so every name maps 1:1:

  conv  kernel (kh, kw, Cin, Cout)  <->  weight (Cout, Cin, kh, kw)
  dense kernel (Cin, Cout), bias    <->  weight (Cout, Cin), bias
  BN    scale, bias, mean, var      <->  weight, bias, running_mean, running_var
                                         (+ num_batches_tracked, int64)

Detectron2 names are torchvision's renamed as the MoCo reference conversion
does (`stem.conv1.norm.weight`, `res2.0.shortcut.weight`, ...). Nothing here
reads files or needs torch; arrays are numpy.
"""
import dataclasses
import re
from typing import Any, Mapping

import numpy as np

from moco_jax.models.resnet import ARCHS

COUNTER = 'num_batches_tracked'
_BN_LEAVES = (('scale', 'weight'), ('bias', 'bias'))
_BN_STATS = (('mean', 'running_mean'), ('var', 'running_var'))


class WeightsError(ValueError):
  """Weights cannot be read or used; a one-line message says why."""


class WeightsMismatchError(WeightsError):
  """Weights do not fit the model; the message lists every bad key."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One array: its torchvision name and where it lives in the Flax tree.

  Attributes:
    name: torchvision name, e.g. 'layer1.0.conv1.weight'.
    collection: 'params' or 'batch_stats'.
    path: keys inside that collection, e.g. ('layer1_0', 'conv1', 'kernel').
    kind: 'conv' (HWIO <-> OIHW), 'dense' (transposed) or 'copy'.
  """
  name: str
  collection: str
  path: tuple[str, ...]
  kind: str


_TO_TORCH_AXES = {'conv': (3, 2, 0, 1), 'dense': (1, 0)}    # HWIO -> OIHW
_FROM_TORCH_AXES = {'conv': (2, 3, 1, 0), 'dense': (1, 0)}  # OIHW -> HWIO


def to_torch_array(x, kind: str) -> np.ndarray:
  """Our layout -> PyTorch's, for an Entry.kind."""
  x = np.asarray(x)
  return x.transpose(_TO_TORCH_AXES[kind]) if kind in _TO_TORCH_AXES else x


def from_torch_array(x, kind: str) -> np.ndarray:
  """PyTorch's layout -> ours, for an Entry.kind."""
  x = np.asarray(x)
  return x.transpose(_FROM_TORCH_AXES[kind]) if kind in _FROM_TORCH_AXES else x


def torch_shape(shape, kind: str) -> tuple[int, ...]:
  return to_torch_array(np.empty(shape, np.int8), kind).shape


def torch_module_name(path) -> str:
  """('layer1_0', 'downsample_0') -> 'layer1.0.downsample.0'."""
  return '.'.join(re.sub(r'_(\d+)$', r'.\1', key) for key in path)


def array_modules(tree, path=()):
  """Yields (module path, {leaf name: array}) for every module holding arrays."""
  leaves = {k: v for k, v in tree.items() if not isinstance(v, Mapping)}
  if leaves:
    yield path, leaves
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from array_modules(value, path + (key,))


def torchvision_entries(variables) -> list[Entry]:
  """The torchvision-named arrays of `variables` ({'params'[, 'batch_stats']}
  of a ResNet, a projection head or an Encoder), in tree order.

  Raises:
    ValueError: for a module that is neither conv, dense nor BatchNorm.
  """
  stats = dict(array_modules(variables.get('batch_stats', {})))
  entries = []
  for path, leaves in array_modules(variables['params']):
    module = torch_module_name(path)
    kernel = leaves.get('kernel')
    if set(leaves) == {'kernel'} and len(kernel.shape) == 4:
      entries.append(Entry(f'{module}.weight', 'params', path + ('kernel',), 'conv'))
    elif set(leaves) == {'kernel', 'bias'} and len(kernel.shape) == 2:
      entries.append(Entry(f'{module}.weight', 'params', path + ('kernel',), 'dense'))
      entries.append(Entry(f'{module}.bias', 'params', path + ('bias',), 'copy'))
    elif set(leaves) == {'scale', 'bias'} and set(stats.get(path, {})) == {'mean', 'var'}:
      entries += [Entry(f'{module}.{t}', 'params', path + (f,), 'copy')
                  for f, t in _BN_LEAVES]
      entries += [Entry(f'{module}.{t}', 'batch_stats', path + (f,), 'copy')
                  for f, t in _BN_STATS]
    else:
      raise ValueError(f'cannot convert module {"/".join(path)!r} with arrays '
                       f'{sorted(leaves)}; valid: conv (kernel), dense '
                       f'(kernel, bias), BatchNorm (scale, bias + mean, var)')
  return entries


def get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def to_torchvision(variables, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
  """Flax variables -> {torchvision name: numpy array} (a state_dict's content).

  Every BatchNorm also gets `num_batches_tracked` (int64 scalar), which
  torchvision's strict load_state_dict expects.
  """
  flat = {}
  for e in torchvision_entries(variables):
    flat[e.name] = to_torch_array(get_path(variables[e.collection], e.path), e.kind)
    if e.name.endswith('.running_var'):
      flat[e.name[:-len('running_var')] + COUNTER] = np.array(num_batches_tracked,
                                                              np.int64)
  return flat


def from_torchvision(flat: Mapping[str, Any], template,
                     naming: str = 'torchvision', what: str = 'weights'):
  """{torchvision name: array} -> variables shaped like `template`.

  Args:
    flat: arrays by name (numpy, or anything np.asarray accepts).
    template: {'params'[, 'batch_stats']} of the target module; arrays or
      jax.ShapeDtypeStructs (only shapes and dtypes are used).
    naming: the names used in `flat`: 'torchvision' or 'detectron2'.
    what: how to call `flat` in errors (e.g. the file name).

  Returns:
    New variables with template's structure and dtypes.

  Raises:
    WeightsMismatchError: listing every missing, unexpected and mis-shaped
      key (`num_batches_tracked` keys are never required nor unexpected).
  """
  if naming not in NAMINGS:
    raise ValueError(f'unknown naming {naming!r}; valid: {", ".join(NAMINGS)}')
  rename = NAMINGS[naming][0]
  entries = torchvision_entries(template)
  wanted = {rename(e.name): e for e in entries}
  missing = [n for n in wanted if n not in flat]
  unexpected = [n for n in flat if n not in wanted and not n.endswith(COUNTER)]
  wrong_shape = []
  variables = {}
  for name, e in wanted.items():
    if name not in flat:
      continue
    like = get_path(template[e.collection], e.path)
    want = torch_shape(like.shape, e.kind)
    got = tuple(np.shape(flat[name]))
    if got != want:
      wrong_shape.append(f'{name} {got} (model: {want})')
      continue
    set_path(variables.setdefault(e.collection, {}), e.path,
         from_torch_array(flat[name], e.kind).astype(like.dtype))
  if missing or unexpected or wrong_shape:
    raise WeightsMismatchError(_mismatch_message(
        what, missing, unexpected, wrong_shape, flat, template, naming))
  return variables


def detectron2_name(name: str) -> str:
  """torchvision name -> the MoCo reference conversion's Detectron2 name.

  'conv1.weight' -> 'stem.conv1.weight', 'bn1.bias' -> 'stem.conv1.norm.bias',
  'layer1.0.bn2.weight' -> 'res2.0.conv2.norm.weight',
  'layer1.0.downsample.0.weight' -> 'res2.0.shortcut.weight',
  'layer1.0.downsample.1.running_mean' -> 'res2.0.shortcut.norm.running_mean'.
  """
  if 'layer' not in name:
    name = 'stem.' + name
  name = re.sub(r'layer(\d)', lambda m: f'res{int(m.group(1)) + 1}', name)
  name = re.sub(r'bn(\d)', r'conv\1.norm', name)
  name = name.replace('downsample.0', 'shortcut')
  return name.replace('downsample.1', 'shortcut.norm')


def torchvision_name_from_detectron2(name: str) -> str:
  """Inverse of detectron2_name."""
  name = name.removeprefix('stem.')
  name = name.replace('shortcut.norm', 'downsample.1')
  name = name.replace('shortcut', 'downsample.0')
  name = re.sub(r'conv(\d)\.norm', r'bn\1', name)
  return re.sub(r'res(\d)', lambda m: f'layer{int(m.group(1)) - 1}', name)


# naming -> (torchvision name -> that name, that name -> torchvision name)
NAMINGS = {'torchvision': (lambda name: name, lambda name: name),
           'detectron2': (detectron2_name, torchvision_name_from_detectron2)}


def to_detectron2(flat_torchvision: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """torchvision-named arrays -> Detectron2-named float arrays.

  `num_batches_tracked` is dropped: Detectron2's (Frozen)BatchNorm has no such
  buffer and would report it unused.
  """
  return {detectron2_name(k): np.asarray(v) for k, v in flat_torchvision.items()
          if not k.endswith(COUNTER)}


def from_detectron2(flat: Mapping[str, Any], template, what: str = 'weights'):
  """Detectron2-named arrays -> variables shaped like `template` (see
  from_torchvision; same errors)."""
  return from_torchvision(flat, template, naming='detectron2', what=what)


def describe_resnet(shapes: Mapping[str, tuple]) -> str:
  """A guess at the ResNet behind torchvision-named shapes, for error messages.

  E.g. 'resnet50 (width_multiplier 1, 7x7 stem)'.
  """
  stem = shapes.get('conv1.weight')
  if stem is None or len(stem) != 4:
    return 'no ResNet (no 4-D conv1.weight)'
  blocks = [1 + max((int(m.group(1)) for n in shapes
                     if (m := re.match(rf'layer{s}\.(\d+)\.', n))), default=-1)
            for s in range(1, 5)]
  bottleneck = 'layer1.0.conv3.weight' in shapes
  kind = 'bottleneck' if bottleneck else 'basic'
  arch = next((a for a, spec in ARCHS.items() if spec == (kind, tuple(blocks))),
              f'a {kind} ResNet with blocks {tuple(blocks)}')
  return (f'{arch} (width_multiplier {stem[0] / 64:g}, '
          f'{stem[2]}x{stem[3]} stem)')


def compact_names(names) -> str:
  """'a.b.weight', 'a.b.bias', 'c.weight' -> 'a.b.{weight,bias}, c.weight'."""
  groups = {}
  for name in names:
    parent, _, leaf = name.rpartition('.')
    groups.setdefault(parent, []).append(leaf)
  parts = [(f'{p}.' if p else '') + (leaves[0] if len(leaves) == 1
                                     else '{' + ','.join(leaves) + '}')
           for p, leaves in groups.items()]
  return f'{len(names)}: ' + ', '.join(parts)


def mismatch_problems(missing, unexpected, wrong_shape) -> list[str]:
  """One phrase per kind of mismatch between a file's names and the model's."""
  problems = []
  if missing:
    problems.append('missing ' + compact_names(missing))
  if unexpected:
    problems.append('unexpected ' + compact_names(unexpected))
  if wrong_shape:
    problems.append(f'wrong shape {len(wrong_shape)}: ' + ', '.join(wrong_shape))
  return problems


def _mismatch_message(what, missing, unexpected, wrong_shape, flat, template,
                      naming) -> str:
  message = (f'{what} do not fit the model: '
             + '; '.join(mismatch_problems(missing, unexpected, wrong_shape)))
  model_names = {e.name: torch_shape(get_path(template[e.collection], e.path).shape,
                                     e.kind)
                 for e in torchvision_entries(template)}
  if 'conv1.weight' in model_names:  # a backbone: say what each side looks like
    to_torchvision_name = NAMINGS[naming][1]
    file_shapes = {to_torchvision_name(k): tuple(np.shape(v)) for k, v in flat.items()}
    message += (f' (file looks like {describe_resnet(file_shapes)}; model is '
                f'{describe_resnet(model_names)})')
  return message
