"""Host images/s of MoCo's input, tf.data against Grain, side by side in one run.

Writes (or reuses) --images photo-like JPEGs in ImageNet's common sizes
(500x375, 375x500, 500x333, 333x500, re-encoded at quality 90, ~110 KB
each) as one TFDS dataset prepared twice: TFRecord (read by tf.data,
data/pipeline.py) and array_record (read by Grain, data/grain_loader.py).
Both loaders make the same batches: two 224-pixel random-resized crops
(scale 0.2-1) + flips per image. The settings alternate (tf.data, Grain with
each --workers count, then again) against drift; each figure is the median
over --repeats timed passes of --steps batches after an untimed warm-up.

Also times one image's decode + two crops + resize + flip, one image at a
time from one Python thread (as in one Grain worker):
TensorFlow ops (what both loaders run) against PIL/NumPy (Pillow's decode
and box-resize; same windows, not bit-identical pixels).

"Per core" divides by this process's cores (os.sched_getaffinity). The
hosts of the R50 plan: a v4-8 host (4 chips, 240 vCPUs) and a v5e-8 host
(8 chips, 224 vCPUs); their images/s at 40% and 60% MFU follow from the
v2 R50 step's ~33 GFLOP per image (query forward + backward, key forward:
4 x 8.2 GFLOP) and peak bf16 FLOP/s per chip (v4: 275 T, v5e: 197 T).

  python benchmarks/grain_input.py --images 512 --batch 32 --steps 48 \
      --repeats 2 --workers 0,2 --rounds 1 --json=grain.json
"""
import io
import os
import statistics
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import numpy as np
from absl import app, flags

import report  # benchmarks/ is on sys.path when run as a script

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 512, 'JPEGs in the generated dataset.')
flags.DEFINE_integer('batch', 64, 'Images per batch.')
flags.DEFINE_integer('steps', 48, 'Batches per timed pass; keep it well above '
                     'what tf.data prefetches (short passes read its buffer, not its rate).')
flags.DEFINE_integer('repeats', 3, 'Timed passes per setting (median reported).')
flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain worker counts to time.')
flags.DEFINE_integer('rounds', 2, 'Alternations of all settings.')
flags.DEFINE_string('dir', None, 'Where to write (or reuse) the dataset; '
                    'default: a temporary directory.')
flags.DEFINE_string('json', None, 'Also write the JSON result to this file.')

NAME = 'jpeg_photos'
SIZES = ((375, 500), (500, 375), (333, 500), (500, 333))   # (H, W)
R50_GFLOP_PER_IMAGE = 4 * 8.2
HOSTS = {'v4-8': dict(chips=4, peak_tflops=275, vcpus=240),
         'v5e-8': dict(chips=8, peak_tflops=197, vcpus=224)}


def photo(rng, height: int, width: int) -> bytes:
  """A photo-like JPEG (smooth colour fields plus noise) at quality 90."""
  from PIL import Image
  coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
  smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), np.float32)
  pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=90)
  return out.getvalue()


