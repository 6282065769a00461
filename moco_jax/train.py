"""train_and_evaluate(config, workdir): the pretraining loop.

Builds the encoder, optimiser and replicated state on a one-axis 'data' mesh
over every device, resumes from the newest checkpoint in `workdir`, and
trains with progress bar, metrics.jsonl, TensorBoard and orbax checkpoints.
Importable from Python/Colab; main.py is only the command-line wrapper.
"""
import math
import time

import jax
import ml_collections
import numpy as np

from moco_jax import moco
from moco_jax.config import resume_rules
from moco_jax.config.checks import queue_warning
from moco_jax.evaluation import collapse, fewshot as fewshot_evaluation, knn as knn_evaluation
from moco_jax.experiment import Experiment, describe_bn
from moco_jax.models.encoder import is_vit
from moco_jax.runtime import accelerators, checkpointing, paths, progress as clock
from moco_jax.runtime.loop import LoopHarness
from moco_jax.runtime.metric_writer import MetricWriter
from moco_jax.weights import import_weights


def init_state(experiment: Experiment):
  """A fresh state; f_q and f_k both from `config.init_from` when set."""
  state = experiment.init_state()
  path = experiment.config.init_from
  if path:
    variables = import_weights.load_weights(
        path, {'params': state.params, 'batch_stats': state.batch_stats})
    state = import_weights.init_state_from(state, variables)
  return state


def restore_or_init(experiment: Experiment, checkpointer: checkpointing.Checkpointer):
  """The newest readable checkpoint's state, or a fresh one.

  Raises:
    checkpointing.CheckpointError if the workdir's checkpoint was made with a
    config whose state cannot continue under this one (other arch, head, K…).
  """
  steps = checkpointer.all_steps()
  if not steps:
    return init_state(experiment)
  try:
    saved = checkpointer.restore_config(steps[-1])
  except Exception as error:  # the state may still read: restore_newest_valid decides
    saved = None
    if jax.process_index() == 0:
      print(f'warning: the config saved with {checkpointer.path(steps[-1])} cannot be '
            f'read ({checkpointing.readable_reason(error)}), so whether this run may '
            f'continue it (same arch, head, queue, ...) is not checked; resuming with '
            f'this command\'s config', flush=True)
  if saved is not None:
    problems = resume_rules.incompatibilities(saved, experiment.config.to_dict())
    if problems:
      raise checkpointing.CheckpointError(
          f'cannot resume from {checkpointer.directory}: '
          + '; '.join(problems) + '; resume with the saved values, or use a new '
          '--workdir to start over')
  return checkpointer.restore_newest_valid(experiment.abstract_state())


def knn_monitor(config, experiment: Experiment):
  """The kNN evaluator when eval.knn_every > 0 or eval.knn_at_start, else None.

  Built before anything compiles: a bad eval.batch_size or eval split fails
  fast (ConfigError, DatasetError).
  """
  if config.eval.knn_every <= 0 and not config.eval.knn_at_start:
    return None
  return knn_evaluation.KnnEvaluator(config, experiment.mesh, on_device=experiment.on_device)


def skipped_images(batches) -> int:
  """Unreadable images skipped so far by the input of all processes."""
  count = np.int64(batches.skipped_images)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    count = multihost_utils.process_allgather(count).sum()
  return int(count)


def write_unreadable_names(batches, workdir: str) -> str:
  """Writes this process's unreadable files, one per line (bytes as the
  file system names them), to WORKDIR/skipped_images.txt (process i > 0:
  skipped_images.process<i>.txt); returns process 0's file."""
  index = jax.process_index()
  name = 'skipped_images.txt' if index == 0 else f'skipped_images.process{index}.txt'
  paths.write_bytes_atomic(paths.join(workdir, name),
                           b''.join(line + b'\n' for line in batches.unreadable_names))
  return paths.join(workdir, 'skipped_images.txt')


def _watch_collapse(monitor, step: int, metrics: dict, config, progress) -> None:
  """Prints the collapse warning once; stops the run if train.stop_on_collapse."""
  warning = monitor.update(step, metrics)
  if warning is None:
    return
  progress.write(warning)
  if config.train.stop_on_collapse:
    raise collapse.CollapseError(
        f'stopped at step {step} (train.stop_on_collapse), nothing saved after '
        f'the last checkpoint: {warning[len("warning: "):]}')


def _queue_warning(config, experiment) -> str | None:
  keys_per_step = config.train.batch_size * (2 if config.moco.symmetric else 1)
  return queue_warning(config.moco.queue_size,
                              experiment.epoch_steps * config.train.batch_size,
                              keys_per_step)


