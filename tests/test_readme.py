"""Every ```bash and ```python block of README.md, then of docs/*.md (in name
order; the pages build on the README's first run), runs, in order, with paths
adapted: `runs/` goes to a temporary folder, `../shared/tfds` to the tests'
tiny dataset, and each training command gets smoke-sized overrides appended
(the tiny dataset, 16×16 images, batch 16, a few steps). The adapted text of
each block is printed. SKIPPED lists the blocks that cannot run here, with
the reason; the test prints it.
"""
import glob
import os
import re
import subprocess

import pytest

from cli_runner import python, with_python_on_path
from conftest import REPO, TINY_DATASET

README = os.path.join(REPO, 'README.md')
PAGES = [README] + sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))

# (text in the block, why it cannot run here)
SKIPPED = [
    ('.venv-torch', 'creates a second environment and downloads torch'),
    ('gcloud compute tpus', 'needs a Cloud TPU pod slice'),
    ('--coordinator_address=10.0.0.1', 'needs two GPU hosts (tests/test_multihost.py runs '
     'the same flags with two local processes)'),
    ('srun ', 'needs a SLURM cluster'),
    ('moco_v2_800ep_pretrain.pth.tar', "needs torch and the reference's 800-epoch checkpoint"),
    ('vit-s-300ep.pth.tar', 'needs ImageNet and the official MoCo v3 checkpoint'),
    ('--config.data.labels_per_class=50', "the measured command: needs CIFAR-10 (50 images "
     "per class; the tiny dataset has about 16) and the full quickstart checkpoint (the "
     "page's first block runs the same CLI)"),
    ('model = Classifier(backbone=backbone.module', 'an excerpt of '
     'examples/finetune_classifier.py, which tests/test_downstream.py runs'),
    ("optax.multi_transform(", 'an excerpt of examples/frozen_dense_head.py, which '
     'tests/test_downstream.py runs'),
    ('class Classifier(nnx.Module)', 'an excerpt of examples/nnx_classifier.py, which '
     'tests/test_downstream.py runs'),
]
# Lines left out of a block whose other lines run.
SKIPPED_LINES = [('python -m pytest -q -n auto', 'the test suite itself')]
# A block with one of these needs torch: it imports it, or writes a .pth for a
# later block that does.
NEEDS_TORCH = ('import torch', '--output=backbone.pth')

SMOKE = [f'--config.data.dataset={TINY_DATASET}', '--config.data.image_size=16',
         '--config.train.batch_size=16', '--config.eval.batch_size=16']
# No width override: the CPU recipes are narrow already, and a full-width run
# (docs/weights.md's) must stay loadable into a stock torchvision ResNet.
MAIN_SMOKE = SMOKE + ['--config.moco.queue_size=64', '--config.train.num_steps=4',
                      '--config.eval.knn_k=10']
LINCLS_SMOKE = SMOKE + ['--config.train.num_steps=2', '--config.train.log_every=1']
PYTHON_SMOKE = (f"config.data.dataset = '{TINY_DATASET}'; config.data.image_size = 16; "
                'config.train.batch_size = 16; config.moco.queue_size = 64; '
                'config.eval.batch_size = 16; config.eval.knn_k = 10; '
                'config.train.num_steps = 2')


def blocks():
  """(page, language, code) of each ```bash / ```python block of PAGES, in order;
  page is the path from the repository root."""
  found = []
  for path in PAGES:
    with open(path) as f:
      text = f.read()
    page = os.path.relpath(path, REPO)
    found += [(page, language, code) for language, code in re.findall(
        r'^```(bash|python)\n(.*?)^```', text, flags=re.MULTILINE | re.DOTALL)]
  return found


def skipped_line(line):
  """The reason a bash line is left out, or None."""
  for marker, why in SKIPPED_LINES:
    if marker in line:
      return why
  return None


def skip_reason(language, code):
  for marker, why in SKIPPED:
    if marker in code:
      return why
  if language == 'bash' and all(skipped_line(line) for line in code.splitlines()):
    return skipped_line(code)
  if any(marker in code for marker in NEEDS_TORCH):
    try:
      import torch  # noqa: F401
    except ImportError:
      return 'needs torch (not installed here; tests/test_torch_interop.py covers it)'
  return None


