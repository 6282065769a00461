"""Linear evaluation: it learns, the backbone stays bit-identical, the CLI works."""
import hashlib
import os
import subprocess

import jax
import numpy as np
import pytest

from cli_runner import python
from conftest import REPO, TINY_DATASET, build_tiny_dataset, recipe_config
from moco_jax.evaluation import linear
from moco_jax.weights import pretrained
from moco_jax.runtime.metric_writer import read_metrics
from moco_jax.runtime.mesh import make_mesh


def lincls_config(pretrain_dir, data_dir, **overrides):
  """configs/lincls_cifar10.py on the tiny dataset, with dotted overrides."""
  return recipe_config('lincls_cifar10.py', pretrain_dir, data_dir, **{
      'train.batch_size': 64, 'eval.batch_size': 64, **overrides})


def digest(directory):
  sha = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for name in sorted(files):
      with open(os.path.join(root, name), 'rb') as f:
        sha.update(name.encode() + f.read())
  return sha.hexdigest()


@pytest.fixture(scope='module')
def larger_data_dir(tmp_path_factory):
  # 64 training images are too few for a linear layer on 64-d random-init
  # features to generalise; 512 are enough.
  return build_tiny_dataset(tmp_path_factory.mktemp('tfds512'), num_train=512,
                            num_test=64)


def test_linear_eval_learns_and_leaves_the_backbone_bit_identical(
    smoke_pretrain_dir, larger_data_dir, tmp_path):
  before = digest(smoke_pretrain_dir)
  # The random-init backbone's features are large (norm ~10) and share a big
  # mean, so the lr is far below the protocol's 30.
  config = lincls_config(smoke_pretrain_dir, larger_data_dir, pretrained_step=0,
                         **{'train.num_steps': 100, 'train.log_every': 50,
                            'optim.base_lr': 0.1, 'optim.schedule': 'cosine',
                            'eval.every_epochs': 0})
  results = linear.linear_evaluation(config, str(tmp_path))  # checks the backbone
  assert results['lincls_top1'] >= 90, results
  assert results['lincls_top5'] == 100
  assert digest(smoke_pretrain_dir) == before
  logged = read_metrics(str(tmp_path))
  assert logged[-1] == {'step': 100, **results}
  assert logged[0]['loss'] > logged[-2]['loss']


def test_backbone_check_notices_a_one_ulp_change(smoke_pretrain_dir):
  run = pretrained.load(smoke_pretrain_dir, make_mesh(), step=0)
  backbone = {'params': run.params, 'batch_stats': run.batch_stats}
  linear.check_backbone_unchanged(backbone, backbone)
  changed = jax.tree.map(np.array, jax.device_get(backbone))    # writable copies
  kernel = changed['params']['conv1']['kernel']
  kernel.flat[0] = np.nextafter(kernel.flat[0], np.inf)
  with pytest.raises(linear.BackboneChangedError, match='conv1'):
    linear.check_backbone_unchanged(changed, backbone)


def run_module(module, *args):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device
  return subprocess.run([*python(), '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_lincls_cli_end_to_end(smoke_pretrain_dir, tiny_data_dir, tmp_path):
  result = run_module(
      'moco_jax.lincls', '--config=configs/lincls_cifar10.py', f'--workdir={tmp_path}',
      f'--config.pretrained={smoke_pretrain_dir}',
      f'--config.data.dataset={TINY_DATASET}', f'--config.data.data_dir={tiny_data_dir}',
      '--config.data.image_size=16', '--config.train.batch_size=16',
      '--config.eval.batch_size=16', '--config.train.num_steps=4',
      '--config.train.log_every=2', '--config.optim.base_lr=0.1')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'lincls: top1' in result.stdout and 'backbone unchanged' in result.stdout
  events = read_metrics(str(tmp_path))
  final = [e for e in events if 'lincls_top1' in e]
  assert final and final[-1]['step'] == 4 and 0 <= final[-1]['lincls_top1'] <= 100
  assert pretrained.load_config(str(tmp_path)).pretrained_step == 4  # newest, recorded


def test_a_workdir_without_checkpoints_is_a_clear_error_that_creates_nothing(
    tiny_data_dir, tmp_path):
  empty, out = tmp_path / 'empty', tmp_path / 'out'
  config = lincls_config(str(empty), tiny_data_dir)
  with pytest.raises(pretrained.PretrainedError, match='has no checkpoints'):
    linear.linear_evaluation(config, str(out))
  assert not empty.exists() and not out.exists()
  with pytest.raises(linear.ConfigError, match='is the pretraining run itself'):
    linear.linear_evaluation(config, str(empty))
