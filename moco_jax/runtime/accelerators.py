"""Accelerator facts and deviceless TPU topologies (no MoCo knowledge here).

The slices a user books, by their usual names (`v4-32`, `v5e-256`,
`v5p-8`, `v6e-16`, also `v5litepod-16`), mapped to the topology libtpu
compiles for, chips per host, HBM per chip, peak bf16 FLOP/s, HBM and
inter-chip bandwidth, each from Google's Cloud TPU documentation:
  v4:  https://cloud.google.com/tpu/docs/v4   (275 TFLOP/s, 32 GiB at 1200 GB/s;
       all-reduce bandwidth 1.1 PB/s over the 4096-chip pod: 268 GB/s per chip;
       v4-N counts TensorCores, 2 per chip; 4 chips per host)
  v5e: https://cloud.google.com/tpu/docs/v5e  (197 TFLOP/s, 16 GiB at 819 GB/s;
       all-reduce 51.2 TB/s over 256 chips: 200 GB/s per chip; v5litepod-N
       counts chips; up to 8 chips on one host, 4 per host beyond)
  v5p: https://cloud.google.com/tpu/docs/v5p  (459 TFLOP/s, 95 GiB at 2765 GB/s;
       inter-chip 4800 Gbps = 600 GB/s; v5p-N counts TensorCores, 2 per chip;
       4 chips per host)
  v6e: https://cloud.google.com/tpu/docs/v6e  (918 TFLOP/s, 32 GiB at 1638 GB/s;
       all-reduce 102.4 TB/s over 256 chips: 400 GB/s per chip; up to 8 chips
       on one host, 4 per host beyond)
GPUs (peak dense bf16; NVIDIA's data sheets): H100 SXM 989 TFLOP/s, 80 GB at
3.35 TB/s; H200 989 TFLOP/s, 141 GB at 4.8 TB/s; NVLink 900 GB/s both ways
(450 GB/s each way). `h100-8` compiles deviceless with jax-cuda12-plugin
(memory and collectives; XLA gives no FLOP count without a GPU).

libtpu compiles on an ordinary CPU machine: `get_topology_desc` describes a
slice and jit(...).lower(...).compile() runs the real TPU compiler. Nothing
here touches the TPU backend unless `topology_devices` is called, so a CPU
run with libtpu installed is unchanged.
"""
import dataclasses
import importlib.util
import os
import re

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip's published numbers."""
  generation: str          # 'v4', 'v5e', 'v5p', 'v6e', 'h100', 'h200'
  hbm_bytes: int           # memory per chip
  peak_flops: float        # dense bf16 FLOP/s per chip
  hbm_bandwidth: float     # bytes/s
  ici_bandwidth: float     # bytes/s per chip for collectives (see module doc)
  cores_per_chip: int      # what the slice name counts per chip (v4, v5p: 2)
  source: str


CHIPS = {
    'v4': Chip('v4', 32 * GiB, 275e12, 1200e9, 1.1e15 / 4096, 2,
               'https://cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('v5e', 16 * GiB, 197e12, 819e9, 51.2e12 / 256, 1,
                'https://cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('v5p', 95 * GiB, 459e12, 2765e9, 4800e9 / 8, 2,
                'https://cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('v6e', 32 * GiB, 918e12, 1638e9, 102.4e12 / 256, 1,
                'https://cloud.google.com/tpu/docs/v6e'),
    'h100': Chip('h100', 80 * 10**9, 989e12, 3.35e12, 450e9, 1,
                 'https://www.nvidia.com/en-us/data-center/h100/'),
    'h200': Chip('h200', 141 * 10**9, 989e12, 4.8e12, 450e9, 1,
                 'https://www.nvidia.com/en-us/data-center/h200/'),
}
# jax's device_kind of a real device -> CHIPS key (the MFU of a real run).
DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5e': 'v5e', 'TPU v5p': 'v5p',
                'TPU v5': 'v5p', 'TPU v6 lite': 'v6e', 'TPU v6e': 'v6e',
                'NVIDIA H100 80GB HBM3': 'h100', 'NVIDIA H100': 'h100',
                'NVIDIA H200': 'h200'}
_ALIASES = {'v5litepod': 'v5e'}
_3D = ('v4', 'v5p')
INSTALL_LIBTPU = 'pip install "jax[tpu]==<your jax version>" (or pip install -e ".[tpu]")'


class TopologyError(ValueError):
  """An unknown slice name, or libtpu missing."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: `name` as booked, `topology` as libtpu names it."""
  name: str                 # 'v4-32'
  chip: Chip
  chips: int                # 16
  shape: tuple              # (2, 2, 4)
  hosts: int

  @property
  def topology(self) -> str:
    if self.chip.generation in GPUS:
      return 'x'.join(map(str, self.shape))   # slices x hosts x GPUs
    return f'{self.chip.generation}:{"x".join(map(str, self.shape))}'

  @property
  def chips_per_host_bounds(self) -> tuple:
    """The chips of one host as a 3-D box: (2, 2, 1) (4 chips) on multi-host
    slices, the whole slice on one host."""
    if self.hosts > 1:
      return (2, 2, 1)
    return tuple(self.shape) + (1,) * (3 - len(self.shape))


_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


def _shape(generation: str, chips: int):
  """The slice shape of `chips` chips (Google's standard slice shapes), or None."""
  return (_SHAPES_3D if generation in _3D else _SHAPES_2D).get(chips)