def adapt_paths(code, tmp, data_dir):
  code = code.replace('../shared/tfds', data_dir)
  return re.sub(r"(?<![\w/.])runs/", f'{tmp}/runs/', code)


def not_set_in(command, overrides):
  """The smoke overrides for the keys the block's command leaves to its recipe:
  a value the block sets itself (a step count, say) stays."""
  return [o for o in overrides if o.partition('=')[0] + '=' not in command]


def adapt_bash(code, tmp, data_dir):
  code = code.replace('pip install -r requirements.txt -e . && ', '')  # installed already
  code = adapt_paths(code.replace('\\\n', ' '), tmp, data_dir)
  lines = []
  for line in code.splitlines():
    if skipped_line(line):
      print(f'not run: {line} ({skipped_line(line)})')
      continue
    command, _, _ = line.partition('  #')
    command = re.sub(r'--output=(?!/)', f'--output={tmp}/', command)
    if re.search(r'moco_jax\.main .*--workdir', command):
      command += ' ' + ' '.join(not_set_in(command, MAIN_SMOKE))
    elif 'moco_jax.lincls' in command or 'moco_jax.finetune' in command:
      command += ' ' + ' '.join(not_set_in(command, LINCLS_SMOKE))
    elif 'moco_jax.plots' in command:
      command += ' --bank_size=64'
    lines.append(command)
  return 'set -e\n' + '\n'.join(lines)


def adapt_python(code, tmp, data_dir):
  code = adapt_paths(code, tmp, data_dir)
  # A bare weights file name ('backbone.pth') is where a bash block's
  # --output= wrote it, in tmp (see adapt_bash).
  code = re.sub(r"(?<=['\"])([\w-]+\.(?:pth|pkl|npz|msgpack))(?=['\"])", tmp + r'/\1', code)
  return re.sub(r'^(.*train_and_evaluate\(config)', PYTHON_SMOKE + r'\n\1', code,
                flags=re.MULTILINE)


def test_the_skip_list_is_short_and_matches_blocks():
  found = [code for _, _, code in blocks()]
  print('README and docs/ blocks not run here:')
  for marker, why in SKIPPED + SKIPPED_LINES:
    print(f'  {marker!r}: {why}')
    assert any(marker in code for code in found), f'{marker!r} is in no README or docs block'
  assert len(SKIPPED) <= len(found) // 2


@pytest.fixture(scope='module')
def workspace(tiny_data_dir, tmp_path_factory):
  return str(tmp_path_factory.mktemp('readme')), tiny_data_dir


@pytest.mark.parametrize('index', range(len(blocks())),
                         ids=[f'{i}-{p}-{c.strip().splitlines()[0][:50]}'
                              for i, (p, _, c) in enumerate(blocks())])
def test_readme_block_runs(workspace, index):
  tmp, data_dir = workspace
  _, language, code = blocks()[index]
  why = skip_reason(language, code)
  if why:
    print(f'skipped: {why}')
    pytest.skip(why)
  if language == 'bash':
    adapted = adapt_bash(code, tmp, data_dir)
    command = ['bash', '-c', adapted]
  else:
    adapted = adapt_python(code, tmp, data_dir)
    command = [*python(), '-c', adapted]
  print(adapted)
  env = with_python_on_path(
      {k: v for k, v in os.environ.items() if not k.startswith('XLA_FLAGS')})
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])


def test_tensorboard_reads_the_runs_events(workspace):
  """The README's `tensorboard --logdir`: installed by requirements.txt and
  able to read the tensorboardX events the first block's run wrote."""
  tmp, _ = workspace
  logdir = os.path.join(tmp, 'runs', 'quickstart')
  if not os.path.isdir(logdir):
    pytest.skip('the first README block did not run')
  result = subprocess.run([*python(), '-m', 'tensorboard.main', '--inspect',
                           f'--logdir={logdir}'], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'loss' in result.stdout and 'instance_top1' in result.stdout, result.stdout[-2000:]
