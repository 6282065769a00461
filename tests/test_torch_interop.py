"""PyTorch interop: torchvision and reference MoCo weights give the same outputs.

Runs only where torch and torchvision are installed (see docs/weights.md: a separate
.venv-torch keeps the main environment light).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='PyTorch interop needs torch')
torchvision = pytest.importorskip('torchvision',
                                  reason='PyTorch interop needs torchvision')

from moco_jax.weights import export, import_weights  # noqa: E402
from moco_jax.models import build_encoder, resnet  # noqa: E402

SIZE = 100  # odd feature-map sizes (50, 25, 13, 7, 4) exercise the padding
TOLERANCE = 1e-4


def torchvision_resnet(arch, seed):
  """A torchvision ResNet with random weights and BatchNorm statistics close
  to its activations' (features of order 1, as a trained network's)."""
  torch.manual_seed(seed)
  model = getattr(torchvision.models, arch)(weights=None)
  model.fc = torch.nn.Identity()
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for norm in norms:
    norm.momentum = 1.0  # running stats := the next batch's
  model.train()
  with torch.no_grad():
    model(torch.randn(4, 3, SIZE, SIZE))
    for norm in norms:
      c = norm.num_features
      norm.weight.uniform_(0.1, 0.5)
      norm.bias.normal_(0, 0.1)
      norm.running_mean.add_(0.1 * torch.randn(c))
      norm.running_var.mul_(torch.empty(c).uniform_(0.8, 1.25))
      norm.num_batches_tracked.fill_(3)
      norm.momentum = 0.1
  return model.eval()


def torch_features(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2))).numpy()


def images(n=2, seed=0):
  return np.random.default_rng(seed).standard_normal((n, SIZE, SIZE, 3)).astype(
      np.float32)


def abstract_variables(module):
  return jax.eval_shape(lambda: module.init(
      jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False))


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_torchvision_weights_give_the_same_features(arch, tmp_path):
  model = torchvision_resnet(arch, seed=1)
  path = str(tmp_path / f'{arch}.pth')
  torch.save(model.state_dict(), path)
  ours = resnet(arch)
  variables = import_weights.load_torch_weights(path, abstract_variables(ours))
  x = images()
  want = torch_features(model, x)
  got = np.asarray(ours.apply(variables, x, train=False))
  diff = np.abs(got - want).max()
  print(f'{arch} torchvision -> ours: max |diff| {diff:.2e} '
        f'(max |feature| {np.abs(want).max():.2f})')
  assert diff <= TOLERANCE


def randomised_flax_variables(module, seed):
  """Flax init, with BatchNorm params and statistics drawn at random."""
  rng = np.random.default_rng(seed)
  draw = {'scale': lambda s: rng.uniform(0.1, 0.5, s),
          'bias': lambda s: rng.normal(0, 0.1, s),
          'mean': lambda s: rng.normal(0, 0.1, s),
          'var': lambda s: rng.uniform(0.5, 2, s)}
  variables = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, SIZE, SIZE, 3)),
                          train=False)

  def randomise(path, x):
    name = path[-1].key
    return draw[name](x.shape).astype(np.float32) if name in draw else np.asarray(x)
  return jax.tree_util.tree_map_with_path(randomise, variables)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_exported_weights_load_strictly_into_torchvision(arch, tmp_path):
  config = ml_collections.ConfigDict(dict(
      arch=arch, width_multiplier=1, cifar_stem=False, head='mlp',
      head_hidden_dim=0, dim=128))
  encoder = build_encoder(config)
  variables = randomised_flax_variables(encoder, seed=2)
  path = str(tmp_path / 'backbone.pth')
  export.save_torchvision(path, export.torchvision_state_dict(variables, step=5))

  model = getattr(torchvision.models, arch)(weights=None)
  model.fc = torch.nn.Identity()
  state_dict = torch.load(path, weights_only=True)
  model.load_state_dict(state_dict, strict=True)
  assert state_dict['bn1.num_batches_tracked'].dtype == torch.int64
  x = images(seed=3)
  want = np.asarray(encoder.apply(variables, x, train=False,
                                  method=encoder.features))
  got = torch_features(model.eval(), x)
  diff = np.abs(got - want).max()
  print(f'{arch} ours -> torchvision: max |diff| {diff:.2e} '
        f'(max |feature| {np.abs(want).max():.2f})')
  assert diff <= TOLERANCE


def reference_moco_checkpoint(path, head, module_prefix):
  """A checkpoint as the reference main_moco.py saves it, from random weights."""
  encoders = []
  for seed in (4, 5):  # encoder_q, encoder_k
    model = torchvision_resnet('resnet18', seed)
    fc = torch.nn.Linear(512, 128)
    model.fc = (torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), fc)
                if head == 'mlp' else fc)
    encoders.append(model.eval())
  prefix = 'module.' if module_prefix else ''
  state_dict = {f'{prefix}encoder_{name}.{k}': v
                for name, model in zip('qk', encoders)
                for k, v in model.state_dict().items()}
  state_dict[f'{prefix}queue'] = torch.randn(128, 256)
  state_dict[f'{prefix}queue_ptr'] = torch.zeros(1, dtype=torch.long)
  optimizer = torch.optim.SGD(encoders[0].parameters(), lr=0.03, momentum=0.9)
  torch.save({'epoch': 200, 'arch': 'resnet18', 'state_dict': state_dict,
              'optimizer': optimizer.state_dict()}, path)
  return encoders[0]


@pytest.mark.parametrize('head,module_prefix', [('mlp', True), ('linear', False)])
def test_reference_moco_checkpoint_imports(head, module_prefix, tmp_path):
  path = str(tmp_path / 'checkpoint_0199.pth.tar')
  encoder_q = reference_moco_checkpoint(path, head, module_prefix)
  config = ml_collections.ConfigDict(dict(
      arch='resnet18', width_multiplier=1, cifar_stem=False, head=head,
      head_hidden_dim=0, dim=128))
  ours = build_encoder(config)
  variables = import_weights.load_weights(path, abstract_variables(ours))
  x = images(seed=6)
  want = torch_features(encoder_q, x)
  got = np.asarray(ours.apply(variables, x, train=False))
  diff = np.abs(got - want).max()
  print(f'reference MoCo ({head} head) -> ours: max |diff| {diff:.2e}')
  assert diff <= TOLERANCE
