"""Host tf.data input vs device-resident data (data.on_device), in one process.

Two comparisons, alternating the two settings round by round so that a
shared machine's load hits both alike, medians over rounds:

  input   two-view images/s of the input alone at the config's size: the host
          pipeline (pipeline.pretrain_batches: decode, two random-resized
          crops + flips per image, uint8 batches) vs the device's gather +
          crop + flip (data/device_batches.make_views) from the split on the device.
  step    seconds per whole training step of the config (e.g.
          configs/cifar10_cpu.py) fed by each: host batches copied to the
          device, or indices with the crops made inside the jitted step.

  nice -n 5 python benchmarks/device_input.py --config=configs/cifar10_cpu.py \
      --config.data.data_dir=../shared/tfds --json=device_input.json
"""
import copy
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import report  # benchmarks/ is on sys.path when run as a script

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=False)
flags.DEFINE_integer('rounds', 5, 'Alternating rounds (medians over them).')
flags.DEFINE_integer('input_batches', 10, 'Input batches per setting and round.')
flags.DEFINE_integer('steps', 8, 'Training steps per setting and round.')
flags.DEFINE_string('json', None, 'Also write the JSON result to this file.')
flags.mark_flags_as_required(['config'])


def _copy(config, on_device):
  c = copy.deepcopy(config)   # keeps data.on_device open to bool or str
  c.data.on_device = on_device
  c.eval.knn_every, c.eval.knn_at_start = 0, False
  return c


def main(argv):
  del argv
  from moco_jax.data.device_batches import make_views
  from moco_jax.experiment import Experiment
  config = FLAGS.config
  host, dev = Experiment(_copy(config, False)), Experiment(_copy(config, True))
  assert dev.on_device and not host.on_device
  batch = config.train.batch_size
  host_batches, dev_batches = host.train_batches(0), dev.train_batches(0)
  split = dev.train_split
  views = make_views(dev.mesh, image_size=config.data.image_size,
                     crop_scale=tuple(config.data.crop_scale))
  rng = jax.random.PRNGKey(0)

  def host_input():
    for _ in range(FLAGS.input_batches):
      b = next(host_batches)
    return b['images_q']

  def device_input():
    for i in range(FLAGS.input_batches):
      out = views(split.images, dev.step_inputs(next(dev_batches))[0], rng, np.int32(i))
    return jax.block_until_ready(out)

  def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  host_input(), device_input()   # warm-up and compile
  input_rates = {'host': [], 'device': []}
  for _ in range(FLAGS.rounds):
    for name, fn in (('host', host_input), ('device', device_input)):
      input_rates[name].append(FLAGS.input_batches * batch / timed(fn))

  runs = {}
  for name, experiment in (('host', host), ('device', dev)):
    state, step = experiment.init_state(), experiment.train_step()
    batches = experiment.train_batches(0)
    state, metrics = step(state, *experiment.step_inputs(next(batches)))   # compile
    jax.block_until_ready(metrics)
    runs[name] = [state, step, batches, experiment]
  step_times = {'host': [], 'device': []}
  for _ in range(FLAGS.rounds):
    for name in ('host', 'device'):
      state, step, batches, experiment = runs[name]
      start = time.perf_counter()
      for _ in range(FLAGS.steps):
        # As the training loop: the next batch is read while the step runs.
        state, metrics = step(state, *experiment.step_inputs(next(batches)))
        jax.device_get(metrics['loss'])
      step_times[name].append((time.perf_counter() - start) / FLAGS.steps)
      runs[name][0] = state

  med = {k: statistics.median(v) for k, v in input_rates.items()}
  sec = {k: statistics.median(v) for k, v in step_times.items()}
  report.emit_json({
      'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'cores': len(os.sched_getaffinity(0)), 'batch': batch,
      'image_size': config.data.image_size, 'rounds': FLAGS.rounds,
      'input_host_images_per_sec': round(med['host'], 1),
      'input_device_images_per_sec': round(med['device'], 1),
      'input_device_over_host': round(med['device'] / med['host'], 2),
      'input_host_all': [round(x) for x in input_rates['host']],
      'input_device_all': [round(x) for x in input_rates['device']],
      'step_host_sec': round(sec['host'], 4), 'step_device_sec': round(sec['device'], 4),
      'step_host_over_device': round(sec['host'] / sec['device'], 3),
      'step_host_all': [round(x, 3) for x in step_times['host']],
      'step_device_all': [round(x, 3) for x in step_times['device']],
  }, FLAGS.json)


if __name__ == '__main__':
  app.run(main)
