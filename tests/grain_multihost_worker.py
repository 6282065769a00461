"""One process of test_grain_loader's two-process test.

  python tests/grain_multihost_worker.py --coordinator_address=127.0.0.1:PORT \
      --num_processes=2 --process_id=I --grain_dir=DIR --tfdata_dir=DIR \
      --batch=B --epochs=E --out=OUT

Joins the run, reads E epochs of this process's pretraining batches of the
twin dataset (test_grain_loader.build_twin, one label per example) with
Grain (array_record, --grain_dir) and with tf.data (TFRecord, --tfdata_dir),
and writes OUT/labels_I.npz: 'grain' and 'tfdata', (E, steps · B) labels in
the order read, and 'images_equal', whether both loaders gave the same images.

Does not import conftest (it would force 8 devices); each process has one.
"""
import argparse
import importlib.util
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(data_dir: str, loader: str):
  spec = importlib.util.spec_from_file_location(
      'smoke', os.path.join(REPO, 'configs', 'smoke.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dataset = 'twin_images'
  config.data.data_dir = data_dir
  config.data.image_size = 16
  config.data.loader = loader
  return config.data


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--coordinator_address', required=True)
  parser.add_argument('--num_processes', type=int, required=True)
  parser.add_argument('--process_id', type=int, required=True)
  parser.add_argument('--grain_dir', required=True)
  parser.add_argument('--tfdata_dir', required=True)
  parser.add_argument('--batch', type=int, required=True)
  parser.add_argument('--epochs', type=int, default=2)
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)

  from moco_jax.runtime import distributed
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import jax
  assert jax.process_count() == args.num_processes, jax.process_count()
  from moco_jax.data import grain_loader, pipeline

  grain = grain_loader.pretrain_batches(data_config(args.grain_dir, 'grain'), args.batch,
                                        seed=5, workers=0)
  tfdata = pipeline.pretrain_batches(data_config(args.tfdata_dir, 'tf.data'), args.batch,
                                     seed=5)
  assert grain.steps_per_epoch == tfdata.steps_per_epoch
  labels = {'grain': [], 'tfdata': []}
  images_equal = True
  for _ in range(args.epochs * grain.steps_per_epoch):
    a, b = next(grain), next(tfdata)
    labels['grain'].append(a['label'])
    labels['tfdata'].append(b['label'])
    images_equal &= all(np.array_equal(a[key], b[key]) for key in ('images_q', 'images_k'))
  np.savez(os.path.join(args.out, f'labels_{jax.process_index()}.npz'),
           images_equal=images_equal,
           **{key: np.concatenate(value).reshape(args.epochs, -1)
              for key, value in labels.items()})


if __name__ == '__main__':
  main()
