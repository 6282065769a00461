"""The evaluation command lines (moco_jax.knn, moco_jax.lincls) fuzzed as the
pretraining one is in test_cli_errors.py: each malformed value gives one
`error:` line, a non-zero exit, no traceback, no workdir created and nothing
appended to the pretraining run. Runs on real (tiny) pretraining workdirs:
the smoke ResNet's, and a ViT (patch 8) one saved at initialisation."""
import os
import subprocess

import pytest

from cli_runner import python, run_commands
from conftest import REPO, TINY_DATASET

LINCLS = ('moco_jax.lincls', '--config=configs/lincls_cifar10.py', '--workdir={tmp}/lin',
          '--config.pretrained={run}', f'--config.data.dataset={TINY_DATASET}',
          '--config.data.data_dir={data}', '--config.data.image_size=16')
KNN = ('moco_jax.knn', '--workdir={run}')

# (command line, pretraining run ('resnet' or 'vit'), what the error line names)
CASES = [
    (KNN + ('--config.eval.knn_k=0',), 'resnet', 'eval.knn_k=0 must be an integer >= 1'),
    (KNN + ('--config.eval.knn_k=abc',), 'resnet', 'knn_k'),
    (KNN + ('--config.eval.knn_k=2.5',), 'resnet', 'knn_k'),
    (KNN + ('--config.eval.knn_t=0',), 'resnet', 'eval.knn_t=0.0 must be a number > 0'),
    (KNN + ('--config.eval.batch_size=-8',), 'resnet', 'eval.batch_size=-8'),
    (KNN + ('--config.eval.knn_features=neck',), 'resnet', 'knn_features'),
    (KNN + ('--config.data.eval_split=test[32:]',), 'resnet', 'selects no example'),
    (KNN + ('--config.data.eval_split=test[10000:]',), 'resnet',
     'is not a valid TFDS slice (Requested slice [10000:32] incompatible with 32 examples'),
    (KNN + ('--config.data.eval_split=validation',), 'resnet',
     "no prepared split 'validation' (its splits: test, train)"),
    (KNN + ('--config.data.eval_split=train[:120%]',), 'resnet', 'not a valid TFDS slice'),
    (KNN + ('--config.data.crop_scale=0.5',), 'resnet', 'data.crop_scale=(0.5,) must be two'),
    (KNN + ('--config.data.image_size=4',), 'resnet', 'data.image_size=4 must be'),
    (KNN + ('--step=7',), 'resnet', 'has no checkpoint in'),
    (KNN + ('--config.data.image_size=20',), 'vit',
     "data.image_size=20 is not a multiple of vit_cpu's patch size 8"),
    (LINCLS + ('--config.optim.base_lr=-1',), 'resnet', 'optim.base_lr=-1'),
    (LINCLS + ('--config.optim.base_lr=fast',), 'resnet', 'base_lr'),
    (LINCLS + ('--config.optim.momentum=1.5',), 'resnet', 'optim.momentum=1.5'),
    (LINCLS + ('--config.optim.lr_drop_epochs=-5',), 'resnet', 'optim.lr_drop_epochs=(-5,)'),
    (LINCLS + ("--config.optim.lr_drop_epochs=(80, 60)",), 'resnet', 'increasing order'),
    (LINCLS + ('--config.data.crop_scale=0.5',), 'resnet', 'data.crop_scale=(0.5,)'),
    (LINCLS + ("--config.data.crop_scale=(0.2, 0.5, 1.0)",), 'resnet', 'data.crop_scale'),
    (LINCLS + ('--config.train.batch_size=0',), 'resnet', 'train.batch_size=0'),
    (LINCLS + ('--config.train.log_every=0',), 'resnet', 'train.log_every=0'),
    (LINCLS + ('--config.eval.batch_size=-8',), 'resnet', 'eval.batch_size=-8'),
    (LINCLS + ('--config.data.eval_split=test[32:]',), 'resnet', 'selects no example'),
    (LINCLS + ('--config.data.eval_split=validation',), 'resnet', "no prepared split 'validation'"),
    (LINCLS + ('--config.data.normalization=imagenet1k',), 'resnet', 'data.normalization'),
    (LINCLS + ('--config.pretrained_step=99',), 'resnet', 'has no checkpoint in'),
    (LINCLS + ('--config.pretrained_step=-7',), 'resnet', 'pretrained_step=-7'),
    (LINCLS + ('--config.data.image_size=20',), 'vit',
     "data.image_size=20 is not a multiple of vit_cpu's patch size 8"),
    (('moco_jax.lincls', '--config=configs/lincls_cifar10.py', '--workdir={tmp}/lin',
      '--config.pretrained={tmp}/nope'), 'resnet', 'no checkpoints'),
    (('moco_jax.lincls', '--flagfile={tmp}/missing.txt', '--workdir={tmp}/lin'), 'resnet',
     '--flagfile={tmp}/missing.txt: cannot read it'),
    (('moco_jax.lincls', '--flagfile={tmp}/bad_lincls.flags', '--workdir={tmp}/lin'),
     'resnet', 'optim.base_lr=-3'),
]


