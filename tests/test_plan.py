"""The pod plan (moco_jax/plan.py): the real step compiled for a TPU slice
by libtpu on this CPU machine.

Needs libtpu (pip install -e ".[tpu]"; .ci/run installs it); without it the
compiling tests skip and only the missing-libtpu line is checked. The smoke
recipe's plan on a v5e-4 is compiled once (the smoke_plan fixture). Opt-in,
and run by .ci/run after the suite: the R50 v4-8 recipe (3 min 40 s of
compiling on 2 quiet cores; MOCO_JAX_TEST_R50_PLAN=1) and the refusal of an
oversized batch with its search (about a minute; MOCO_JAX_TEST_PLAN_SEARCH=1).
"""
import importlib.util
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from cli_runner import python
from conftest import REPO, smoke_config

HAVE_LIBTPU = importlib.util.find_spec('libtpu') is not None
needs_libtpu = pytest.mark.skipif(not HAVE_LIBTPU, reason='libtpu not installed '
                                  '(pip install -e ".[tpu]")')
SLICE = 'v5e-4'   # 4 chips, one host: the smallest multi-chip slice


def smoke(**overrides):
  config = smoke_config('/nonexistent', **overrides)   # the catalogue's cifar10
  config.data.dataset = 'cifar10'
  return config


def run_plan(*flags, hide_libtpu=False, env=None):
  prelude = "import sys; sys.modules['libtpu'] = None; " if hide_libtpu else ''
  code = (prelude + "import runpy; sys.argv = ['plan'] + sys.argv[1:]; "
          "runpy.run_module('moco_jax.plan', run_name='__main__')")
  if not hide_libtpu:
    code = 'import sys; ' + code
  return subprocess.run([*python(), '-c', code, *flags], cwd=REPO,
                        capture_output=True, text=True, timeout=2400,
                        env=dict(os.environ, **(env or {})))


def accelerators_module():
  from moco_jax.runtime import accelerators
  return accelerators


def host_program(config, topology):
  """The pretraining step on the host-crops path alone, compiled for
  `topology` (make_plan also compiles the data-on-device path)."""
  from moco_jax import plan
  from moco_jax.runtime import accelerators
  tpu_slice = accelerators.parse_slice(topology)
  info, image_shape = plan.dataset_facts(config)
  return plan.pretrain_programs(config, tpu_slice, plan.slice_mesh(tpu_slice), info,
                                image_shape, [0.4], paths=('host',))['pretrain (host crops)']


def tree_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


# The smoke recipe at 16 images per chip of SLICE (its own 16 would be 4).
PLANNED = {'train.batch_size': 4 * 16, 'moco.queue_size': 4 * 16 * 4}


@pytest.fixture(scope='module')
def smoke_plan():
  """The smoke recipe's plan on SLICE (PLANNED) with the pretraining,
  linear-probe and fine-tuning programs, compiled once for the tests that
  read it."""
  from moco_jax import plan
  return plan.make_plan(smoke(**PLANNED), SLICE, programs=('pretrain', 'lincls', 'finetune'))