def prepare(root: str, count: int) -> dict:
  """{file format: data_dir} of the dataset in TFRecord and array_record."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  dirs = {fmt: os.path.join(root, fmt) for fmt in ('tfrecord', 'array_record')}
  rng = np.random.default_rng(0)
  images = None
  for fmt, data_dir in dirs.items():
    if os.path.exists(os.path.join(data_dir, NAME, '1.0.0', 'dataset_info.json')):
      continue
    if images is None:
      images = [photo(rng, *SIZES[i % len(SIZES)]) for i in range(count)]
    split = tf.data.Dataset.from_tensor_slices(
        {'image': images, 'label': np.arange(count) % 2})
    tfds.dataset_builders.TfDataBuilder(
        name=NAME, version='1.0.0', data_dir=data_dir, file_format=fmt,
        split_datasets={'train': split},
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
            'label': tfds.features.ClassLabel(num_classes=2)}),
    ).download_and_prepare()
  return dirs


def data_config(data_dir: str, loader: str, workers: int):
  from moco_jax.config.base import base_config
  config = base_config().data
  config.dataset, config.data_dir, config.loader = NAME, data_dir, loader
  config.worker_count = workers
  config.image_size, config.crop_scale, config.cache = 224, (0.2, 1.0), False
  return config


def one_image_rates(encoded_images: list[bytes], seconds: float = 10.0) -> dict:
  """Images/s of decode + two 224 crops + resize + flip, one image at a time:
  the loaders' TensorFlow ops against PIL/NumPy (same windows)."""
  import ml_collections
  import tensorflow as tf
  from PIL import Image
  from moco_jax.data import crops, pipeline
  config = ml_collections.ConfigDict({'image_size': 224, 'crop_scale': (0.2, 1.0)})

  @tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)])
  def tf_views(encoded, seed):
    return pipeline.random_views(encoded, seed, config, 2)

  @tf.function(input_signature=[tf.TensorSpec([3], tf.int32), tf.TensorSpec([2], tf.int64)])
  def window(shape, seed):
    begin, size = crops.crop_window(shape, seed, (0.2, 1.0))
    return tf.stack([begin[1], begin[0], begin[1] + size[1], begin[0] + size[0]])

  def pil_views(encoded, seed):
    image = Image.open(io.BytesIO(encoded)).convert('RGB')
    shape = tf.constant([image.height, image.width, 3], tf.int32)
    views = []
    for view in range(2):
      box = tuple(int(v) for v in window(shape, seed + view).numpy())
      crop = image.resize((224, 224), Image.BILINEAR, box=box, reducing_gap=None)
      array = np.asarray(crop)
      views.append(array[:, ::-1] if (seed[0] + view) % 2 else array)
    return np.stack(views)

  def rate(make):
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
      make(encoded_images[count % len(encoded_images)], np.array([count, 1], np.int64))
      count += 1
    return count / (time.perf_counter() - start)

  tf_views(encoded_images[0], np.array([0, 1], np.int64))        # trace
  window(tf.constant([375, 500, 3]), np.array([0, 1], np.int64))
  # The PIL figure includes the window's TF call (~0.1 ms), as a PIL loader
  # keyed like ours would need it or its NumPy twin.
  return {'one_at_a_time_tf_ops_images_per_sec': rate(lambda e, s: tf_views(e, s).numpy()),
          'one_at_a_time_pil_images_per_sec': rate(pil_views)}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import tensorflow as tf
  import grain
  from moco_jax.data import grain_loader, pipeline
  cores = len(os.sched_getaffinity(0))
  root = FLAGS.dir or tempfile.mkdtemp(prefix='moco_grain_bench_')
  dirs = prepare(root, FLAGS.images)
  workers = [int(w) for w in FLAGS.workers]
  result = {'benchmark': 'grain_input', 'cores': cores, 'tensorflow': tf.__version__,
            'grain': grain.__version__, 'images': FLAGS.images, 'batch': FLAGS.batch,
            'steps': FLAGS.steps, 'repeats': FLAGS.repeats, 'image_size': 224,
            'views': 2, 'load_average_at_start': os.getloadavg()[0]}
  runs = {}
  for _ in range(FLAGS.rounds):
    batches = pipeline.pretrain_batches(data_config(dirs['tfrecord'], 'tf.data', 0),
                                        FLAGS.batch, seed=0)
    runs.setdefault('tfdata', []).append(
        report.images_per_second(batches, FLAGS.batch, FLAGS.steps, FLAGS.repeats)[0])
    for count in workers:
      batches = grain_loader.pretrain_batches(
          data_config(dirs['array_record'], 'grain', count), FLAGS.batch, seed=0)
      runs.setdefault(f'grain_{count}_workers', []).append(
          report.images_per_second(batches, FLAGS.batch, FLAGS.steps, FLAGS.repeats)[0])
      batches.close()
  for key, rates in runs.items():
    rate = statistics.median(rates)
    result[f'{key}_runs'] = rates
    result[f'{key}_images_per_sec'] = rate
    result[f'{key}_images_per_core_per_sec'] = rate / cores
  import tensorflow_datasets as tfds
  source = tfds.data_source(NAME, data_dir=dirs['array_record'], split='train',
                            decoders={'image': tfds.decode.SkipDecoding()}, download=False)
  encoded = [source[i]['image'] for i in range(min(32, len(source)))]
  result['mean_jpeg_bytes'] = float(np.mean([len(e) for e in encoded]))
  result.update(one_image_rates(encoded))
  per_core = max(result['tfdata_images_per_core_per_sec'],
                 max(result[f'grain_{count}_workers_images_per_core_per_sec']
                     for count in workers))
  result['best_images_per_core_per_sec'] = per_core
  for host, spec in HOSTS.items():
    for mfu in (0.4, 0.6):
      need = spec['chips'] * spec['peak_tflops'] * 1e3 * mfu / R50_GFLOP_PER_IMAGE
      result[f'{host}_r50_images_per_sec_at_{int(mfu * 100)}_mfu'] = round(need)
      result[f'{host}_host_cores_needed_at_{int(mfu * 100)}_mfu'] = round(need / per_core)
    result[f'{host}_host_vcpus'] = spec['vcpus']
  report.emit_json(result, FLAGS.json)


if __name__ == '__main__':
  app.run(main)
