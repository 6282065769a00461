"""MoCo v3 weights and evaluation: a tiny ViT v3 run exported to timm names
and Flax and read back, an official-layout moco-v3 checkpoint through
config.init_from, kNN and linear evaluation on the class token, and a v3
ResNet's torchvision export naming the backbone as v2's does."""
import jax
import numpy as np
import pytest

from conftest import smoke_config
from test_lincls import lincls_config
from test_v3 import v3_smoke_config
from moco_jax import train
from moco_jax.evaluation import knn, linear
from moco_jax.experiment import Experiment, abstract_state
from moco_jax.runtime.mesh import make_mesh
from moco_jax.weights import export, timm
from moco_jax.weights.import_weights import load_weights


@pytest.fixture(scope='module')
def v3_workdir(tiny_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('v3run'))
  train.train_and_evaluate(v3_smoke_config(tiny_data_dir, **{'train.num_steps': 2}),
                           workdir)
  return workdir


def test_timm_and_flax_exports_read_back_exactly(v3_workdir, tmp_path):
  config, _, variables = export.restore_encoder(v3_workdir)
  backbone = variables['params']['backbone']
  path = export.export(v3_workdir, 'timm', str(tmp_path / 'vit.npz'), with_head=True)
  with np.load(path) as data:
    flat = dict(data)
  assert 'pos_embed' in flat and 'head.0.weight' in flat and 'predictor.0.weight' in flat
  # timm names: the backbone alone, back into our tree.
  back = timm.from_timm({k: v for k, v in flat.items()
                         if not k.startswith(('head.', 'predictor.'))},
                        {'params': backbone}, image_size=config.data.image_size)
  jax.tree.map(np.testing.assert_array_equal, back['params'], backbone)
  # Flax: the rebuilt ViT gives the run's class-token features.
  flax_path = export.export(v3_workdir, 'flax', str(tmp_path / 'vit.msgpack'))
  module, loaded = export.load_flax_backbone(flax_path)
  x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
  want = knn.backbone_from_config(config).apply({'params': backbone}, x, train=False)
  np.testing.assert_allclose(module.apply(loaded, x, train=False), want, rtol=1e-6)
  with pytest.raises(export.ExportError, match='--format=torchvision is for ResNets'):
    export.export(v3_workdir, 'torchvision', str(tmp_path / 'x.npz'))


def test_official_moco_v3_checkpoint_initialises_both_encoders(v3_workdir, tiny_data_dir,
                                                              tmp_path):
  config, _, variables = export.restore_encoder(v3_workdir)
  base = export.timm_state_dict(variables, config.data.image_size, with_head=True)
  # The reference's layout: module.base_encoder.* (backbone + head.*),
  # module.momentum_encoder.* (other values: must be ignored), module.predictor.*
  official = {}
  for name, value in base.items():
    if name.startswith('predictor.'):
      official[f'module.{name}'] = value
    else:
      official[f'module.base_encoder.{name}'] = value
      official[f'module.momentum_encoder.{name}'] = value + 1.0
  path = str(tmp_path / 'official.npz')
  np.savez(path, **official)

  run_config = v3_smoke_config(tiny_data_dir, init_from=path)
  experiment = Experiment(run_config)
  state = jax.device_get(train.init_state(experiment))
  want = jax.tree.map(np.asarray, variables['params'])
  jax.tree.map(np.testing.assert_array_equal, state.params, want)
  jax.tree.map(np.testing.assert_array_equal, state.target_params,
               {k: want[k] for k in ('backbone', 'head')})
  jax.tree.map(np.testing.assert_array_equal, state.batch_stats,
               jax.tree.map(np.asarray, variables['batch_stats']))
  # A ViT of another width is a one-line mismatch naming the keys.
  other = v3_smoke_config(tiny_data_dir, **{'model.head_hidden_dim': 64})
  fresh = jax.device_get(Experiment(other).init_state())
  with pytest.raises(ValueError, match='wrong shape'):
    load_weights(path, {'params': fresh.params, 'batch_stats': fresh.batch_stats})


