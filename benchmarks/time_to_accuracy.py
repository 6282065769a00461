"""Time to a kNN accuracy: train a config, kNN every N epochs, stop at a
target top-1 or a time budget; print one JSON object.

Training time excludes the kNN passes (the clock pauses for them) and counts
the first step's compilation separately. With data.on_device and an npz:
dataset (python -m moco_jax.data.export_npz) it imports no TensorFlow, so it
runs on an accelerator machine that has JAX alone:

  python -m moco_jax.data.export_npz --dataset=cifar10 --data_dir=../shared/tfds \
      --out=cifar10.npz        # once, where TensorFlow is installed
  python benchmarks/time_to_accuracy.py --config=configs/moco_v2_r18_cifar10.py \
      --config.data.dataset=npz:cifar10.npz --config.data.on_device=True \
      --config.dtype=bfloat16 --knn_every_epochs=10 --target=82.6 --budget_s=600

The reference demo: 82.6% kNN after 200 epochs (~67 min on one V100).
JSON keys: seconds_to_target (training seconds at the first kNN >= target,
null if not reached), images_per_sec (training images / training seconds
after compilation), compile_seconds, knn (the curve: epoch, step,
train_seconds, knn_top1), device_kind, devices, dtype, data_on_device,
tensorflow_imported, stopped ('target', 'budget' or 'finished').
"""
import os
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=False)
flags.DEFINE_float('knn_every_epochs', 10.0, 'Epochs between kNN evaluations.')
flags.DEFINE_float('target', 82.6, 'Stop when kNN top-1 (%) reaches this.')
flags.DEFINE_float('budget_s', 600.0, 'Stop when training time (s) passes this.')
flags.DEFINE_string('json', None, 'Also write the JSON result to this file.')
flags.mark_flags_as_required(['config'])


def time_to_accuracy(config, knn_every_epochs: float, target: float, budget_s: float,
                     log=print) -> dict:
  """Trains `config` until kNN top-1 >= target, budget_s training seconds,
  or the config's last step; returns the result dict (see the module doc)."""
  from moco_jax.evaluation.knn import KnnEvaluator
  from moco_jax.experiment import Experiment
  config.eval.knn_every, config.eval.knn_at_start = knn_every_epochs, False
  experiment = Experiment(config)
  knn = KnnEvaluator(config, experiment.mesh, on_device=experiment.on_device)
  every = max(1, round(knn_every_epochs * experiment.epoch_steps))
  state, step_fn = experiment.init_state(), experiment.train_step()
  batches = experiment.train_batches(0)
  batch = config.train.batch_size
  curve, train_seconds, compile_seconds, stopped, reached = [], 0.0, 0.0, 'finished', None
  loss = float('nan')
  inputs = experiment.step_inputs(next(batches))
  for step in range(experiment.total_steps):
    start = time.perf_counter()
    state, metrics = step_fn(state, *inputs)
    if step + 1 < experiment.total_steps:
      inputs = experiment.step_inputs(next(batches))
    if step == 0 or (step + 1) % every == 0 or step + 1 == experiment.total_steps:
      loss = float(jax.device_get(metrics['loss']))   # waits for the step
    elapsed = time.perf_counter() - start
    if step == 0:
      compile_seconds = elapsed
    train_seconds += elapsed
    done = step + 1
    if done % every == 0 or done == experiment.total_steps:
      jax.block_until_ready(state)
      top1 = knn(state.params, state.batch_stats)['knn_top1']   # not timed
      curve.append({'epoch': round(done / experiment.epoch_steps, 3), 'step': done,
                    'train_seconds': round(train_seconds, 2), 'knn_top1': round(top1, 2),
                    'loss': round(loss, 4)})
      log(f'epoch {done / experiment.epoch_steps:.1f}: knn_top1 {top1:.2f} after '
          f'{train_seconds:.1f} s of training')
      if top1 >= target:
        reached, stopped = train_seconds, 'target'
        break
    if train_seconds >= budget_s:
      stopped = 'budget'
      break
  steps_run = curve[-1]['step'] if curve else done
  return {
      'seconds_to_target': None if reached is None else round(reached, 2),
      'target_knn_top1': target, 'stopped': stopped,
      'images_per_sec': round((done - 1) * batch / max(train_seconds - compile_seconds, 1e-9), 1),
      'compile_seconds': round(compile_seconds, 2),
      'train_seconds': round(train_seconds, 2), 'steps': done, 'steps_at_last_knn': steps_run,
      'epochs': round(done / experiment.epoch_steps, 3), 'batch': batch,
      'knn': curve, 'device_kind': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'dtype': config.dtype,
      'data_on_device': experiment.on_device,
      'dataset': config.data.dataset,
      'tensorflow_imported': 'tensorflow' in sys.modules,
  }


def main(argv):
  del argv
  result = time_to_accuracy(FLAGS.config, FLAGS.knn_every_epochs, FLAGS.target,
                            FLAGS.budget_s, log=lambda line: print(line, file=sys.stderr))
  report.emit_json(result, FLAGS.json)


if __name__ == '__main__':
  app.run(main)
