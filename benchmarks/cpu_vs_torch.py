"""Our MoCo v2 CIFAR step against an equivalent PyTorch step, on this CPU.

Both run in one process, alternating step by step so that they see the same
machine load, with the same number of threads (2 by default):

  ours   moco_jax.train_step on configs/moco_v2_r18_cifar10.py with the MLP
         head, conv_impl 'auto', 8 BN groups, K 4096, images already on the
         device as uint8 (augment 'none' by default: normalisation only, since
         the torch step gets ready-made float tensors; --augment=cifar times
         the real on-device colour augmentation too).
  torch  torchvision's BasicBlock ResNet-18 with a 3×3 stride-1 stem and no
         max-pool, the same width, MLP head, SplitBatchNorm with the same 8
         groups (the reference CIFAR demo's), query forward + backward, key
         forward under no_grad with shuffle BN, momentum update, queue matmul,
         SGD (lr 0.06, momentum 0.9, wd 5e-4), enqueue. NCHW float32.

Prints one JSON object (medians over --steps steps after --warmup steps) and
writes it to --json. Needs torch/torchvision (.venv-torch):

  .venv-torch/bin/python benchmarks/cpu_vs_torch.py --json=out.json \
      --batch 128 --width 0.25
"""
import argparse
import importlib.util
import os
import pathlib
import statistics
import sys
import time

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
  from torchvision.models.resnet import BasicBlock
except ImportError as error:
  print(f'cpu_vs_torch needs torch and torchvision ({error}); run it with '
        '.venv-torch/bin/python', file=sys.stderr)
  sys.exit(2)

import jax
import numpy as np

from moco_jax.runtime.mesh import make_mesh
import report  # benchmarks/ is on sys.path when run as a script
import step_throughput

CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs/moco_v2_r18_cifar10.py'


class SplitBatchNorm(nn.BatchNorm2d):
  """BN with statistics per group of N/S samples (the reference CIFAR demo's)."""

  def __init__(self, channels, num_splits):
    super().__init__(channels)
    self.num_splits = num_splits

  def forward(self, x):
    n, c, h, w = x.shape
    if not self.training:
      return super().forward(x)
    s = self.num_splits
    mean = self.running_mean.repeat(s)
    var = self.running_var.repeat(s)
    y = F.batch_norm(x.view(-1, c * s, h, w), mean, var,
                     self.weight.repeat(s), self.bias.repeat(s), True,
                     self.momentum, self.eps).view(n, c, h, w)
    self.running_mean.copy_(mean.view(s, c).mean(0))
    self.running_var.copy_(var.view(s, c).mean(0))
    return y


def torch_encoder(width, bn_splits, dim=128):
  """CIFAR ResNet-18 (torchvision BasicBlocks) at `width` + MoCo v2 MLP head."""
  norm = lambda c: SplitBatchNorm(c, bn_splits)
  base = int(64 * width)
  layers = [nn.Conv2d(3, base, 3, 1, 1, bias=False), norm(base), nn.ReLU()]
  inplanes = base
  for stage in range(4):
    planes = base * 2**stage
    for index in range(2):
      stride = 2 if stage > 0 and index == 0 else 1
      downsample = None
      if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False), norm(planes))
      layers.append(BasicBlock(inplanes, planes, stride, downsample,
                               norm_layer=norm))
      inplanes = planes
  layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
             nn.Linear(inplanes, inplanes), nn.ReLU(), nn.Linear(inplanes, dim)]
  return nn.Sequential(*layers)


class TorchMoCo:
  """The MoCo v2 step of the reference implementation, on one CPU process."""

  def __init__(self, width, bn_splits, queue_size, momentum=0.99,
               temperature=0.1, lr=0.06):
    torch.manual_seed(0)
    self.f_q = torch_encoder(width, bn_splits)
    self.f_k = torch_encoder(width, bn_splits)
    self.f_k.load_state_dict(self.f_q.state_dict())
    for p in self.f_k.parameters():
      p.requires_grad = False
    self.queue = F.normalize(torch.randn(128, queue_size), dim=0)
    self.ptr, self.m, self.t = 0, momentum, temperature
    self.opt = torch.optim.SGD(self.f_q.parameters(), lr=lr, momentum=0.9,
                               weight_decay=5e-4)

  def step(self, x_q, x_k):
    q = F.normalize(self.f_q(x_q), dim=1)
    with torch.no_grad():
      for p_k, p_q in zip(self.f_k.parameters(), self.f_q.parameters()):
        p_k.mul_(self.m).add_(p_q.detach(), alpha=1 - self.m)
      shuffle = torch.randperm(x_k.shape[0])
      k = F.normalize(self.f_k(x_k[shuffle]), dim=1)[torch.argsort(shuffle)]
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ self.queue.clone().detach()
    logits = torch.cat([l_pos, l_neg], dim=1) / self.t
    labels = torch.zeros(logits.shape[0], dtype=torch.long)
    loss = F.cross_entropy(logits, labels)
    self.opt.zero_grad()
    loss.backward()
    self.opt.step()
    with torch.no_grad():
      n = k.shape[0]
      self.queue[:, self.ptr:self.ptr + n] = k.T
      self.ptr = (self.ptr + n) % self.queue.shape[1]
    return loss.item()


def ours_config(args):
  spec = importlib.util.spec_from_file_location('recipe', CONFIG)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  c = recipe.get_config()
  c.model.head = 'mlp'
  c.model.width_multiplier = args.width
  c.model.conv_impl = 'auto'
  c.moco.bn_groups = 8             # one device: 8 groups, as the torch SplitBN 8
  c.moco.queue_size = 4096
  c.data.augment = args.augment
  c.train.batch_size = args.batch
  return c


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--json')
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--width', type=float, default=1.0)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--augment', default='none',
                      help="our on-device colour augmentation ('none', 'cifar')")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)

  config = ours_config(args)
  ours, _ = step_throughput.build_moco(config, make_mesh(jax.devices()[:1]))
  theirs = TorchMoCo(args.width, 8, 4096)
  rng = np.random.default_rng(0)
  x_q, x_k = (torch.from_numpy(rng.standard_normal(
      (args.batch, 3, 32, 32), np.float32)) for _ in range(2))

  load_before = os.getloadavg()[0]
  torch_times = []
  for i in range(args.warmup + args.steps):
    ours.run(timed=i >= args.warmup)
    start = time.perf_counter()
    theirs.step(x_q, x_k)
    if i >= args.warmup:
      torch_times.append(time.perf_counter() - start)

  torch_ms = 1e3 * statistics.median(torch_times)
  result = dict(
      ours_step_ms=ours.median_ms, torch_step_ms=torch_ms,
      ratio=ours.median_ms / torch_ms, batch=args.batch, width=args.width,
      ours_augment=args.augment, ours_compile_s=ours.compile_s,
      ours_step_ms_min=1e3 * min(ours.times),
      torch_step_ms_min=1e3 * min(torch_times),
      loadavg_1min=[round(load_before, 2), round(os.getloadavg()[0], 2)],
      ours_step_ms_all=[round(1e3 * t, 1) for t in ours.times],
      torch_step_ms_all=[round(1e3 * t, 1) for t in torch_times],
      threads=args.threads, torch_version=torch.__version__,
      jax_version=jax.__version__, steps=args.steps, warmup=args.warmup,
      torch_bn='SplitBatchNorm, 8 groups', torch_layout='NCHW float32')
  report.emit_json(result, args.json)


if __name__ == '__main__':
  main()
