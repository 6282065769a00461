"""train_and_evaluate(config, workdir): the pretraining loop.

Builds the encoder, optimiser and replicated state on a one-axis 'data' mesh
over every device, resumes from the newest checkpoint in `workdir`, and
trains with progress bar, metrics.jsonl, TensorBoard and orbax checkpoints.
Importable from Python/Colab; main.py is only the command-line wrapper.
"""
import time

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from moco_jax.data import pipeline
from moco_jax.evaluation import knn as knn_evaluation
from moco_jax.experiment import Experiment
from moco_jax.runtime import checkpointing, preemption
from moco_jax.runtime.metric_writer import MetricWriter
from moco_jax.weights import import_weights


class NonFiniteError(RuntimeError):
  """The loss or the gradient became NaN or infinite."""


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
  except Exception:  # unreadable: restore_newest_valid deals with it
    saved = None
  if saved is not None:
    problems = checkpointing.incompatibilities(saved, experiment.config.to_dict())
    if problems:
      raise checkpointing.CheckpointError(
          f'{checkpointer.directory} holds a checkpoint of a different run ('
          + '; '.join(problems) + '); use a new --workdir to start over')
  return checkpointer.restore_newest_valid(experiment.abstract_state())


def _check_finite(metrics: dict, step: int, checkpointer) -> None:
  if all(np.isfinite(metrics[key]) for key in ('loss', 'grad_norm')):
    return
  good = checkpointer.all_steps()
  raise NonFiniteError(
      f'non-finite training detected at step {step} (loss={metrics["loss"]}, '
      f'grad_norm={metrics["grad_norm"]}); nothing saved after it; last good '
      f'checkpoint: {checkpointer.path(good[-1]) if good else "none"} '
      f'(lower optim.base_lr or add optim.warmup_epochs)')


def knn_monitor(config, experiment: Experiment):
  """The kNN evaluator when eval.knn_every > 0 or eval.knn_at_start, else None.

  Built before anything compiles: a bad eval.batch_size or eval split fails
  fast (ConfigError, DatasetError).
  """
  if config.eval.knn_every <= 0 and not config.eval.knn_at_start:
    return None
  return knn_evaluation.KnnEvaluator(config, experiment.mesh)


def skipped_images(batches) -> int:
  """Unreadable images skipped so far by the input of all processes."""
  count = np.int64(batches.skipped_images)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    count = multihost_utils.process_allgather(count).sum()
  return int(count)


def _log_knn(knn, state, step: int, writer, progress) -> dict:
  metrics = knn(state.params['backbone'], state.batch_stats['backbone'])
  writer.write(step, metrics)
  progress.write(f'step {step}: knn_top1 {metrics["knn_top1"]:.2f}')
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains MoCo; resumes from workdir's newest checkpoint if there is one.

  SIGTERM or Ctrl-C: finish the current step, save, return. Losses and
  gradients are checked for NaN/Inf at every log and checkpoint step; no
  checkpoint is written from a non-finite state.

  Returns:
    The last logged metrics (a dict of Python scalars).

  Raises:
    ConfigError, DatasetError, CheckpointError: before any compilation.
    NonFiniteError: training diverged.
  """
  experiment = Experiment(config)
  knn = knn_monitor(config, experiment)
  # kNN every eval.knn_every epochs (fractions allowed) and at the last step.
  knn_every = (max(1, round(config.eval.knn_every * experiment.epoch_steps))
               if config.eval.knn_every > 0 else 0)
  checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)
  checkpointer.remove_unfinished_saves()
  state = restore_or_init(experiment, checkpointer)
  start_step, last_step = int(state.step), experiment.total_steps
  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main)
  local_batch = config.train.batch_size // jax.process_count()
  batches = pipeline.pretrain_batches(config.data, local_batch, config.seed,
                                            start_step)
  step_fn = experiment.train_step()
  progress = tqdm(total=last_step, initial=start_step, disable=not is_main,
                  unit='step', dynamic_ncols=True, desc='pretrain')
  last_metrics = {}
  try:
    with preemption.StopRequests() as stop:
      if knn is not None and config.eval.knn_at_start and start_step == 0:
        last_metrics.update(_log_knn(knn, state, 0, writer, progress))
      window_start, window_steps = time.perf_counter(), 0
      for step in range(start_step, last_step):
        batch = next(batches)
        state, metrics = step_fn(state, experiment.to_global(batch['images_q']),
                                 experiment.to_global(batch['images_k']))
        done, window_steps = step + 1, window_steps + 1
        stopping = stop.requested
        log_due = done % config.train.log_every == 0 or done == last_step
        save_due = (done % config.train.checkpoint_every == 0 or done == last_step
                    or stopping)
        if log_due or save_due:
          metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
          _check_finite(metrics, done, checkpointer)
        if log_due:
          elapsed = time.perf_counter() - window_start
          skipped = skipped_images(batches)
          if skipped > last_metrics.get('skipped_images', 0):
            progress.write(f'step {done}: skipped {skipped} unreadable images so far')
          last_metrics = dict(metrics, epoch=done / experiment.epoch_steps,
                              images_per_sec=window_steps * config.train.batch_size / elapsed,
                              skipped_images=skipped)
          writer.write(done, last_metrics)
          progress.set_postfix(loss=f'{last_metrics["loss"]:.3f}',
                               img_s=f'{last_metrics["images_per_sec"]:.0f}')
          window_start, window_steps = time.perf_counter(), 0
        if save_due:
          checkpointer.save(done, state, config.to_dict())
        # After the save is started: it completes while the kNN pass runs.
        if knn_every > 0 and (done % knn_every == 0 or done == last_step) and not stopping:
          knn_start = time.perf_counter()
          last_metrics.update(_log_knn(knn, state, done, writer, progress))
          window_start += time.perf_counter() - knn_start  # not training time
        progress.update(1)
        if stopping:
          progress.write(f'{stop.signal_name}: saved step {done} to '
                         f'{checkpointer.path(done)}; rerun the same command to continue')
          break
  finally:
    # Whatever stopped the loop, let a started save complete (orbax only
    # marks it as a checkpoint once it is whole).
    progress.close()
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return last_metrics
