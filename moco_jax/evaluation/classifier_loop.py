"""The training loop of a classifier on a pretrained backbone, shared by the
linear probe (evaluation/linear.py, frozen backbone) and end-to-end
fine-tuning (evaluation/finetune.py).

Both read labelled crops of data.train_split, evaluate top-1/top-5 on
data.eval_split every eval.every_epochs, keep the best top-1 so far and its
epoch (the reference's main_lincls.py keeps best_acc1), and run inside the
one loop harness (runtime/loop.py): progress bar, stop requests and save on
stop, the non-finite guard, a loss blow-up warning. What differs, the step
and how a batch is scored, is passed in.
"""
import dataclasses
import json
from typing import Any, Callable

import jax
import ml_collections

from moco_jax.data import inputs
from moco_jax.runtime import health, paths
from moco_jax.runtime.loop import LoopHarness
from moco_jax.runtime.metric_writer import MetricWriter
from moco_jax.runtime.progress import progress


@dataclasses.dataclass(frozen=True)
class BestEpoch:
  """The best `<prefix>_top1` so far and the epoch it was reached (-1: none)."""
  prefix: str
  top1: float = -1.0
  epoch: float = -1.0

  @classmethod
  def from_log(cls, prefix: str, workdir: str, up_to_step: int,
               epoch_steps: int) -> 'BestEpoch':
    """The best of the evaluations that workdir/metrics.jsonl logged at steps
    up to `up_to_step` (a resumed run continues from them; evaluations logged
    after its checkpoint are redone)."""
    best = cls(prefix)
    path = paths.join(workdir, 'metrics.jsonl')
    if up_to_step <= 0 or not paths.isfile(path):
      return best
    for line in paths.read_bytes(path).decode().splitlines():
      try:
        event = json.loads(line)
      except ValueError:
        continue   # a line cut by a pre-emption
      if f'{prefix}_top1' in event and event.get('step', 0) <= up_to_step:
        best = best.update(event[f'{prefix}_top1'], event['step'] / epoch_steps)
    return best

  def update(self, top1: float, epoch: float) -> 'BestEpoch':
    return dataclasses.replace(self, top1=top1, epoch=epoch) if top1 > self.top1 else self

  def metrics(self) -> dict:
    return {f'{self.prefix}_best_top1': self.top1, f'{self.prefix}_best_epoch': self.epoch}


def accuracy(prefix: str, batches, count: Callable[[dict], dict]) -> dict:
  """{'<prefix>_top1', '<prefix>_top5'} in percent over `batches`.

  count(batch) returns this batch's correct counts {'top1', 'top5', 'count'}
  (padding masked out), so the percentages come from integers."""
  totals = {'top1': 0, 'top5': 0, 'count': 0}
  for batch in progress(batches, f'{prefix} eval'):
    counts = jax.device_get(count(batch))
    totals = {key: totals[key] + int(counts[key]) for key in totals}
  return {f'{prefix}_{key}': 100.0 * totals[key] / totals['count'] for key in ('top1', 'top5')}


def train_classifier(prefix: str, config: ml_collections.ConfigDict, workdir: str, mesh,
                     checkpointer, state, *, train_step, evaluate: Callable[[Any, Any], dict],
                     epoch_steps: int, last_step: int, num_classes: int,
                     second_interrupt: str = 'raise') -> tuple[Any, dict]:
  """Trains from `state` (step 0 or a restored checkpoint) to `last_step`.

  Args:
    prefix: the metrics' name ('lincls', 'finetune').
    train_step: (state, images (B,H,W,3) uint8, labels (B,) int32) ->
      (state, metrics with 'loss').
    evaluate: (state, eval batches) -> {'<prefix>_top1', '<prefix>_top5'}.
    epoch_steps: steps per epoch of data.train_split at train.batch_size.

  Returns:
    (state, results): results holds '<prefix>_top1/_top5' of the last
    evaluation and '<prefix>_best_top1/_best_epoch' (percent, epochs); {}
    when a stop request ended the run (its step is saved; rerun to resume).

  Raises:
    health.NonFiniteError if the loss becomes NaN/Inf (nothing saved after).
  """
  start_step = int(state.step)
  is_main = jax.process_index() == 0
  writer = MetricWriter(workdir, enabled=is_main)
  processes = jax.process_count()
  # data.on_device, decided once from both splits the run reads (inputs.py).
  on_device = inputs.on_device(config.data, mesh, with_eval=True)[0]
  batches = inputs.labelled_batches(config.data, config.train.batch_size // processes,
                                    config.seed, start_step, mesh, on_device)
  eval_batches = inputs.eval_batches(config.data, config.data.eval_split,
                                     config.eval.batch_size // processes, mesh, on_device)
  eval_every = int(round(config.eval.every_epochs * epoch_steps))   # 0: at the end only
  results = {}
  best = BestEpoch.from_log(prefix, workdir, start_step, epoch_steps)
  blow_up_watch = health.LossBlowUp(num_classes)
  harness = LoopHarness(
      prefix, start_step, last_step, checkpointer, saved_config=config.to_dict(),
      batch_size=config.train.batch_size, log_every=config.train.log_every,
      checkpoint_every=config.train.checkpoint_every, writer=writer,
      finite_hint='lower optim.base_lr', second_interrupt=second_interrupt)

  def next_batch():
    batch = next(batches)
    return batch['image'], batch['label']

  def watch(done, metrics):
    blow_up = blow_up_watch.update(done, metrics['loss'])
    if blow_up:
      harness.write(blow_up)

  def log(done, metrics, rate):
    writer.write(done, dict(metrics, epoch=done / epoch_steps,
                            **({'images_per_sec': rate} if rate else {})))
    harness.set_postfix(done, loss=f'{metrics["loss"]:.3f}')

  def evaluate_now(done, state):
    nonlocal results, best
    results = evaluate(state, eval_batches)
    best = best.update(results[f'{prefix}_top1'], done / epoch_steps)
    results.update(best.metrics())
    writer.write(done, results)
    harness.write(f'step {done}/{last_step}: {prefix}_top1 {results[f"{prefix}_top1"]:.2f} '
                  f'{prefix}_top5 {results[f"{prefix}_top5"]:.2f} (best '
                  f'{best.top1:.2f} at epoch {best.epoch:g})')

  with harness:
    state = harness.run(state, train_step, next_batch, log=log, evaluate=evaluate_now,
                        eval_every=eval_every, watch=watch)
  if harness.stopped_by:
    return state, {}
  if not results:  # resumed a finished run
    results = evaluate(state, eval_batches)
    results.update(best.update(results[f'{prefix}_top1'], last_step / epoch_steps).metrics())
  return state, results