@pytest.fixture(scope='module')
def vit_run(tiny_data_dir, tmp_path_factory):
  """A v3 ViT (vit_cpu, patch 8) pretraining workdir: its initial state."""
  from moco_jax.experiment import Experiment
  from moco_jax.runtime import checkpointing
  from test_v3 import v3_smoke_config
  workdir = str(tmp_path_factory.mktemp('vit_run'))
  config = v3_smoke_config(tiny_data_dir)
  checkpointer = checkpointing.Checkpointer(workdir)
  checkpointer.save(0, Experiment(config).init_state(), config.to_dict())
  checkpointer.wait()
  checkpointer.close()
  return workdir


def _tree(directory):
  return sorted((root, tuple(sorted(files))) for root, _, files in os.walk(directory))


@pytest.fixture(scope='module')
def results(smoke_pretrain_dir, vit_run, tiny_data_dir, tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp('eval_fuzz'))
  with open(os.path.join(tmp, 'bad_lincls.flags'), 'w') as f:
    # --config inside the flagfile (it used to be refused as missing).
    f.write(f'--config=configs/lincls_cifar10.py\n--config.pretrained={smoke_pretrain_dir}\n'
            f'--config.data.dataset={TINY_DATASET}\n--config.data.data_dir={tiny_data_dir}\n'
            f'--config.optim.base_lr=-3\n')
  runs = {'resnet': smoke_pretrain_dir, 'vit': vit_run}
  before = {name: _tree(path) for name, path in runs.items()}
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  # Each case as `python -m` runs it, forked from a server that has imported
  # the package (tests/cli_runner.py).
  done, import_stderr = run_commands(
      [[a.format(tmp=tmp, run=runs[which], data=tiny_data_dir) for a in args]
       for args, which, _ in CASES], env)
  assert import_stderr.strip() == '', import_stderr[-2000:]
  after = {name: _tree(path) for name, path in runs.items()}
  return tmp, done, before, after


@pytest.mark.parametrize('index', range(len(CASES)),
                         ids=[' '.join(c[0][:1] + c[0][-1:])[:80] for c in CASES])
def test_evaluation_cli_bad_value_is_one_error_line(results, index):
  tmp, done, before, after = results
  args, which, expected = CASES[index]
  result = done[index]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0, result.stdout[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert expected.format(tmp=tmp) in lines[0], lines[0]
  assert 'Traceback' not in result.stderr + result.stdout
  assert not os.path.exists(os.path.join(tmp, 'lin'))       # no workdir created
  assert before == after                                     # the runs untouched


def test_config_inside_a_flagfile_is_read(tmp_path):
  """--config given only in a --flagfile: --show_config prints it resolved."""
  flagfile = tmp_path / 'run.flags'
  flagfile.write_text('--config=configs/smoke.py\n--config.moco.queue_size=128\n')
  result = subprocess.run([*python(), '-m', 'moco_jax.main', f'--flagfile={flagfile}',
                           '--show_config'], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'queue_size: 128' in result.stdout and 'crop_scale: (0.2, 1.0)' in result.stdout
  assert '!!python' not in result.stdout