def _log_knn(knn, state, step: int, writer, harness) -> dict:
  with harness.busy('this kNN pass and the next step'):   # what a Ctrl-C now waits for
    metrics = knn(state.params, state.batch_stats)  # eval.knn_features picks
  writer.write(step, metrics)
  harness.write(f'step {step}: knn_top1 {metrics["knn_top1"]:.2f}')
  return metrics


def startup_summary(experiment: Experiment, workdir: str) -> str:
  """One line: devices, batch, BN groups, steps, epochs, data, dtype, workdir."""
  config, mesh, info = experiment.config, experiment.mesh, experiment.info
  devices = list(mesh.devices.flat)
  kinds = ', '.join(sorted({d.device_kind for d in devices}))
  hosts = f' on {jax.process_count()} processes' if jax.process_count() > 1 else ''
  batch = config.train.batch_size
  return (f'pretrain: {len(devices)} {devices[0].platform.upper()} device'
          f'{"s" if len(devices) > 1 else ""} ({kinds}){hosts}; global batch {batch} '
          f'({batch // len(devices)} per device); '
          f'{describe_bn(experiment.bn_layout, config.moco.shuffle_bn, config.model)}; '
          f'{experiment.total_steps:,} steps = '
          f'{experiment.total_steps / experiment.epoch_steps:.3g} epochs of '
          f'{experiment.epoch_steps:,} steps; {info.num_examples:,} training images '
          f'({info.name} {config.data.train_split}'
          f'{", on device" if experiment.on_device else ""}); {config.dtype}; '
          f'workdir {paths.absolute(workdir)}')


def startup_warnings(config, experiment: Experiment) -> list[str]:
  """Warnings printed once at start (each a line starting 'warning:')."""
  return [w for w in (_queue_warning(config, experiment),) if w]


def _long_run_hint(experiment: Experiment) -> str:
  devices = list(experiment.mesh.devices.flat)
  where = f'{len(devices)} {devices[0].platform.upper()} device{"s" if len(devices) > 1 else ""}'
  if devices[0].platform == 'cpu':
    where += '; for a run that finishes on a CPU use configs/quickstart.py or configs/cifar10_cpu.py'
  return where


def _with_mfu(experiment: Experiment, step_fn, state, inputs):
  """(step, mfu) where mfu(images_per_sec) is the achieved model FLOP
  utilisation: XLA's FLOPs per device per step (the count moco_jax.plan
  reports) × steps/s / the chip's peak bf16 FLOP/s
  (runtime/accelerators.py). On a CPU, or a chip whose peak is unknown,
  (step_fn, None): the step is left to compile on its first call."""
  device = experiment.mesh.devices.flat[0]
  chip = accelerators.chip_of_device_kind(device.device_kind)
  if device.platform == 'cpu' or chip is None:
    return step_fn, None
  step, flops = experiment.compiled_train_step(state, inputs)
  batch = experiment.config.train.batch_size
  return step, lambda images_per_sec: flops * images_per_sec / batch / chip.peak_flops


