"""Export and import without torch: name mappings, files, CLI, mismatches."""
import os
import pickle
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from cli_runner import python
from conftest import REPO, copy_of, smoke_config
from moco_jax.runtime import checkpointing
from moco_jax.weights import convert
from moco_jax.weights import export
from moco_jax.weights import import_weights
from moco_jax.models import build_encoder
from moco_jax.experiment import Experiment

# torchvision's state_dict sizes without `fc` (num_batches_tracked included).
TORCHVISION_BACKBONE_KEYS = {'resnet18': 120, 'resnet50': 318}


def random_variables(module, size=32, seed=0):
  """Random numpy values with module's variable shapes (no real init)."""
  shapes = jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((2, size, size, 3)), train=False))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype),
                      shapes)


def encoder_config(arch='resnet18', head='mlp', width=1.0, cifar_stem=False):
  return ml_collections.ConfigDict(dict(
      arch=arch, width_multiplier=width, cifar_stem=cifar_stem, head=head,
      head_hidden_dim=0, dim=128))


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_and_detectron2_round_trips_are_exact(arch):
  encoder = build_encoder(encoder_config(arch))
  variables = random_variables(encoder)
  backbone = {'params': variables['params']['backbone'],
              'batch_stats': variables['batch_stats']['backbone']}

  flat = convert.to_torchvision(backbone, num_batches_tracked=7)
  assert len(flat) == TORCHVISION_BACKBONE_KEYS[arch]
  assert flat['conv1.weight'].shape == (64, 3, 7, 7)           # OIHW
  np.testing.assert_array_equal(flat['conv1.weight'][5, 2, 1, 4],
                                backbone['params']['conv1']['kernel'][1, 4, 2, 5])
  assert flat['bn1.num_batches_tracked'].dtype == np.int64
  assert 'layer2.0.downsample.0.weight' in flat and 'layer1.0.bn2.running_var' in flat
  assert_trees_equal(convert.from_torchvision(flat, backbone), backbone)

  d2 = convert.to_detectron2(flat)
  counters = [k for k in flat if k.endswith('.num_batches_tracked')]
  assert len(d2) == len(flat) - len(counters)
  for name in ('stem.conv1.weight', 'stem.conv1.norm.running_mean',
               'res2.0.conv1.weight', 'res2.0.conv1.norm.weight',
               'res3.0.shortcut.weight', 'res3.0.shortcut.norm.bias',
               'res5.1.conv2.norm.running_var'):
    assert name in d2, name
  assert_trees_equal(convert.from_detectron2(d2, backbone), backbone)

  head = convert.to_torchvision({'params': variables['params']['head']})
  assert sorted(head) == ['fc.0.bias', 'fc.0.weight', 'fc.2.bias', 'fc.2.weight']
  assert head['fc.0.weight'].shape == (encoder.backbone.num_features,) * 2


def test_reference_detectron2_names():
  """The renaming of the reference convert-pretrain-to-detectron2.py."""
  cases = {'conv1.weight': 'stem.conv1.weight',
           'bn1.running_var': 'stem.conv1.norm.running_var',
           'layer1.0.bn3.weight': 'res2.0.conv3.norm.weight',
           'layer4.2.conv2.weight': 'res5.2.conv2.weight',
           'layer3.0.downsample.0.weight': 'res4.0.shortcut.weight',
           'layer3.0.downsample.1.bias': 'res4.0.shortcut.norm.bias',
           'fc.0.weight': 'stem.fc.0.weight'}
  for torchvision_name, detectron2_name in cases.items():
    assert convert.detectron2_name(torchvision_name) == detectron2_name
    assert convert.torchvision_name_from_detectron2(detectron2_name) == torchvision_name


def small_encoder(head='mlp', arch='resnet18'):
  return build_encoder(encoder_config(arch, head, width=0.125, cifar_stem=True))


