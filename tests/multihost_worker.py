"""One process of the multi-process test in test_multihost.py, or its reference.

  python tests/multihost_worker.py --coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=I --data_dir=TFDS_DIR --out=DIR
  python tests/multihost_worker.py --data_dir=TFDS_DIR --out=DIR   # one process

Joins the run (when --coordinator_address is given), trains the smoke
config's MoCo step for `--steps` steps on a synthetic global batch drawn from
`--seed` (each process feeds only the rows its devices hold), and writes
DIR/metrics_I.json (per-step metrics) and DIR/state_I.npz (the replicated
final state, one array per leaf), I the process index.

Deliberately does not import conftest: that would force 8 devices on every
process; the test gives each child its device count through XLA_FLAGS.
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ('loss', 'instance_top1', 'instance_top5', 'grad_norm', 'lr', 'queue_ptr')
_START = time.perf_counter()


def log(message: str) -> None:
  """A timestamped progress line on stderr (the test shows it on failure)."""
  print(f'[{time.perf_counter() - _START:6.1f} s] {message}', file=sys.stderr,
        flush=True)


def worker_config(data_dir: str):
  """configs/smoke.py (global batch 16) on the tests' tiny TFDS dataset."""
  spec = importlib.util.spec_from_file_location(
      'smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dataset = 'tiny_images'  # conftest.TINY_DATASET
  config.data.data_dir = data_dir
  config.moco.shuffle_bn = True
  # One BN group of two images per device (one image per group would let BN
  # turn rounding noise into signal).
  config.moco.bn_groups = 8
  return config


def synthetic_batches(config, num_steps: int, seed: int) -> np.ndarray:
  """(num_steps, 2, B, S, S, 3) uint8 global batches of both views (B the
  global batch, S the image size), the same on every process: random images
  and their mirror images as the key view."""
  size = config.data.image_size
  shape = (num_steps, config.train.batch_size, size, size, 3)
  images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
  return np.stack([images, images[:, :, :, ::-1]], axis=1)


def local_rows(sharding, global_shape) -> slice:
  """The contiguous rows of a global batch that this process's devices hold."""
  slices = [index[0] for index in
            sharding.addressable_devices_indices_map(global_shape).values()]
  start, stop = min(s.start or 0 for s in slices), max(s.stop for s in slices)
  held = sum(s.stop - (s.start or 0) for s in slices)
  assert held == stop - start, f'rows of this process are not contiguous: {slices}'
  return slice(start, stop)


def host_value(array) -> np.ndarray:
  """A replicated (possibly multi-process) array as numpy, from a local copy."""
  return np.asarray(array.addressable_data(0))


def run_steps(config, images: np.ndarray):
  """Trains from config.seed's initial state, one step per batch of `images`
  ((steps, 2, B, S, S, 3) uint8 from synthetic_batches).

  Returns:
    ({metric name: [value per step]}, {leaf path: final state array}).
  """
  import jax
  from moco_jax.experiment import Experiment
  experiment = Experiment(config)
  rows = local_rows(experiment.batch_sharding, images.shape[2:])
  state = experiment.init_state()
  log(f'state initialised; feeding rows {rows.start}:{rows.stop} of each batch')
  step = experiment.train_step()
  history = {name: [] for name in METRICS}
  for index, (images_q, images_k) in enumerate(images):
    state, metrics = step(state, experiment.to_global(images_q[rows]),
                          experiment.to_global(images_k[rows]))
    for name in METRICS:
      history[name].append(host_value(metrics[name]).item())
    log(f'step {index + 1}: loss {history["loss"][-1]:.6f}')
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  return history, {jax.tree_util.keystr(path): host_value(leaf)
                   for path, leaf in leaves}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--coordinator_address')
  parser.add_argument('--num_processes', type=int)
  parser.add_argument('--process_id', type=int)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  from moco_jax.runtime import distributed
  distributed.initialize(args.coordinator_address, args.num_processes,
                         args.process_id)
  import jax
  assert jax.process_count() == (args.num_processes or 1), jax.process_count()
  log(f'process {jax.process_index()} of {jax.process_count()}: '
      f'{jax.local_device_count()} of {jax.device_count()} devices')
  config = worker_config(args.data_dir)
  history, state = run_steps(config, synthetic_batches(config, args.steps, args.seed))
  index = jax.process_index()
  with open(os.path.join(args.out, f'metrics_{index}.json'), 'w') as f:
    json.dump({'devices': jax.device_count(),
               'local_devices': jax.local_device_count(), **history}, f)
  np.savez(os.path.join(args.out, f'state_{index}.npz'), **state)


if __name__ == '__main__':
  main()
