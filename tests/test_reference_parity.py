"""Step-for-step parity with a PyTorch transcription of MoCo (skipped without torch).

The PyTorch side is written here from the paper's Algorithm 1 (arXiv:1911.05722)
and the reference's documented behaviour (../shared/RECIPES.md), not from our
code: torchvision BasicBlocks (a two-stage CIFAR-stem ResNet, 16 and 32
channels, so it runs in seconds), SGD with momentum 0.9 and weight decay on
every parameter, the EMA of parameters only (f_k keeps its own BN statistics),
shuffle BN over contiguous groups of the batch with running statistics
averaged over the groups (SplitBatchNorm), the queue as it was before the
step, enqueue last. Symmetric: L(q1, k2) + L(q2, k1), then [k1, k2] enqueued.

Both sides start from the same weights (torch's init, read by
import_weights), the same queue, the same uint8 views (colour augmentation
off: data.augment='none'), and the torch side uses our step's shuffle
permutations (train_step.shuffle_permutations). After 3 steps the losses,
f_q's and f_k's parameters and BN statistics, the queue and queue_ptr agree
to float32 tolerance.

  .venv-torch/bin/python -m pytest -q -s tests/test_reference_parity.py
"""
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models.resnet import BasicBlock  # noqa: E402

from moco_jax import optim  # noqa: E402
from moco_jax.augment.normalization import MEAN_STD  # noqa: E402
from moco_jax.models import Encoder, ProjectionHead, ResNet  # noqa: E402
from moco_jax.state import create_state  # noqa: E402
from moco_jax.train_step import make_train_step, shuffle_permutations  # noqa: E402
from moco_jax.weights import convert, import_weights  # noqa: E402

BATCH, SIZE, GROUPS, DIM, HIDDEN, STEPS = 16, 16, 4, 16, 32, 3
MOMENTUM, TEMPERATURE, LR, WEIGHT_DECAY = 0.99, 0.2, 0.1, 5e-4


class SplitBN(nn.BatchNorm2d):
  """Training: BN statistics per contiguous group of N/groups samples (one
  GPU each in the reference); the running statistics are the mean of the
  groups' updates. Evaluation: plain BN."""

  def __init__(self, channels, groups=GROUPS):
    super().__init__(channels)
    self.groups = groups

  def forward(self, x):
    if not self.training:
      return super().forward(x)
    outputs, means, variances = [], [], []
    for chunk in x.chunk(self.groups):
      mean, var = self.running_mean.clone(), self.running_var.clone()
      outputs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True,
                                  self.momentum, self.eps))
      means.append(mean)
      variances.append(var)
    with torch.no_grad():
      self.running_mean.copy_(torch.stack(means).mean(0))
      self.running_var.copy_(torch.stack(variances).mean(0))
    return torch.cat(outputs)