def test_knn_and_linear_evaluation_on_the_class_token(v3_workdir, tiny_data_dir, tmp_path):
  config, _, _ = export.restore_encoder(v3_workdir)
  config.eval.batch_size = 32
  result = knn.KnnEvaluator(config, make_mesh())(*_encoder_vars(v3_workdir))
  assert 0 <= result['knn_top1'] <= 100
  lin = lincls_config(v3_workdir, tiny_data_dir, **{'train.num_steps': 2,
                                                     'train.log_every': 1})
  metrics = linear.linear_evaluation(lin, str(tmp_path / 'lin'))
  assert 0 <= metrics['lincls_top1'] <= 100   # and the backbone-unchanged check passed


def _encoder_vars(workdir):
  _, _, variables = export.restore_encoder(workdir)
  return variables['params'], variables['batch_stats']


def test_v3_resnet_exports_the_backbone_under_v2_names():
  def names(**overrides):
    config = smoke_config('/unused', **overrides)
    state = abstract_state(config)
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                             {'params': state.params, 'batch_stats': state.batch_stats})
    return export.torchvision_state_dict(variables), export.torchvision_state_dict(
        variables, with_head=True)
  v2, _ = names()
  v3, v3_head = names(**{'model.head': 'v3', 'model.head_hidden_dim': 32,
                         'model.predictor': True, 'moco.queue_size': 0,
                         'moco.shuffle_bn': False, 'optim.name': 'lars'})
  assert set(v2) == set(v3)
  assert {k for k in v3_head if k not in v3} >= {'fc.0.weight', 'fc.1.weight',
                                                 'fc.1.running_var', 'fc.3.weight',
                                                 'predictor.0.weight', 'predictor.3.weight'}


# --- optional: torch and timm -------------------------------------------------

def _has(name):
  import importlib.util
  return importlib.util.find_spec(name) is not None


@pytest.mark.skipif(not (_has('torch') and _has('timm')), reason='needs torch and timm')
def test_timm_runs_the_exported_pth_and_the_import_reads_it_back(v3_workdir, tiny_data_dir,
                                                                 tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  config, _, variables = export.restore_encoder(v3_workdir)
  path = export.export(v3_workdir, 'timm', str(tmp_path / 'vit.pth'))
  spec = __import__('moco_jax.models.vit', fromlist=['ARCHS']).ARCHS[config.model.arch]
  model = vision_transformer.VisionTransformer(
      img_size=config.data.image_size, patch_size=spec.patch, embed_dim=spec.dim,
      depth=spec.depth, num_heads=spec.heads, mlp_ratio=4, qkv_bias=True,
      num_classes=0, class_token=True, global_pool='token').eval()
  model.load_state_dict(torch.load(path, weights_only=True), strict=True)
  x = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  ours = np.asarray(knn.backbone_from_config(config).apply(
      {'params': variables['params']['backbone']}, x, train=False))
  diff = float(np.abs(ours - theirs).max())
  print(f'timm on the exported .pth vs our ViT: max |diff| {diff:.3g}')
  assert diff < 1e-5
  # The reference's checkpoint layout as a .pth.tar, through config.init_from.
  base = export.timm_state_dict(variables, config.data.image_size, with_head=True)
  state_dict = {(f'module.{k}' if k.startswith('predictor.') else
                 f'module.base_encoder.{k}'): torch.from_numpy(np.ascontiguousarray(v))
                for k, v in base.items()}
  ckpt = str(tmp_path / 'checkpoint_0299.pth.tar')
  torch.save({'epoch': 300, 'arch': config.model.arch, 'state_dict': state_dict}, ckpt)
  state = jax.device_get(train.init_state(Experiment(
      v3_smoke_config(tiny_data_dir, init_from=ckpt))))
  jax.tree.map(np.testing.assert_array_equal, state.params,
               jax.tree.map(np.asarray, variables['params']))


def test_timm_export_says_its_image_size_and_counts_bn_batches_to_the_step(
    v3_workdir, tmp_path, capsys):
  config, step, _ = export.restore_encoder(v3_workdir)
  path = export.export(v3_workdir, 'timm', str(tmp_path / 'vit.npz'), with_head=True)
  size = config.data.image_size
  grid = size // 8                                    # vit_cpu: patch 8
  assert (f'note: written for {size}x{size} images (pos_embed: a {grid}x{grid} grid of '
          f'8-pixel patches' in capsys.readouterr().err)
  with np.load(path) as data:
    assert data['pos_embed'].shape == (1, 1 + grid * grid, 128)
    counters = {k: int(v) for k, v in data.items() if k.endswith('num_batches_tracked')}
  assert counters and set(counters.values()) == {step}
