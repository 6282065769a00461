"""The command lines: --help, --show_config, and a fuzz of malformed flags and
paths, each of which must give one `error:` line, a non-zero exit and no
traceback (and never a workdir)."""
import glob
import os
import subprocess

import pytest

from cli_runner import python, run_commands
from conftest import REPO, TINY_DATASET

SMOKE = '--config=configs/smoke.py'
DATA = (f'--config.data.dataset={TINY_DATASET}', '--config.data.data_dir={data}')


def main_case(*args, config=SMOKE, workdir='--workdir={tmp}/run', data=DATA):
  return ('moco_jax.main',) + tuple(a for a in (config, workdir) if a) + data + args


# (command line, what the error line must name)
CASES = [
    (main_case(config='--config=configs/nope.py'), 'configs/nope.py: no such file'),
    (main_case(config='--config=README.md'), 'not a Python config file'),
    (main_case(config='--config={tmp}/broken.py'), 'SyntaxError'),
    (main_case(config='--config=configs'), 'is a directory'),
    (main_case(config='--config='), '--config is required'),
    (main_case(config=None), '--config is required'),
    (main_case(config='--config=configs/lincls_cifar10.py'), 'not a pretraining config'),
    (main_case(workdir=None), '--workdir is required'),
    (main_case(workdir='--workdir=README.md/run'), 'README.md is a file'),
    (main_case(workdir='--workdir=README.md'), 'README.md is a file'),
    (main_case(workdir='--workdir='), '--workdir is required'),
    (main_case(data=('--config.data.dataset=cifar-10',)), "'cifar-10'"),
    (main_case(data=('--config.data.dataset=folder:/nonexistent',)), 'is not a directory'),
    (main_case(data=('--config.data.dataset=',)), "unknown data.dataset ''"),
    (main_case(data=(DATA[0], '--config.data.data_dir=/nonexistent/tfds')), 'does not exist'),
    (main_case('--config.data.train_split=nosuch'), "no prepared split 'nosuch'"),
    (main_case('--config.train.batch_size=many'), 'batch_size'),
    (main_case('--config.train.batch_size=-16'), 'train.batch_size=-16'),
    (main_case('--config.train.batch_size'), 'batch_size'),
    (main_case('--config.moco.queu_size=64'), 'queue_size'),
    (main_case('--config.nosection.key=1'), 'nosection'),
    (main_case('--config.dtype=float16'), "dtype='float16'"),
    (main_case('--config.model.arch=resnet42'), "model.arch='resnet42'"),
    (main_case('--config.data.image_size=big'), 'image_size'),
    (main_case('--config.data.crop_scale=(0.5,0.1)'), 'crop_scale'),
    (main_case('--no_such_flag=1'), 'no_such_flag'),
    (main_case('leftover'), 'unexpected arguments: leftover'),
    (main_case('--num_processes=2'), 'num_processes'),
    (('moco_jax.knn', '--workdir=/nonexistent/run'), 'no such directory'),
    (('moco_jax.knn', '--workdir=README.md'), 'README.md is a file'),
    (('moco_jax.knn', '--workdir={tmp}', '--step=abc'), 'step'),
    (('moco_jax.plots', '--workdir={tmp}/missing'), 'no such directory'),
    (('moco_jax.export', '--workdir={tmp}', '--format=onnx'), 'onnx'),
    (('moco_jax.export', '--workdir={tmp}'), '--format is required'),
    (('moco_jax.lincls', '--config=configs/nope.py', '--workdir={tmp}/lin'), 'no such file'),
    (('moco_jax.lincls', SMOKE, '--workdir={tmp}/lin'), 'not a linear-evaluation config'),
]


@pytest.fixture(scope='module')
def results(tiny_data_dir, tmp_path_factory):
  """Every case, each as `python -m` runs it (forked from a server that has
  imported the package: tests/cli_runner.py)."""
  tmp = str(tmp_path_factory.mktemp('fuzz'))
  with open(os.path.join(tmp, 'broken.py'), 'w') as f:
    f.write('def get_config(:\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  done, import_stderr = run_commands(
      [[a.format(tmp=tmp, data=tiny_data_dir) for a in args] for args, _ in CASES], env)
  assert import_stderr.strip() == '', import_stderr[-2000:]   # nothing printed on import
  return tmp, done


@pytest.mark.parametrize('index', range(len(CASES)),
                         ids=[' '.join(c[0])[:70] for c in CASES])
def test_malformed_command_line_is_one_error_line(results, index):
  tmp, done = results
  args, expected = CASES[index]
  result = done[index]
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode != 0, result.stdout[-2000:]
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr[-3000:]
  assert expected in lines[0], lines[0]
  assert 'Traceback' not in result.stderr + result.stdout
  assert not os.path.exists(os.path.join(tmp, 'run')) and not glob.glob(
      os.path.join(tmp, 'lin*'))


def test_help_exits_0_and_lists_the_recipes_with_their_descriptions():
  result = subprocess.run([*python(), '-m', 'moco_jax.main', '--help'], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    name = os.path.basename(path)
    if name.startswith(('lincls_', 'finetune_')):
      continue
    with open(path) as f:
      source = f.read()
    first_line = source.split('"""')[1].strip().splitlines()[0]
    assert f'configs/{name}' in result.stdout and first_line in result.stdout, name
  assert '--show_config' in result.stdout and '--workdir' in result.stdout


@pytest.mark.parametrize('module', ['knn', 'plots', 'export', 'lincls'])
def test_evaluation_help_exits_0_without_a_config_dump(module):
  result = subprocess.run([*python(), '-m', f'moco_jax.{module}', '--help'],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert '--workdir' in result.stdout
  assert 'imagenet2012' not in result.stdout and 'queue_size' not in result.stdout
  assert len(result.stdout.splitlines()) < 40


def test_show_config_prints_the_resolved_config():
  result = subprocess.run(
      [*python(), '-m', 'moco_jax.main', SMOKE, '--show_config',
       '--config.moco.queue_size=128', '--config.train.batch_size=32'],
      cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert 'queue_size: 128' in result.stdout and 'batch_size: 32' in result.stdout
  assert 'arch: resnet18' in result.stdout


def test_export_cli_formats_match_the_library():
  from moco_jax import export as export_cli
  from moco_jax.weights import export
  assert export_cli.FORMATS == export.FORMATS
