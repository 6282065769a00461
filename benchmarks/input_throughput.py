"""Images per second of the host input pipeline (two views per image).

Times moco_jax.data.pipeline.pretrain_batches (read, decode, two random-
resized crops + flips, batching; tf.data with AUTOTUNE on every core) in two
settings, in one run:

  dataset      the config's own data section (e.g. CIFAR-10 from TFDS).
  folder_jpeg  an ImageNet-like folder of JPEGs it writes once (--folder_images
               images of 500x375, quality 90, two classes) at image_size 224,
               crop scale (0.2, 1), decoded whole once per image (the
               default) and decoded only inside each crop window
               (decode_and_crop_jpeg, data.fused_jpeg_crop), alternating;
               for MoCo's two views and for linear evaluation's one view
               (labelled_batches, keys folder_jpeg_one_view_*).

Each figure is the median over --repeats timed passes of --steps batches,
after one untimed warm-up pass. "Per core" divides by the cores tf.data had
(os.sched_getaffinity). Prints one JSON object (throughput keys end in
_per_sec) and writes it to --json.

  python benchmarks/input_throughput.py --config=configs/moco_v2_r18_cifar10.py \
      --config.data.data_dir=../shared/tfds --json=input.json
"""
import os
import statistics
import sys
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
from absl import app, flags
from ml_collections import config_flags

import report  # benchmarks/ is on sys.path when run as a script

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=False)
flags.DEFINE_integer('steps', 20, 'Batches per timed pass.')
flags.DEFINE_integer('repeats', 3, 'Timed passes per setting (median reported).')
flags.DEFINE_integer('batch', 128, 'Images per batch (this process).')
flags.DEFINE_integer('folder_images', 512, 'JPEGs in the generated folder.')
flags.DEFINE_string('folder_dir', None, 'Where to write (or reuse) the JPEG '
                    'folder; default: a temporary directory.')
flags.DEFINE_string('json', None, 'Also write the JSON result to this file.')
flags.mark_flags_as_required(['config'])


def write_jpeg_folder(root: str, count: int, seed: int = 0) -> str:
  """`count` 500x375 JPEGs with photo-like content (smooth colour fields plus
  noise; about 60 KB each at quality 90) in root/{a,b}/. Reuses a complete
  folder."""
  import tensorflow as tf
  paths = [os.path.join(root, 'ab'[i % 2], f'{i:06d}.jpg') for i in range(count)]
  if all(os.path.exists(p) for p in paths):
    return root
  rng = np.random.default_rng(seed)
  for directory in ('a', 'b'):
    os.makedirs(os.path.join(root, directory), exist_ok=True)
  for path in paths:
    coarse = rng.uniform(0, 255, (1, 6, 8, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, (375, 500), method='bicubic').numpy()[0]
    image = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    with open(path, 'wb') as f:
      f.write(tf.io.encode_jpeg(image, quality=90).numpy())
  return root


def time_passes(data_config, batch: int, steps: int, repeats: int, seed=0,
                views: int = 2):
  """Median images/s over `repeats` passes; each image gives `views` crops
  (2: pretrain_batches, 1: labelled_batches)."""
  from moco_jax.data import pipeline
  make = pipeline.pretrain_batches if views == 2 else pipeline.labelled_batches
  return report.images_per_second(make(data_config, batch, seed), batch, steps, repeats)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import tensorflow as tf
  from moco_jax.data.info import DatasetError
  config = FLAGS.config
  cores = len(os.sched_getaffinity(0))
  result = {'benchmark': 'input_throughput',
            'cores': cores, 'tensorflow': tf.__version__,
            'batch': FLAGS.batch, 'steps': FLAGS.steps, 'repeats': FLAGS.repeats}

  data = config.data
  try:
    rate, rates = time_passes(data, FLAGS.batch, FLAGS.steps, FLAGS.repeats)
  except DatasetError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  result.update(dataset=data.dataset, dataset_image_size=data.image_size,
                dataset_images_per_sec=rate,
                dataset_images_per_core_per_sec=rate / cores,
                dataset_pass_images_per_sec=rates)

  folder = FLAGS.folder_dir or tempfile.mkdtemp(prefix='moco_jpeg_folder_')
  write_jpeg_folder(folder, FLAGS.folder_images)
  jpeg = config.data.copy_and_resolve_references()
  jpeg.dataset, jpeg.data_dir, jpeg.train_split = f'folder:{folder}', '', '.'
  jpeg.image_size, jpeg.crop_scale, jpeg.cache = 224, (0.2, 1.0), False
  for views, prefix in ((2, 'folder_jpeg'), (1, 'folder_jpeg_one_view')):
    for fused in (True, False, True, False):    # alternate against drift
      jpeg.fused_jpeg_crop = fused
      key = 'fused' if fused else 'decode_once'
      rate, _ = time_passes(jpeg, FLAGS.batch, FLAGS.steps, FLAGS.repeats, views=views)
      result.setdefault(f'{prefix}_{key}_runs', []).append(rate)
    for key in ('fused', 'decode_once'):
      rate = statistics.median(result[f'{prefix}_{key}_runs'])
      result[f'{prefix}_{key}_images_per_sec'] = rate
      result[f'{prefix}_{key}_images_per_core_per_sec'] = rate / cores
    result[f'{prefix}_fused_over_decode_once'] = (
        result[f'{prefix}_fused_images_per_sec']
        / result[f'{prefix}_decode_once_images_per_sec'])
  report.emit_json(result, FLAGS.json)


if __name__ == '__main__':
  app.run(main)