# XLA's GPU description of a chip, for compiling without one (a
# GpuTargetConfigProto, text format): NVIDIA's published H100 SXM / H200
# numbers (132 SMs of compute capability 9.0, 228 KiB shared memory per SM).
_GPU_TARGET = '''gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {memory} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 1 }}
device_description_str: "{name}"
'''
_GPU_NAMES = {'h100': 'NVIDIA H100 80GB HBM3', 'h200': 'NVIDIA H200'}
GPUS = tuple(_GPU_NAMES)
INSTALL_CUDA_PLUGIN = 'pip install "jax-cuda12-plugin==<your jax version>" "jax-cuda12-pjrt==<your jax version>"'


def known_slices() -> str:
  return ('v4-8, v4-16, v4-32 … v4-8192 and v5p-8 … v5p-8192 (TensorCores, 2 per chip); '
          'v5e-1, v5e-4, v5e-8 … v5e-256 (or v5litepod-N) and v6e-1 … v6e-256 (chips); '
          'h100-1 … h100-8, h200-1 … h200-8')


def parse_slice(name: str) -> Slice:
  """'v4-32' -> Slice(v4, 16 chips, (2, 2, 4), 4 hosts); TopologyError if unknown."""
  gpu = re.fullmatch(r'(h100|h200)(?:-(\d+))?', name.strip().lower())
  if gpu:   # one host of 1-8 GPUs
    count = int(gpu.group(2) or 1)
    if not 1 <= count <= 8:
      raise TopologyError(f'--topology={name!r}: 1 to 8 GPUs of one host (h100-8)')
    return Slice(name, CHIPS[gpu.group(1)], count, (1, 1, count), 1)
  match = re.fullmatch(r'(v4|v5e|v5p|v6e|v5litepod)-(\d+)', name.strip().lower())
  if not match:
    raise TopologyError(f'--topology={name!r} is not a TPU slice name; valid: '
                        f'{known_slices()}')
  generation = _ALIASES.get(match.group(1), match.group(1))
  chip = CHIPS[generation]
  count = int(match.group(2))
  chips = count // chip.cores_per_chip
  shape = _shape(generation, chips) if count % chip.cores_per_chip == 0 else None
  if shape is None:
    raise TopologyError(f'--topology={name!r}: no {generation} slice of {count} '
                        f'{"TensorCores" if chip.cores_per_chip > 1 else "chips"}; '
                        f'valid: {known_slices()}')
  per_host = 4 if (generation in _3D or chips > 8) else chips
  return Slice(name, chip, chips, shape, max(1, chips // per_host))


def chip_of_device_kind(kind: str) -> Chip | None:
  """The Chip of a real device's `device_kind` ('TPU v4', …), or None."""
  for prefix, key in sorted(DEVICE_KINDS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return CHIPS[key]
  return None


def libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def cuda_plugin_installed() -> bool:
  return (importlib.util.find_spec('jax_plugins') is not None
          and importlib.util.find_spec('jax_plugins.xla_cuda12') is not None)


def topology_devices(tpu_slice: Slice):
  """The slice's devices, compiled for by libtpu on this (CPU) machine.

  JAX's own backend stays the CPU: call this before anything initialises
  JAX's backends, or with JAX_PLATFORMS=cpu already set.

  Raises:
    TopologyError: libtpu is not installed (the message says how to install).
  """
  if tpu_slice.chip.generation in GPUS:
    return _gpu_devices(tpu_slice)
  if not libtpu_installed():
    raise TopologyError(f'the plan compiles for TPUs with libtpu, which is not '
                        f'installed: {INSTALL_LIBTPU}')
  # No metadata server, no TPU here: libtpu only describes the slice. Without
  # these it prints warnings about the missing TPU VM environment.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_HOST_BOUNDS', '1,1,1')
  # Compiling needs no exclusive TPU: let several processes (test workers,
  # plans) load libtpu at once instead of failing on /tmp/libtpu_lockfile.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  import jax
  if not jax.config.jax_platforms:   # JAX's own backend stays the CPU
    jax.config.update('jax_platforms', 'cpu')
  from jax.experimental import topologies
  # v4 and v5p: one JAX device per chip (both TensorCores, "megacore"), as
  # on the real slice.
  chip_config = 'megacore' if tpu_slice.chip.cores_per_chip > 1 else 'default'
  description = topologies.get_topology_desc(
      platform='tpu', topology_name=tpu_slice.topology, chip_config_name=chip_config,
      chips_per_host_bounds=tpu_slice.chips_per_host_bounds, num_slices=1)
  devices = list(description.devices)
  if len(devices) != tpu_slice.chips:
    raise TopologyError(f'libtpu describes {tpu_slice.topology} as {len(devices)} '
                        f'devices, expected {tpu_slice.chips} chips')
  return devices


def _gpu_devices(gpus: Slice):
  """Deviceless GPUs (jax-cuda12-plugin, no GPU needed): XLA compiles for the
  described chip. Its compiled programs report memory but no cost analysis."""
  if not cuda_plugin_installed():
    raise TopologyError(f'the plan compiles for GPUs with the CUDA plugin, which is '
                        f'not installed: {INSTALL_CUDA_PLUGIN}')
  import jax
  if not jax.config.jax_platforms:
    jax.config.update('jax_platforms', 'cpu')
  from jax.experimental import topologies
  chip = gpus.chip
  target = _GPU_TARGET.format(bandwidth=int(chip.hbm_bandwidth), memory=chip.hbm_bytes,
                              name=_GPU_NAMES[chip.generation])
  description = topologies.get_topology_desc(
      platform='cuda', topology_name=gpus.topology, target_config=target,
      topology=gpus.topology)
  return list(description.devices)
