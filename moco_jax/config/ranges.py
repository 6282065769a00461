"""The valid range of every numeric and tuple config key, in one table.

ml_collections checks a value's type when it is overridden; it does not know
that a temperature must be above 0 or that data.crop_scale is a pair
(`--config.data.crop_scale=0.5` arrives as the 1-tuple (0.5,)). Each rule
here says both what is valid and how to write it, so every problem is one
line naming the key, the value and a valid example. Keys that hold one of a
set of names (model.arch, optim.name, ...) are checked against their
registries in config/checks.py; paths and split names when the data is read.
"""
import dataclasses
import math
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Rule:
  """valid(value) -> bool; `what` completes "KEY=VALUE must be ..."."""
  valid: Callable[[object], bool]
  what: str


def _number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def at_least(low, integer=False) -> Rule:
  kind = 'an integer' if integer else 'a number'
  return Rule(lambda v: (_integer(v) if integer else _number(v)) and v >= low,
              f'{kind} >= {low:g}')


def above(low) -> Rule:
  return Rule(lambda v: _number(v) and v > low, f'a number > {low:g}')


def in_interval(low, high, closed_high=False) -> Rule:
  bracket = ']' if closed_high else ')'
  return Rule(lambda v: _number(v) and low <= v and (v <= high if closed_high else v < high),
              f'a number in [{low:g}, {high:g}{bracket}')


ANY_INTEGER = Rule(_integer, 'an integer')

CROP_SCALE = Rule(
    lambda v: (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(_number, v))
               and 0 < v[0] <= v[1] <= 1),
    'two numbers (low, high) with 0 < low <= high <= 1, e.g. '
    "--config.data.crop_scale='(0.2, 1.0)'")

LR_DROP_EPOCHS = Rule(
    lambda v: (isinstance(v, (tuple, list)) and all(map(_number, v))
               and all(e > 0 for e in v) and list(v) == sorted(v)),
    'epochs > 0 in increasing order, any number of them, e.g. '
    "--config.optim.lr_drop_epochs='(60, 80)' or '(120,)'")

FEWSHOT_SHOTS = Rule(
    lambda v: (isinstance(v, (tuple, list)) and len(v) > 0 and all(map(_integer, v))
               and all(k > 0 for k in v) and list(v) == sorted(v)),
    "images per class, integers > 0 in increasing order, e.g. "
    "--config.eval.fewshot_shots='(1, 5, 10, 25)'")

# Dotted key -> rule. A recipe key that is a number or a tuple must be here
# (tests/test_config_fuzz.py checks every key of every recipe).
RULES = {
    'seed': ANY_INTEGER,
    'model.width_multiplier': above(0),
    'model.head_hidden_dim': at_least(0, integer=True),
    'model.dim': at_least(1, integer=True),
    'moco.queue_size': at_least(0, integer=True),
    'moco.momentum': in_interval(0, 1),
    'moco.temperature': above(0),
    'moco.bn_groups': at_least(1, integer=True),
    'data.image_size': at_least(8, integer=True),
    'data.crop_scale': CROP_SCALE,
    'data.labels_per_class': at_least(0, integer=True),
    'data.labels_seed': ANY_INTEGER,
    'data.on_device_max_fraction': Rule(lambda v: _number(v) and 0 < v <= 1,
                                        'a number in (0, 1]'),
    'optim.base_lr': at_least(0),
    'optim.momentum': in_interval(0, 1),
    'optim.weight_decay': at_least(0),
    'optim.lr_drop_epochs': LR_DROP_EPOCHS,
    'optim.warmup_epochs': at_least(0),
    'train.batch_size': at_least(1, integer=True),
    'train.num_epochs': at_least(0),
    'train.num_steps': Rule(lambda v: _integer(v) and (v == -1 or v > 0),
                            '-1 (use train.num_epochs) or an integer > 0'),
    'train.log_every': at_least(1, integer=True),
    'train.checkpoint_every': at_least(1, integer=True),
    'train.keep_checkpoints': at_least(1, integer=True),
    'eval.knn_every': at_least(0),
    'eval.batch_size': at_least(1, integer=True),
    'eval.knn_k': at_least(1, integer=True),
    'eval.knn_t': above(0),
    'eval.every_epochs': at_least(0),
    'eval.fewshot_every': at_least(0),
    'eval.fewshot_shots': FEWSHOT_SHOTS,
    'eval.fewshot_seeds': at_least(1, integer=True),
    'eval.fewshot_l2_reg': above(0),
    'pretrained_step': Rule(lambda v: _integer(v) and v >= -1,
                            '-1 (the newest checkpoint) or a step >= 0'),
}


def _shown(value) -> str:
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


def range_problems(config) -> list[str]:
  """One line per key of `config` (a ConfigDict) outside its rule's range."""
  problems = []
  for key, rule in RULES.items():
    node, found = config, True
    for part in key.split('.'):
      if part not in node:
        found = False
        break
      node = node[part]
    if found and not rule.valid(node):
      problems.append(f'{key}={_shown(node)} must be {rule.what}')
  return problems
