"""Resume compatibility: every row of resume_rules.RESUME_RULES is refused
with a line naming the key and both values; safe changes pass; the CLI
refuses another batch size without touching the workdir."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import smoke_config
from moco_jax import moco
from moco_jax.config import resume_rules
from moco_jax.experiment import abstract_state
from test_train import run_cli, tree_digest

# key -> a value other than the smoke config's.
CHANGED = {
    'train.batch_size': 32, 'moco.symmetric': True, 'moco.queue_size': 128,
    'moco.bn_groups': 4, 'model.dim': 32, 'model.arch': 'resnet34',
    'model.width_multiplier': 0.25, 'model.cifar_stem': False, 'model.head': 'linear',
    'model.head_hidden_dim': 32, 'optim.name': 'lars', 'data.image_size': 32,
    'model.predictor': True, 'model.stop_grad_conv1': True,
}
SAFE = {
    'train.num_steps': 400, 'train.num_epochs': 7, 'train.log_every': 5,
    'train.checkpoint_every': 50, 'train.keep_checkpoints': 9, 'eval.knn_every': 1.0,
    'eval.knn_k': 20, 'eval.knn_t': 0.07, 'eval.batch_size': 64,
    'data.data_dir': '/elsewhere', 'optim.base_lr': 0.06, 'optim.warmup_epochs': 2.0,
    'train.stop_on_collapse': True,
}


def _config(**overrides):
  return smoke_config('/data', **overrides)


def test_every_rule_has_a_test_value():
  assert set(CHANGED) == {key for key, _ in resume_rules.RESUME_RULES}


@pytest.mark.parametrize('key', sorted(CHANGED))
def test_each_rule_is_refused_naming_key_and_values(key):
  saved = _config(**({'model.arch': 'vit_small'} if key == 'data.image_size' else {}))
  new = saved.copy_and_resolve_references()
  section, name = key.split('.')
  old_value, new[section][name] = saved[section][name], CHANGED[key]
  problems = resume_rules.incompatibilities(saved.to_dict(), new.to_dict())
  assert len(problems) == 1
  assert problems[0].startswith(
      f'{key}: {old_value!r} in the checkpoint, {CHANGED[key]!r} now (')


def test_safe_changes_are_allowed_and_resnet_image_size_too():
  saved = _config()
  assert resume_rules.incompatibilities(
      saved.to_dict(), _config(**SAFE, **{'data.image_size': 32}).to_dict()) == []
  # Keys an older checkpoint lacks are not compared.
  old = saved.to_dict()
  del old['moco']['symmetric']
  assert resume_rules.incompatibilities(
      old, _config(**{'moco.symmetric': True}).to_dict()) == []


def _shapes(config):
  return jax.tree.map(lambda s: (s.shape, s.dtype), abstract_state(config))


@pytest.mark.parametrize('key', ['moco.queue_size', 'model.dim', 'model.arch',
                                 'model.width_multiplier', 'model.cifar_stem',
                                 'model.head', 'model.head_hidden_dim', 'optim.name'])
def test_structural_rules_do_change_the_saved_state(key):
  """Independent of the table: these keys change the state's structure or
  shapes, so a checkpoint cannot continue under another value."""
  assert _shapes(_config()) != _shapes(_config(**{key: CHANGED[key]}))


def test_another_batch_would_leave_queue_rows_stale():
  """The issue's case: K 64, saved at ptr 48 with B 16, resumed with B 32."""
  queue, ptr = jnp.zeros((64, 4)), jnp.int32(48)
  written = np.zeros(64, bool)
  for step in range(8):
    before = np.asarray(queue)
    queue, ptr = moco.enqueue(queue, ptr, jnp.full((32, 4), step + 1.0))
    written |= np.any(np.asarray(queue) != before, axis=1)
  assert not written[:16].any() and written[16:].all()


def test_cli_refuses_another_batch_and_leaves_the_workdir_alone(
    tiny_data_dir, smoke_pretrain_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(smoke_pretrain_dir, workdir)
  before = tree_digest(workdir)
  result = run_cli(workdir, tiny_data_dir, '--config.train.batch_size=32',
                   '--config.train.num_steps=8')
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, result.stderr[-3000:]
  assert 'train.batch_size: 16 in the checkpoint, 32 now' in errors[0]
  assert tree_digest(workdir) == before