class TorchEncoder(nn.Module):
  """conv1 3×3 stride 1 (CIFAR stem, no max-pool), layer1 = BasicBlock(16),
  layer2 = BasicBlock(16→32, stride 2, 1×1 downsample), pool, fc = MLP."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = SplitBN(16)
    self.relu = nn.ReLU(inplace=True)
    self.layer1 = nn.Sequential(BasicBlock(16, 16, norm_layer=SplitBN))
    downsample = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), SplitBN(32))
    self.layer2 = nn.Sequential(BasicBlock(16, 32, 2, downsample, norm_layer=SplitBN))
    self.fc = nn.Sequential(nn.Linear(32, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, DIM))

  def forward(self, x):
    x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
    return self.fc(x.mean((2, 3)))


class TorchMoCo:
  """Algorithm 1 with shuffle BN; the permutations are given."""

  def __init__(self, queue):
    self.f_q = TorchEncoder()
    self.f_k = TorchEncoder()
    self.f_k.load_state_dict(self.f_q.state_dict())
    for p in self.f_k.parameters():
      p.requires_grad = False
    self.queue = torch.tensor(np.asarray(queue))
    self.ptr = 0
    self.optimizer = torch.optim.SGD(self.f_q.parameters(), lr=LR, momentum=0.9,
                                     weight_decay=WEIGHT_DECAY)

  def keys(self, x, permutation):
    with torch.no_grad():
      k = F.normalize(self.f_k(x[permutation]), dim=1)
      return k[torch.argsort(permutation)]

  def loss(self, x_q, k):
    q = F.normalize(self.f_q(x_q), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], 1) / TEMPERATURE
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

  def step(self, x1, x2, permutations, symmetric):
    with torch.no_grad():  # θ_k ← m θ_k + (1 − m) θ_q, parameters only
      for k, q in zip(self.f_k.parameters(), self.f_q.parameters()):
        k.mul_(MOMENTUM).add_(q, alpha=1 - MOMENTUM)
    k2 = self.keys(x2, permutations[0])
    loss = self.loss(x1, k2)
    enqueue = [k2]
    if symmetric:
      k1 = self.keys(x1, permutations[1])
      loss = loss + self.loss(x2, k1)
      enqueue = [k1, k2]
    self.optimizer.zero_grad()
    loss.backward()
    self.optimizer.step()
    keys = torch.cat(enqueue)
    self.queue[self.ptr:self.ptr + len(keys)] = keys
    self.ptr = (self.ptr + len(keys)) % len(self.queue)
    return float(loss.detach())


def ours(symmetric):
  """(encoder, step, state) on one device with GROUPS BN groups."""
  mesh = Mesh(jax.devices()[:1], ('data',))
  backbone = ResNet(stage_sizes=(1, 1), block='basic', width_multiplier=0.25,
                    cifar_stem=True, bn_groups=GROUPS, conv_impl='xla')
  encoder = Encoder(backbone=backbone, head=ProjectionHead('mlp', DIM, HIDDEN))
  optim_config = ml_collections.ConfigDict(dict(
      name='sgd', base_lr=LR * 256 / BATCH, momentum=0.9, weight_decay=WEIGHT_DECAY,
      schedule='constant', warmup_epochs=0, lr_drop_epochs=()))
  schedule = optim.learning_rate_schedule(optim_config, BATCH, 10, 10)
  optimizer = optim.build_optimizer(optim_config, schedule)
  moco_config = ml_collections.ConfigDict(dict(
      momentum=MOMENTUM, temperature=TEMPERATURE, shuffle_bn=True, symmetric=symmetric))
  mean, std = MEAN_STD['cifar10']
  step = make_train_step(mesh, encoder=encoder, optimizer=optimizer, schedule=schedule,
                         moco_config=moco_config,
                         augment_config=dict(recipe='none', mean=mean, std=std))
  queue_size = 4 * BATCH * (2 if symmetric else 1)
  state = create_state(encoder, optimizer, jax.random.PRNGKey(1), SIZE, queue_size,
                       DIM, GROUPS)
  return step, jax.device_put(state, NamedSharding(mesh, P()))


def torch_images(images):
  """uint8 (N, H, W, 3) -> normalised float32 (N, 3, H, W), computed by torch."""
  mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in MEAN_STD['cifar10'])
  x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
  return (x - mean) / std


def as_torch_names(params, batch_stats):
  """Our encoder variables -> {torchvision name: array}."""
  flat = convert.to_torchvision({'params': params['backbone'],
                                 'batch_stats': batch_stats['backbone']})
  flat.update(convert.to_torchvision({'params': params['head']}))
  return {k: v for k, v in flat.items() if not k.endswith('num_batches_tracked')}


def max_difference(ours_flat, module):
  theirs = module.state_dict()
  assert set(ours_flat) == {k for k in theirs if not k.endswith('num_batches_tracked')}
  return max(float(np.abs(ours_flat[k] - theirs[k].numpy()).max()) for k in ours_flat)


@pytest.mark.parametrize('symmetric', [False, True], ids=['asymmetric', 'symmetric'])
def test_three_steps_match_a_pytorch_transcription(symmetric, tmp_path):
  torch.manual_seed(0)
  step, state = ours(symmetric)
  reference = TorchMoCo(np.asarray(state.queue))
  path = str(tmp_path / 'init.pth')
  torch.save(reference.f_q.state_dict(), path)
  variables = import_weights.load_weights(
      path, {'params': state.params, 'batch_stats': state.batch_stats})
  state = import_weights.init_state_from(state, variables)
  initial = as_torch_names(*jax.device_get((state.params, state.batch_stats)))
  assert max_difference(initial, reference.f_q) == 0

  views = np.random.default_rng(0).integers(0, 256, (STEPS, 2, BATCH, SIZE, SIZE, 3),
                                            dtype=np.uint8)
  losses = []
  for images_1, images_2 in views:
    permutations = [torch.from_numpy(np.asarray(p, np.int64)) for p in shuffle_permutations(
        state.rng, int(state.step), BATCH, 2 if symmetric else 1)]
    state, metrics = step(state, images_1, images_2)
    losses.append((float(metrics['loss']), reference.step(
        torch_images(images_1), torch_images(images_2), permutations, symmetric)))
  state = jax.device_get(state)

  ours_q = as_torch_names(state.params, state.batch_stats)
  ours_k = as_torch_names(state.target_params, state.target_batch_stats)
  differences = {
      'loss': max(abs(a - b) for a, b in losses),
      'f_q': max_difference(ours_q, reference.f_q),
      'f_k': max_difference(ours_k, reference.f_k),
      'queue': float(np.abs(state.queue - reference.queue.numpy()).max()),
  }
  moved = max(float(np.abs(ours_q[k] - initial[k]).max()) for k in initial)
  print(f'\n{"symmetric" if symmetric else "asymmetric"}: losses (ours, torch) '
        f'{[(round(a, 5), round(b, 5)) for a, b in losses]}; largest |ours - torch|: '
        + ', '.join(f'{k} {v:.1e}' for k, v in differences.items())
        + f'; largest change of f_q over the 3 steps {moved:.2e}')
  assert moved > 1e-2                          # the steps did change the weights
  assert differences['loss'] < 1e-4
  assert differences['f_q'] < 1e-4 and differences['f_k'] < 1e-4
  assert differences['queue'] < 1e-5
  assert int(state.queue_ptr) == reference.ptr == (
      STEPS * BATCH * (2 if symmetric else 1)) % len(state.queue)
