"""The package layout's import rules, read from the source with `ast`.

Layers, top to bottom (a module may import its own layer or lower ones):
  4 cli        main, train, knn, lincls, export, plots, plan (the commands and the
               pretraining loop)
  3 evaluation evaluation/, weights/
  2 core       the algorithm (state, moco, train_step, augment/, optim),
               data/, experiment (the one builder), config/checks (it
               validates against the algorithm's registries)
  1 base       models/, config/, runtime/
Besides: nothing but main imports the pretraining loop (train); the
algorithm files and models/ import neither TensorFlow, tfds nor data/;
runtime/ (devices, files, checkpoints, the loop harness) imports nothing of
moco_jax outside runtime/, so it holds no MoCo knowledge.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'moco_jax'
CLI, EVALUATION, CORE, BASE = 4, 3, 2, 1
TOP_LEVEL = {
    'main': CLI, 'train': CLI, 'knn': CLI, 'lincls': CLI, 'export': CLI, 'plots': CLI,
    'finetune': CLI, 'fewshot': CLI, 'plan': CLI,
    'state': CORE, 'moco': CORE, 'train_step': CORE, 'optim': CORE,
    'experiment': CORE,
}
PACKAGES = {'evaluation': EVALUATION, 'weights': EVALUATION, 'data': CORE,
            'augment': CORE, 'models': BASE, 'config': BASE, 'runtime': BASE}
EXCEPTIONS = {'config.checks': CORE}
ALGORITHM = ('state', 'moco', 'train_step', 'augment', 'optim', 'models')
# The top level holds one thin module per command (python -m moco_jax.NAME)
# and the few modules of the pretraining core; everything else sits in a
# folder that names its role. (Issue 20 brought the top level from 15 to 11
# modules; the fine-tuning, few-shot and plan commands came after.)
COMMANDS = {'main', 'knn', 'lincls', 'finetune', 'fewshot', 'export', 'plots', 'plan'}
MAX_CORE_TOP_LEVEL_MODULES = 6   # train, experiment, state, moco, train_step, optim
FORBIDDEN_IN_ALGORITHM = ('tensorflow', 'tensorflow_datasets', 'moco_jax.data')


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def layer(module: str) -> int:
  """The layer of a module inside moco_jax ('' is the package itself)."""
  if module in EXCEPTIONS:
    return EXCEPTIONS[module]
  head = module.split('.')[0]
  if head in PACKAGES:
    return PACKAGES[head]
  if head in TOP_LEVEL:
    return TOP_LEVEL[head]
  raise AssertionError(f'moco_jax.{module} has no layer: add it to tests/test_layout.py')


def imports(source: str) -> list[str]:
  """Names of every module that `source` imports, at any depth (function-local
  imports included); `from a import b` yields both `a` and `a.b`, since b may
  be a submodule. Relative imports are refused: the project uses absolute ones."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      found += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      assert not node.level, f'relative import of {node.module!r}: use moco_jax.…'
      found.append(node.module)
      found += [f'{node.module}.{alias.name}' for alias in node.names]
  return found


def internal(name: str) -> str | None:
  """'moco_jax.data.pipeline.crop_window' -> 'data.pipeline' (the module part)."""
  if not name.startswith('moco_jax.'):
    return None
  parts = name.split('.')[1:]
  while parts:
    candidate = PACKAGE.joinpath(*parts)
    if candidate.with_suffix('.py').exists() or (candidate / '__init__.py').exists():
      return '.'.join(parts)
    parts = parts[:-1]
  return None


def violations(source: str, module: str) -> list[str]:
  problems = []
  own = layer(module)
  for name in imports(source):
    target = internal(name)
    if target is None:
      if module.split('.')[0] in ALGORITHM and name.split('.')[0] in FORBIDDEN_IN_ALGORITHM:
        problems.append(f'{module} (algorithm) imports {name}')
      continue
    if target == module or target == '':
      continue
    if module.split('.')[0] in ALGORITHM and target.split('.')[0] == 'data':
      problems.append(f'{module} (algorithm) imports moco_jax.{target}')
    if target == 'train' and module != 'main':
      problems.append(f'{module} imports the pretraining loop moco_jax.train')
    if module.startswith('runtime') and not target.startswith('runtime'):
      problems.append(f'{module} (runtime/) imports moco_jax.{target}')
    if layer(target) > own:
      problems.append(f'{module} (layer {own}) imports moco_jax.{target} (layer {layer(target)})')
  return problems


def package_modules():
  return sorted(p for p in PACKAGE.rglob('*.py') if module_name(p))


def test_every_module_has_a_layer():
  for path in package_modules():
    layer(module_name(path))


@pytest.mark.parametrize('path', package_modules(), ids=module_name)
def test_imports_flow_down(path):
  assert violations(path.read_text(), module_name(path)) == []


@pytest.mark.parametrize('source, module, expected', [
    ('from moco_jax import train\n', 'evaluation.linear', 'pretraining loop'),
    ('from moco_jax.evaluation import knn\n', 'experiment', 'layer 2'),
    ('import tensorflow as tf\n', 'augment', 'imports tensorflow'),
    ('def f():\n  from moco_jax.data import pipeline\n', 'train_step', 'moco_jax.data'),
    ('from moco_jax.weights.export import export\n', 'runtime.checkpointing', 'layer 1'),
    ('from moco_jax.config import base\n', 'runtime.loop', 'runtime/'),
])
def test_a_wrong_import_is_caught(source, module, expected):
  found = violations(source, module)
  assert any(expected in problem for problem in found), found


def test_few_top_level_modules():
  top = sorted(p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__')
  core = [name for name in top if name not in COMMANDS]
  assert len(core) <= MAX_CORE_TOP_LEVEL_MODULES, core
  for name in set(top) & COMMANDS:   # a command module is a thin CLI
    assert TOP_LEVEL[name] == CLI, name


def test_the_public_api_resolves():
  import moco_jax
  for name in moco_jax.__all__:
    assert callable(getattr(moco_jax, name)), name
