"""The first run: the CIFAR-10 demo on a GPU/TPU, the CPU recipe on a CPU (says which).

On an accelerator: configs/moco_v2_r18_cifar10.py (ResNet-18, 200 epochs,
82.6% kNN in the reference; bfloat16 on TPUs and on GPUs with bfloat16 tensor
cores). On a CPU: configs/cifar10_cpu.py (ResNet-18 at width x0.125, 1170
steps, about 20 minutes on 2 quiet cores; kNN rises from about 28% by 15
points or more).
Prints one line saying which and why. It asks JAX for the devices while the
command line is read, so it is for one host (not --distributed).

python -m moco_jax.main --config=configs/quickstart.py --workdir=runs/quickstart \
    --config.data.data_dir=../shared/tfds
"""
import jax

from moco_jax.config import recipes


def _bfloat16(device) -> bool:
  if device.platform == 'tpu':
    return True
  capability = str(getattr(device, 'compute_capability', '') or '')
  return capability.replace('.', '', 1).isdigit() and float(capability) >= 8.0


def get_config():
  devices = jax.devices()
  device, count = devices[0], len(devices)
  found = f'{count} {device.platform.upper()} device{"s" if count > 1 else ""} ({device.device_kind})'
  if device.platform == 'cpu':
    config = recipes.cifar10_cpu()
    why = ('configs/cifar10_cpu.py, ResNet-18 x0.125 for 1170 steps (about 20 min on '
           '2 cores; the full demo would take weeks on a CPU)')
  else:
    config = recipes.cifar10_demo()
    if _bfloat16(device):
      config.dtype = 'bfloat16'
    why = (f'configs/moco_v2_r18_cifar10.py, the CIFAR-10 demo (ResNet-18, 200 epochs, '
           f'{config.dtype})')
  print(f'quickstart: found {found}: running {why}', flush=True)
  return config