def _device_batch(experiment: Experiment, batches):
  """The next host batch, sent to the devices (the copy runs asynchronously)."""
  return experiment.step_inputs(next(batches))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       second_interrupt: str = 'raise') -> dict:
  """Pretrains MoCo; resumes from workdir's newest checkpoint if there is one.

  At most one step is in flight: the loop waits for each step's outputs
  (while the next batch is read and copied), so the progress bar, its rate
  and ETA count completed steps, and a stop request is seen within one step.
  SIGTERM or Ctrl-C: finish the current step, save, return. A second Ctrl-C:
  see `preemption.StopRequests` (`second_interrupt`: 'raise' for Python
  callers, 'exit' for the command line). Losses and gradients are checked
  for NaN/Inf at every step; no checkpoint is written from a non-finite state.

  Returns:
    The last logged metrics (a dict of Python scalars; {} if the run had
    already finished).

  Raises:
    ConfigError, DatasetError, CheckpointError: before any compilation.
    runtime.health.NonFiniteError: training diverged.
  """
  run_start = time.perf_counter()
  experiment = Experiment(config)
  knn = knn_monitor(config, experiment)
  # kNN every eval.knn_every epochs (fractions allowed) and at the last step.
  knn_every = (max(1, round(config.eval.knn_every * experiment.epoch_steps))
               if config.eval.knn_every > 0 else 0)
  fewshot, fewshot_every = fewshot_evaluation.periodic_evaluator(
      config, experiment.mesh, experiment.epoch_steps, experiment.on_device)
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  checkpointer.remove_unfinished_saves()
  state = restore_or_init(experiment, checkpointer)
  start_step, last_step = int(state.step), experiment.total_steps
  is_main = jax.process_index() == 0
  say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
  say(startup_summary(experiment, workdir))
  if start_step >= last_step:
    say(f'already finished at step {start_step} (train.num_steps/num_epochs give '
        f'{last_step}); raise them to train on, or use a new --workdir')
    checkpointer.close()
    return {}
  if start_step > 0:
    say(f'resumed from step {start_step} (epoch {start_step / experiment.epoch_steps:.2f}) '
        f'of {checkpointer.path(start_step)}')
  for warning in startup_warnings(config, experiment):
    say(warning)
  writer = MetricWriter(workdir, enabled=is_main)
  batches = experiment.train_batches(start_step)  # host tf.data or data.on_device
  step_fn = experiment.train_step()
  monitor = collapse.monitor_for(
      config, moco.chance_loss(config.moco.queue_size, config.train.batch_size,
                               config.moco.temperature, config.moco.symmetric),
      round(config.optim.warmup_epochs * experiment.epoch_steps),
      experiment.epoch_steps)
  last_metrics = {}
  # In this run's first metrics line; a ViT backbone has no BN groups.
  bn_facts = {} if is_vit(config.model.arch) else dict(experiment.bn_layout)
  harness = LoopHarness(
      'pretrain', start_step, last_step, checkpointer, saved_config=config.to_dict(),
      batch_size=config.train.batch_size, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every, writer=writer,
      finite_keys=('loss', 'grad_norm'),
      finite_hint='lower optim.base_lr or add optim.warmup_epochs',
      second_interrupt=second_interrupt, where=_long_run_hint(experiment))

  def log(done, metrics, rate):
    nonlocal last_metrics, bn_facts
    skipped = skipped_images(batches)
    if skipped > last_metrics.get('skipped_images', 0):
      listed = write_unreadable_names(batches, workdir)
      harness.write(f'step {done}: skipped {skipped} unreadable images so far '
                    f'(named in {listed})')
    last_metrics = dict(metrics, epoch=done / experiment.epoch_steps,
                        skipped_images=skipped)
    if rate is not None:  # none yet when only the compiling step ran
      last_metrics['images_per_sec'] = rate
      if mfu is not None:
        last_metrics['mfu'] = mfu(rate)
    writer.write(done, {**bn_facts, **last_metrics})
    bn_facts = {}
    _watch_collapse(monitor, done, last_metrics, config, harness)
    harness.set_postfix(done, loss=f'{metrics["loss"]:.3f}',
                        **({'img_s': f'{rate:.0f}'} if rate else {}))

  def due(done, every):
    return every > 0 and (done % every == 0 or done == last_step)

  def evaluate(done, state):
    if due(done, knn_every):
      last_metrics.update(_log_knn(knn, state, done, writer, harness))
    if due(done, fewshot_every):
      with harness.busy('this few-shot pass and the next step'):
        last_metrics.update(fewshot_evaluation.log(fewshot, state, done, writer, harness))

  def evaluate_first(done, state):
    last_metrics.update(_log_knn(knn, state, done, writer, harness))

  # The harness calls `evaluate` on the steps of either schedule.
  eval_every = math.gcd(knn_every, fewshot_every)
  # On an accelerator the step is compiled ahead of time for the first batch
  # (its FLOP count gives the achieved MFU); that batch is then the first fed.
  first_batch = [_device_batch(experiment, batches)]
  step_fn, mfu = _with_mfu(experiment, step_fn, state, first_batch[0])

  def next_inputs():
    return first_batch.pop() if first_batch else _device_batch(experiment, batches)

  with harness:
    harness.run(state, step_fn, next_inputs, log=log,
                evaluate=evaluate if eval_every > 0 else None, eval_every=eval_every,
                evaluate_first=(evaluate_first if knn is not None
                                and config.eval.knn_at_start and start_step == 0 else None))
  if not harness.stopped_by:
    say(_finished_line(last_metrics, last_step, time.perf_counter() - run_start,
                       checkpointer))
  return last_metrics


def _finished_line(metrics: dict, step: int, seconds: float, checkpointer) -> str:
  parts = [f'finished at step {step} in {clock.format_duration(seconds)}',
           f'loss {metrics.get("loss", float("nan")):.3f}']
  if 'knn_top1' in metrics:
    parts.append(f'knn_top1 {metrics["knn_top1"]:.2f}')
  return '; '.join(parts) + f'; checkpoint {checkpointer.path(step)}'