@needs_libtpu
def test_the_smoke_recipe_compiles_for_a_tpu_slice_and_holds_its_state(smoke_plan):
  from moco_jax.models import build_encoder
  config = smoke(**PLANNED)
  result = smoke_plan
  host = result['programs']['pretrain (host crops)']
  assert result['topology']['chips'] == 4 and result['fits']
  # An independent count of what the step's arguments must hold: f_q's
  # parameters three times (f_q, f_k, SGD momentum), both BN statistics, the
  # queue, and this device's two uint8 views.
  encoder = build_encoder(config.model, 1)
  variables = jax.eval_shape(lambda: encoder.init(
      jax.random.PRNGKey(0), np.zeros((2, 16, 16, 3), np.float32)))
  params, stats = tree_bytes(variables['params']), tree_bytes(variables['batch_stats'])
  queue = config.moco.queue_size * config.model.dim * 4
  views = 2 * (config.train.batch_size // 4) * 16 * 16 * 3
  assert host['memory']['arguments'] >= 3 * params + 2 * stats + queue + views
  assert host['memory']['total'] < result['topology']['hbm_bytes_per_chip']
  assert host['flops'] > 0
  # Shuffle BN by statistics: no collective carries the images.
  assert not any(c['op'] == 'all-gather' and c['shape'].startswith('u8')
                 for c in host['collectives'])
  # The CIFAR-sized split fits on the devices: that path compiles too.
  assert 'memory' in result['programs']['pretrain (data on device)']


@needs_libtpu
def test_the_fine_tuning_step_compiles_and_holds_the_whole_network(smoke_plan):
  from moco_jax.models import build_backbone
  config = smoke()
  programs = smoke_plan['programs']
  finetune, probe = programs['fine-tune step (batch 256)'], programs['linear probe step']
  # The same backbone and batch: the probe runs it forward only, fine-tuning
  # forward and backward (about 3x) and updates every weight.
  assert probe['batch_per_device'] == finetune['batch_per_device'] == 256 // 4
  assert 1.5 * probe['flops'] < finetune['flops'] < 6 * probe['flops']
  # An independent count of what its arguments must hold at least: the
  # backbone's parameters and their SGD momentum, and its BN statistics.
  variables = jax.eval_shape(lambda: build_backbone(config.model).init(
      jax.random.PRNGKey(0), np.zeros((2, 16, 16, 3), np.float32), train=False))
  params, stats = tree_bytes(variables['params']), tree_bytes(variables['batch_stats'])
  assert finetune['memory']['arguments'] >= 2 * params + stats
  assert finetune['fits']


@needs_libtpu
def test_flops_per_step_scale_linearly_with_the_per_device_batch(smoke_plan):
  flops = {16: smoke_plan['programs']['pretrain (host crops)']['flops']}
  assert smoke_plan['config']['batch_per_device'] == 16
  config = smoke(**dict(PLANNED, **{'train.batch_size': 4 * 8}))
  flops[8] = host_program(config, SLICE)['flops']
  assert flops[16] / flops[8] == pytest.approx(2.0, rel=0.05)


@needs_libtpu
# Opt-in (a minute of compiling for the default suite's budget); .ci/run runs
# it after the suite, with the R50 recipe.
@pytest.mark.skipif(not os.environ.get('MOCO_JAX_TEST_PLAN_SEARCH'),
                    reason='opt-in (MOCO_JAX_TEST_PLAN_SEARCH=1; .ci/run runs it): '
                           'compiles the step four times while searching for the batch '
                           'that fits')
def test_an_oversized_batch_is_refused_in_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'run'
  # A queue of 2^25 keys: each image's row of logits against it (128 MiB of
  # float32, held a few times over for the backward pass) outweighs its
  # activations, so 16 GiB of v5e HBM holds a few dozen images, and steps of
  # a few dozen 16 px images compile in seconds (a refused one sooner).
  queue = 2**25
  result = run_plan('--config=configs/smoke.py', '--topology=v5e-1',
                    '--config.train.batch_size=128', f'--config.moco.queue_size={queue}',
                    '--programs=pretrain', f'--workdir={workdir}')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: train.batch_size=128 (128 per device) needs at least ')
  assert 'the largest per-device batch that fits is' in lines[0]
  fitting = int(lines[0].split('fits is ')[1].split()[0])
  assert 0 < fitting < 128 and fitting % 8 == 0   # bn_groups=8 on one chip
  assert result.stdout == ''
  assert not workdir.exists()
  # The flags it names make a config pretraining accepts (48 does not divide
  # the 2^25-key queue: the line names a queue that it does divide).
  from moco_jax.config.checks import config_problems
  named = dict(flag.lstrip('-').split('=') for flag in
               lines[0].split('(--')[1].rstrip(')').replace(' --', ' ').split())
  assert named['config.train.batch_size'] == str(fitting)
  suggested = smoke(**{'train.batch_size': fitting,
                       'moco.queue_size': int(named.get('config.moco.queue_size', queue))})
  assert config_problems(suggested, 1) == []
  # The search returns only a batch it compiled within HBM whose next valid
  # batch it compiled too and saw refused (plan.largest_fitting_batch); the
  # refusal, quick to compile, is checked here again: 8 more (the queue a
  # multiple of the batch, as the search keeps it) does not fit the chip.
  batch = fitting + 8
  config = smoke(**{'train.batch_size': batch, 'moco.queue_size': queue // batch * batch})
  assert not host_program(config, 'v5e-1')['fits']


def test_a_missing_libtpu_is_one_line_saying_how_to_install_it():
  result = run_plan('--config=configs/smoke.py', '--topology=v5e-4', hide_libtpu=True)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert 'libtpu' in lines[0] and 'pip install' in lines[0]


def test_collectives_of_long_tuples_are_counted():
  """XLA writes `/*index=5*/` into tuples of 6 or more arrays; the combined
  gradient all-reduce is such a tuple (ResNet-50's went uncounted)."""
  from moco_jax.runtime import compiled_costs
  arrays = ', '.join(['f32[8,4]{1,0:T(8,128)}'] * 5 + ['/*index=5*/f32[8,4]{1,0:T(8,128)}'])
  hlo = (f'  %all-reduce.1 = ({arrays}) all-reduce(%a, %b, %c, %d, %e, %f), '
         'channel_id=1, replica_groups=[1,4]<=[4], use_global_device_ids=true\n'
         '  %all-gather = f32[16,4]{1,0} all-gather(f32[4,4]{1,0} %k), '
         'replica_groups=[1,4]<=[4], dimensions={0}\n')
  found = compiled_costs.collectives(hlo, 4)
  assert [c['op'] for c in found] == ['all-reduce', 'all-gather']
  assert found[0]['bytes'] == 6 * 8 * 4 * 4                  # six f32[8,4]
  assert found[0]['bytes_per_chip'] == 6 * 8 * 4 * 4 * 2 * 3 / 4   # ring: 2(n-1)/n
  assert found[1]['bytes'] == 16 * 4 * 4


def test_unknown_slices_are_refused_with_the_valid_names():
  from moco_jax.runtime import accelerators
  assert accelerators.parse_slice('v4-32').shape == (2, 2, 4)
  assert accelerators.parse_slice('v4-32').chips == 16
  assert accelerators.parse_slice('v5litepod-256').topology == 'v5e:16x16'
  assert accelerators.parse_slice('v5p-8').chips == 4
  for bad in ('v4-6', 'v5e-3', 'v7-8', 'tpu'):
    with pytest.raises(accelerators.TopologyError, match='valid: v4-8'):
      accelerators.parse_slice(bad)


@pytest.mark.skipif(not (HAVE_LIBTPU and os.environ.get('MOCO_JAX_TEST_R50_PLAN')),
                    reason='opt-in (MOCO_JAX_TEST_R50_PLAN=1): compiles ResNet-50, '
                           '~7 min on 2 cores')
def test_the_v2_r50_recipe_fits_a_v4_8():
  result = run_plan('--config=configs/moco_v2_r50_imagenet.py', '--topology=v4-8',
                    '--programs=pretrain', '--json')
  assert result.returncode == 0, result.stderr
  plan = json.loads(result.stdout)
  host = plan['programs']['pretrain (host crops)']
  assert plan['fits'] and host['batch_per_device'] == 64
  # ResNet-50's forward is 4.1 G multiply-adds = 8.2 GFLOPs per 224 px
  # image; backward twice that; the key encoder adds one more forward.
  assert 64 * 4 * 8.2e9 * 0.8 < host['flops'] < 64 * 4 * 8.2e9 * 1.5


def test_a_real_run_measures_mfu_with_the_plans_flop_count(tiny_data_dir):
  """train_and_evaluate on an accelerator runs the step compiled ahead of time
  (Experiment.compiled_train_step) and divides the plan's FLOP count by the
  chip's peak. Here on 8 CPU devices: the AOT step gives the jitted step's
  state, and its FLOPs are the plan's for the same mesh."""
  from jax.sharding import Mesh
  from moco_jax import plan
  from moco_jax.experiment import Experiment
  from moco_jax.runtime import accelerators
  config = smoke_config(tiny_data_dir)
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  experiment = Experiment(config, mesh)
  rng = np.random.default_rng(0)
  views = [rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8) for _ in range(2)]
  inputs = experiment.step_inputs({'images_q': views[0], 'images_k': views[1]})
  step, flops = experiment.compiled_train_step(experiment.init_state(), inputs)
  aot_state, aot_metrics = step(experiment.init_state(), *inputs)
  jit_state, jit_metrics = experiment.train_step()(experiment.init_state(), *inputs)
  assert float(aot_metrics['loss']) == float(jit_metrics['loss'])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(aot_state.params),
               jax.device_get(jit_state.params))
  info, shape = plan.dataset_facts(config)
  planned = plan.pretrain_programs(config, accelerators.parse_slice('v4-16'), mesh,
                                   info, shape, [0.4], paths=('host',))
  assert flops > 0 and flops == planned['pretrain (host crops)']['flops']


@pytest.mark.skipif(not accelerators_module().cuda_plugin_installed(),
                    reason='jax-cuda12-plugin not installed (the GPU plan is optional)')
def test_the_smoke_recipe_compiles_for_eight_h100s_without_a_gpu():
  from moco_jax import plan
  result = plan.make_plan(smoke(), 'h100-8', programs=('pretrain',))
  host = result['programs']['pretrain (host crops)']
  assert result['topology']['chips'] == 8 and result['fits']
  assert host['memory']['arguments'] > config_queue_bytes(smoke())
  # The keys' all-gather for the queue, and no image gather (statistics).
  assert any(c['op'] == 'all-gather' for c in host['collectives'])
  assert not any(c['shape'].startswith('u8') for c in host['collectives'])


def config_queue_bytes(config) -> int:
  return config.moco.queue_size * config.model.dim * 4


@needs_libtpu
def test_shuffle_bn_by_statistics_moves_less_than_the_images():
  """The collectives per chip per step of the smoke recipe's step on a v5e-16:
  moving BN statistics instead of images must cut the bytes, by most of
  the image gather's size (B x 16 x 16 x 3 float32, received by every chip)."""
  moved = {}
  for mode in ('images', 'statistics'):
    config = smoke(**{'train.batch_size': 256, 'moco.queue_size': 512,
                      'moco.bn_groups': 16, 'moco.shuffle_bn_mode': mode})
    host = host_program(config, 'v5e-16')
    moved[mode] = sum(c['bytes_per_chip'] for c in host['collectives'])
    print(mode, moved[mode], [(c['op'], c['shape']) for c in host['collectives']
                              if c['bytes'] > 4096])
  image_gather = 256 * 16 * 16 * 3 * 4 * 15 / 16
  assert moved['images'] - moved['statistics'] > 0.8 * image_gather