def test_mismatches_list_every_bad_key(tmp_path):
  r18 = small_encoder()
  flat = export.torchvision_state_dict(random_variables(r18, seed=1))
  del flat['layer4.1.bn2.running_var'], flat['layer1.0.conv1.weight']
  flat['layer5.0.conv1.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  flat['layer2.0.bn1.weight'] = np.zeros(3, np.float32)
  path = str(tmp_path / 'bad.npz')
  np.savez(path, **flat)
  with pytest.raises(convert.WeightsMismatchError) as error:
    import_weights.load_weights(path, random_variables(r18))
  message = str(error.value)
  assert '\n' not in message and path in message
  for part in ('missing 2:', 'layer4.1.bn2.running_var', 'layer1.0.conv1.weight',
               'unexpected 1: layer5.0.conv1.weight',
               'wrong shape 1: layer2.0.bn1.weight (3,) (model: (16,))'):
    assert part in message, message

  r50 = small_encoder(arch='resnet50')
  with pytest.raises(convert.WeightsMismatchError) as error:
    import_weights.load_weights(path, random_variables(r50))
  message = str(error.value)
  assert 'layer1.0.conv3.weight' in message and 'layer3.5.' in message
  assert ('file looks like resnet18 (width_multiplier 0.125, 3x3 stem); model '
          'is resnet50 (width_multiplier 0.125, 3x3 stem)') in message


def test_head_kinds_and_torchvision_classifier(tmp_path):
  v1, v2 = small_encoder('linear'), small_encoder('mlp')
  v1_vars, v2_vars = random_variables(v1, seed=1), random_variables(v2, seed=2)
  v1_path, v2_path = str(tmp_path / 'v1.npz'), str(tmp_path / 'v2.npz')
  np.savez(v1_path, **export.torchvision_state_dict(v1_vars, with_head=True))
  np.savez(v2_path, **export.torchvision_state_dict(v2_vars, with_head=True))

  assert_trees_equal(import_weights.load_weights(v1_path, random_variables(v1)),
                     v1_vars)
  assert_trees_equal(import_weights.load_weights(v2_path, random_variables(v2)),
                     v2_vars)
  with pytest.raises(convert.WeightsMismatchError) as error:
    import_weights.load_weights(str(v2_path), random_variables(v1))
  assert 'missing 2: fc.{weight,bias}' in str(error.value)
  assert 'unexpected 4: fc.0.{weight,bias}, fc.2.{weight,bias}' in str(error.value)

  # A torchvision classifier (10-way fc) is not a head: the template's is kept.
  flat = export.torchvision_state_dict(v2_vars)
  flat['fc.weight'] = np.ones((10, 64), np.float32)
  flat['fc.bias'] = np.ones(10, np.float32)
  path = str(tmp_path / 'classifier.npz')
  np.savez(path, **flat)
  template = random_variables(v1, seed=3)
  loaded = import_weights.load_weights(path, template)
  assert_trees_equal(loaded['params']['head'], template['params']['head'])
  assert_trees_equal(loaded['params']['backbone'], v2_vars['params']['backbone'])


def test_unknown_file_type_names_valid_ones(tmp_path):
  path = tmp_path / 'weights.h5'
  path.write_bytes(b'')
  with pytest.raises(ValueError, match=r"'.*weights.h5' has an unknown type; valid: .pth"):
    import_weights.load_weights(str(path), random_variables(small_encoder()))


def test_pth_without_torch_says_how_to_get_it(tmp_path, monkeypatch):
  path = tmp_path / 'checkpoint.pth.tar'
  path.write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if not installed
  with pytest.raises(ImportError, match=r'needs PyTorch \(pip install torch\)'):
    import_weights.load_torch_weights(str(path), random_variables(small_encoder()))
  with pytest.raises(export.ExportError, match=r"--output='x.pth' needs PyTorch"):
    export.save_torchvision('x.pth', {})
  assert export.default_output('w', 'torchvision', 4, False).endswith('.npz')


@pytest.fixture(scope='module')
def pretrained(tiny_data_dir, smoke_pretrain_dir, tmp_path_factory):
  """A copy of the shared smoke pretraining workdir (steps 0, 2, 4; exports
  without --output write into it) and its final query encoder variables."""
  config = smoke_config(tiny_data_dir)
  workdir = copy_of(smoke_pretrain_dir, tmp_path_factory.mktemp('export'))
  experiment = Experiment(config)
  checkpointer = checkpointing.Checkpointer(workdir)
  state = jax.device_get(checkpointer.restore(experiment.abstract_state()))
  checkpointer.close()
  return config, workdir, {'params': state.params, 'batch_stats': state.batch_stats}


def test_export_all_formats_and_import_back(pretrained, tmp_path):
  config, workdir, want = pretrained
  template = random_variables(build_encoder(config.model), size=16, seed=5)
  backbone = {'params': want['params']['backbone'],
              'batch_stats': want['batch_stats']['backbone']}

  path = export.export(workdir, 'flax', with_head=True)
  assert path == os.path.join(workdir, 'export', 'flax_encoder_step4.msgpack')
  module, variables = export.load_flax_backbone(path)
  assert_trees_equal(variables, backbone)
  assert (module.block, module.width_multiplier, module.cifar_stem) == (
      'basic', 0.125, True)
  assert export.read_flax_export(path)['model']['image_size'] == 16
  assert_trees_equal(import_weights.load_weights(path, template), want)

  path = export.export(workdir, 'torchvision', str(tmp_path / 'tv.npz'))
  with np.load(path) as data:
    flat = dict(data)
  assert len(flat) == TORCHVISION_BACKBONE_KEYS['resnet18']
  assert flat['conv1.weight'].shape == (8, 3, 3, 3)
  assert int(flat['bn1.num_batches_tracked']) == 4
  loaded = import_weights.load_weights(path, template)  # head kept from template
  assert_trees_equal(loaded['params']['backbone'], want['params']['backbone'])
  assert_trees_equal(loaded['params']['head'], template['params']['head'])

  path = export.export(workdir, 'detectron2', str(tmp_path / 'd2.pkl'), step=2)
  with open(path, 'rb') as f:
    obj = pickle.load(f)
  assert obj['__author__'] == 'MOCO' and obj['matching_heuristics'] is True
  assert 'res5.1.conv2.norm.running_var' in obj['model']
  assert not any('fc' in k or 'num_batches' in k for k in obj['model'])
  assert all(isinstance(v, np.ndarray) for v in obj['model'].values())
  step2 = import_weights.load_weights(path, template)['params']['backbone']
  assert not np.array_equal(step2['conv1']['kernel'],
                            want['params']['backbone']['conv1']['kernel'])


def test_export_cli(pretrained, tmp_path):
  _, workdir, want = pretrained
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device
  run = lambda *flags: subprocess.run(
      [*python(), '-m', 'moco_jax.export', f'--workdir={workdir}', *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

  output = str(tmp_path / 'head.pkl')
  result = run('--format=detectron2', f'--output={output}', '--with_head')
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == output
  with open(output, 'rb') as f:
    names = pickle.load(f)['model']
  np.testing.assert_array_equal(names['stem.fc.2.bias'],
                                want['params']['head']['fc_2']['bias'])

  result = run('--format=flax', '--step=3')
  assert result.returncode == 2
  assert result.stderr.strip().splitlines()[-1] == (
      f"error: --step=3 has no checkpoint in '{workdir}'; available: 0, 2, 4")


def test_export_errors_name_the_bad_value(pretrained, tmp_path):
  _, workdir, _ = pretrained
  with pytest.raises(export.ExportError, match=r"--output='x.pth' for --format=flax "
                     r"must end with .msgpack"):
    export.export(workdir, 'flax', 'x.pth')
  with pytest.raises(export.ExportError, match='has no checkpoints/ directory'):
    export.export(str(tmp_path), 'flax')
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_init_state_from_sets_both_encoders(pretrained, tiny_data_dir):
  config, workdir, want = pretrained
  experiment = Experiment(config)
  state = experiment.init_state()
  variables = import_weights.load_weights(export.export(workdir, 'flax', with_head=True),
                                          {'params': state.params,
                                           'batch_stats': state.batch_stats})
  new = import_weights.init_state_from(state, variables)
  for got in (new.params, new.target_params):
    assert_trees_equal(jax.device_get(got), want['params'])
  for got in (new.batch_stats, new.target_batch_stats):
    assert_trees_equal(jax.device_get(got), want['batch_stats'])
  assert jax.tree.leaves(new.params)[0].sharding == experiment.replicated


def test_readme_fine_tuning_example(pretrained):
  """The README's example: a Flax classifier on the exported backbone."""
  _, workdir, _ = pretrained
  path = export.export(workdir, 'flax')

  backbone, pretrained_variables = export.load_flax_backbone(path)

  class Classifier(nn.Module):
    backbone: nn.Module
    num_classes: int

    @nn.compact
    def __call__(self, images, train: bool):
      return nn.Dense(self.num_classes)(self.backbone(images, train=train))

  model = Classifier(backbone, num_classes=4)
  init = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  params = {**init['params'], 'backbone': pretrained_variables['params']}
  batch_stats = {'backbone': pretrained_variables['batch_stats']}
  tx = optax.sgd(0.01, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  rng = np.random.default_rng(0)
  images = rng.standard_normal((8, 16, 16, 3)).astype(np.float32)
  labels = rng.integers(0, 4, 8)
  losses = []
  for _ in range(3):
    params, batch_stats, opt_state, loss = train_step(params, batch_stats,
                                                      opt_state, images, labels)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_a_run_saved_with_the_old_bn_splits_still_loads(pretrained, tmp_path):
  """Configs saved before moco.bn_groups (per-device moco.bn_splits) load for
  kNN, linear evaluation and export: inference ignores BN grouping."""
  from moco_jax.runtime.mesh import make_mesh
  from moco_jax.weights import pretrained as pretrained_runs
  config, workdir, want = pretrained
  old = config.to_dict()
  del old['moco']['bn_groups']
  old['moco']['bn_splits'] = 2
  for section, key in (('moco', 'symmetric'), ('eval', 'knn_features')):
    del old[section][key]
  checkpointer = checkpointing.Checkpointer(workdir)
  state = checkpointer.restore(Experiment(config).abstract_state(), 4)
  checkpointer.close()
  old_dir = str(tmp_path / 'old_run')
  checkpointer = checkpointing.Checkpointer(old_dir)
  checkpointer.save(4, state, old)
  checkpointer.wait()
  checkpointer.close()
  saved, step, variables = export.restore_encoder(old_dir)
  assert step == 4 and saved.moco.bn_splits == 2 and 'bn_groups' not in saved.moco
  jax.tree.map(np.testing.assert_array_equal, variables, want)
  run = pretrained_runs.load(old_dir, make_mesh())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.encoder_params),
               want['params'])
