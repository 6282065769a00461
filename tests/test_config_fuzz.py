"""Every key of every recipe, fuzzed: a wrong type, a wrong length (tuples)
and an out-of-range value each give a one-line problem naming the key (or
ml_collections' type error naming it), never a crash of the checks; and
flagfiles on the command line."""
import glob
import importlib.util
import os
import subprocess

import pytest

from cli_runner import python
from conftest import REPO
from moco_jax.config import checks, ranges
from moco_jax.evaluation import linear

# The pretraining and linear-evaluation recipes; the fine-tuning recipes'
# own keys are checked by tests/test_finetune.py (their fuzzing is not here yet).
RECIPES = sorted(p for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not os.path.basename(p).startswith('finetune_'))
# Text keys that name a choice are checked against their registries; these
# name data, splits or files and are checked where they are read (the data
# pipeline, the weights loader), by tests of their own.
READ_WHERE_USED = {'data.dataset', 'data.data_dir', 'data.train_split', 'data.eval_split',
                   'data.normalization', 'init_from', 'pretrained', 'data.on_device'}


def load(path):
  spec = importlib.util.spec_from_file_location('recipe', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if 'pretrained' in config:   # what the command line and the run fill in
    config.pretrained, config.data.normalization = '/a/pretraining/run', 'imagenet'
  config.lock()
  return config


def leaves(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def set_value(config, dotted, value):
  *sections, key = dotted.split('.')
  node = config
  for section in sections:
    node = node[section]
  setattr(node, key, value)


def problems_of(config):
  """The checks the CLI runs for this kind of config (they must not raise)."""
  if 'pretrained' in config:
    return linear.config_problems(config, 1, 10) + ranges.range_problems(config)
  return checks.config_problems(config, 1)


def out_of_range(rule, value):
  """A value of `value`'s type that `rule` refuses (None if it takes all)."""
  if isinstance(value, tuple):
    candidates = [(0.5, 0.1), (-1.0, 1.0), (0.0, 0.5), (80, 60), (-5,)]
  elif isinstance(value, int):
    candidates = [-10**9, -7, -2, -1, 0, 1]
  else:
    candidates = [-1e9, -1.0, 0.0, 1.0, 1.5, 1e9, float('nan'), float('inf')]
  return next((c for c in candidates if not rule.valid(c)), None)


@pytest.mark.parametrize('path', RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_every_key_of_every_recipe_refuses_bad_values_in_one_line(path):
  config = load(path)
  assert problems_of(config) == [], 'the recipe itself must be valid'
  for key, value in leaves(config):
    numeric = isinstance(value, (int, float, tuple)) and not isinstance(value, bool)
    if numeric:
      assert key in ranges.RULES, f'{key} of {path} has no rule in config/ranges.py'
    # Wrong type: refused by ml_collections, naming the key.
    wrong = 'not-a-value' if (numeric or isinstance(value, bool)) else 12345
    # True/False/'auto' and 'auto'/an integer: any type; checked when read.
    if key not in ('data.on_device', 'data.worker_count'):
      fuzzed = load(path)
      with pytest.raises(TypeError, match=f"Could not override field '{key.split('.')[-1]}'"):
        set_value(fuzzed, key, wrong)
    # Out of range.
    if key in ranges.RULES:
      bad = out_of_range(ranges.RULES[key], value)
      if bad is None:
        assert ranges.RULES[key] is ranges.ANY_INTEGER, key
        continue
      fuzzed = load(path)
      set_value(fuzzed, key, bad)
      found = [p for p in problems_of(fuzzed) if p.startswith(f'{key}=')]
      assert len(found) == 1 and '\n' not in found[0], (key, bad, problems_of(fuzzed))
      assert f'must be {ranges.RULES[key].what}' in found[0]
    elif isinstance(value, str) and key not in READ_WHERE_USED:
      fuzzed = load(path)
      set_value(fuzzed, key, 'no-such-choice')
      # One line naming the value and what is valid ("is not one of a, b",
      # "is not 'float32' or 'bfloat16'", "must be 'auto' or an integer >= 0").
      assert any(p.startswith((f"{key}='no-such-choice' is not ",
                               f"{key}='no-such-choice' must be "))
                 for p in problems_of(fuzzed)), (key, problems_of(fuzzed))
    # Wrong length (tuple keys): the 1-tuple that --config.KEY=0.5 gives,
    # and a 3-tuple.
    if isinstance(value, tuple):
      for length in (1, 3):
        fuzzed = load(path)
        set_value(fuzzed, key, tuple(value[:1]) * length)
        found = [p for p in problems_of(fuzzed) if p.startswith(f'{key}=')]
        if ranges.RULES[key] is ranges.CROP_SCALE:
          assert len(found) == 1 and 'two numbers (low, high)' in found[0], found
        else:   # lr_drop_epochs: any number of increasing epochs
          assert found == [] or 'increasing order' in found[0], found


def test_crop_scale_from_the_command_line_is_a_one_tuple_and_refused(tmp_path):
  """What absl and ml_collections make of --config.data.crop_scale=0.5, in a
  flagfile, with --config in the flagfile too."""
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text('--config=configs/smoke.py\n--config.data.crop_scale=0.5\n')
  result = subprocess.run([*python(), '-m', 'moco_jax.main', f'--flagfile={flagfile}',
                           f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith('error: data.crop_scale=(0.5,) must be two numbers (low, '
                             'high) with 0 < low <= high <= 1')
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flagfile_text, expected', [
    ('', '--config is required'),
    ('--config=configs/nope.py\n', 'configs/nope.py: no such file'),
    ('--flagfile={tmp}/missing.flags\n', '--flagfile={tmp}/missing.flags: cannot read it'),
    ('--config=configs/smoke.py\n--config.moco.temperature=-1\n',
     'moco.temperature=-1.0 must be a number > 0'),
    ('--config=configs/smoke.py\n--config.nosuch.key=1\n', 'nosuch'),
])
def test_flagfile_fuzz(tmp_path, flagfile_text, expected):
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text(flagfile_text.format(tmp=tmp_path))
  result = subprocess.run([*python(), '-m', 'moco_jax.main', f'--flagfile={flagfile}',
                           f'--workdir={tmp_path / "run"}'], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
  assert lines[0].startswith('error: ') and expected.format(tmp=tmp_path) in lines[0], lines
  assert 'Traceback' not in result.stderr and not (tmp_path / 'run').exists()
