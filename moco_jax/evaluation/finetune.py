"""End-to-end fine-tuning: a pretrained backbone plus a new linear classifier,
trained together on a labelled dataset; the command line is moco_jax/finetune.py.

The start point (weights/start_point.py) is a pretraining workdir, a Flax
export, an official checkpoint, or the same architecture from random
initialisation. The step is data-parallel over a 'data' mesh of every device
(shard_map, gradients and BN statistics averaged over 'data', the state
replicated and donated); images arrive as uint8 crops (RandomResizedCrop +
flip, from the host pipeline or cropped on the device with data.on_device)
and are normalised, erased and mixed on the device. Options: freeze the
backbone up to a named stage, layer-wise lr decay, BN with batch or running
statistics, a head-only warm-up, label smoothing, mixup/CutMix, random
erasing, ViT drop-path.

OUT gets metrics.jsonl (`loss`, `train_top1`, `lr`, `images_per_sec`;
`finetune_top1`, `finetune_top5`, `finetune_best_top1` in percent and
`finetune_best_epoch` on
data.eval_split), TensorBoard events and orbax checkpoints of the whole state
(rerun the command to resume exactly).
"""
import os
from typing import Any

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax import optim
from moco_jax.augment import colour as augment
from moco_jax.config.checks import ConfigError, train_section_problems
from moco_jax.config.finetune import BN_MODES, START_POINTS
from moco_jax.config.ranges import range_problems
from moco_jax.data import inputs
from moco_jax.evaluation import classifier_loop, finetune_augment, layers
from moco_jax.models import build_backbone, is_vit
from moco_jax.runtime import checkpointing, paths
from moco_jax.runtime.mesh import AXIS, make_mesh, sharded_jit
from moco_jax.weights import pretrained, start_point
from moco_jax.experiment import steps_per_epoch, total_steps


@flax.struct.dataclass
class FinetuneState:
  """params: {'backbone', 'head'}; batch_stats: {'backbone'} ({} for a ViT);
  opt_state: optax state; step: int32 scalar; rng: raw uint32 key (2,), into
  which every step folds its number (a resumed run draws the same numbers)."""
  params: Any
  batch_stats: Any
  opt_state: Any
  step: jax.Array
  rng: jax.Array


class Classifier(nn.Module):
  """backbone -> features (N, F) float32 -> linear head (N, classes) float32.
  The head is initialised N(0, 0.01) with zero bias (the reference's new fc)."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, images, train: bool = True):
    features = self.backbone(images, train=train).astype(jnp.float32)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01),
                    bias_init=nn.initializers.zeros, name='head')(features)


def config_problems(config, num_devices: int, num_classes: int) -> list[str]:
  """Problems with a fine-tuning config, one line each."""
  problems = []
  for key in ('train.batch_size', 'eval.batch_size'):
    section, name = key.split('.')
    batch = config[section][name]
    if batch > 0 and batch % num_devices:   # batch <= 0: config/ranges.py
      problems.append(f'{key}={batch} is not a positive multiple of the '
                      f'{num_devices} devices')
  if config.init not in START_POINTS:
    problems.append(f'init={config.init!r} is not one of {", ".join(START_POINTS)}')
  if config.dtype not in ('float32', 'bfloat16'):
    problems.append(f"dtype={config.dtype!r} is not 'float32' or 'bfloat16'")
  if config.finetune.bn not in BN_MODES:
    problems.append(f'finetune.bn={config.finetune.bn!r} is not one of {", ".join(BN_MODES)}')
  if num_classes <= 0:
    problems.append(f'data.dataset={config.data.dataset!r} ({config.data.train_split}) '
                    f'has no class labels: fine-tuning needs a labelled dataset')
  elif config.finetune.num_classes and config.finetune.num_classes != num_classes:
    problems.append(f'finetune.num_classes={config.finetune.num_classes} but '
                    f'data.dataset={config.data.dataset!r} has {num_classes} classes; '
                    f'set it to {num_classes} or 0 (the dataset\'s)')
  if config.optim.name not in optim.OPTIMIZERS:
    problems.append(f'optim.name={config.optim.name!r} is not one of '
                    f'{", ".join(optim.OPTIMIZERS)}')
  if config.optim.schedule not in optim.SCHEDULES:
    problems.append(f'optim.schedule={config.optim.schedule!r} is not one of '
                    f'{", ".join(optim.SCHEDULES)}')
  if not 0 < config.optim.layer_decay <= 1:
    problems.append(f'optim.layer_decay={config.optim.layer_decay} is not in (0, 1]')
  for key in ('label_smoothing', 'random_erasing', 'mix_switch_prob', 'drop_path'):
    if not 0 <= config.finetune[key] <= 1:
      problems.append(f'finetune.{key}={config.finetune[key]} is not in [0, 1]')
  for key in ('mixup_alpha', 'cutmix_alpha', 'head_warmup_epochs'):
    if config.finetune[key] < 0:
      problems.append(f'finetune.{key}={config.finetune[key]} is negative')
  return range_problems(config) + problems + train_section_problems(config)


class Finetune:
  """Everything derived from a fine-tuning config and its start point."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.mesh = mesh or make_mesh()
    config = config.copy_and_resolve_references()
    if config.pretrained and paths.absolute(workdir) == paths.absolute(config.pretrained):
      raise ConfigError(f'--workdir={workdir} is the start point itself; give '
                        f'fine-tuning its own workdir')
    self.checkpointer = None
    resuming = False
    saved = _saved_config(workdir)
    if saved is not None:
      resuming = True
      problems = _resume_problems(saved, config)
      if problems:
        raise ConfigError(f'--workdir={workdir} holds a fine-tuning run of another '
                          f'setup: {"; ".join(problems)}; use a new workdir')
      if config.pretrained_step < 0:   # the step the run started from
        config.pretrained_step = saved.pretrained_step
    self.info = inputs.dataset_info(config.data)
    problems = config_problems(config, self.mesh.size, self.info.num_classes)
    if problems:
      raise ConfigError('; '.join(problems))
    start = start_point.resolve(config, self.mesh, with_weights=not resuming)
    if start.step >= 0:
      config.pretrained_step = start.step
    self._build(config, start)
    self.checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)

  @classmethod
  def without_run(cls, config: ml_collections.ConfigDict, info, start, mesh) -> 'Finetune':
    """The model, optimiser, state shapes and steps of `config` on `mesh`
    for a dataset described by `info` and a StartPoint without weights: no
    workdir, no data read (moco_jax.plan compiles its train_step).

    Raises:
      ConfigError: one line.
    """
    problems = config_problems(config, mesh.size, info.num_classes)
    if problems:
      raise ConfigError('; '.join(problems))
    run = cls.__new__(cls)
    run.mesh, run.info, run.checkpointer = mesh, info, None
    run._build(config.copy_and_resolve_references(), start)
    return run

  def _build(self, config, start):
    """Everything derived from the config, self.info and the start point."""
    self.start = start
    self.config = config
    self.epoch_steps = steps_per_epoch(config, self.info)   # DatasetError if 0
    self.total_steps = total_steps(config, self.epoch_steps)
    self.schedule = optim.learning_rate_schedule(
        config.optim, config.train.batch_size, self.epoch_steps, self.total_steps)
    self.optimizer = optim.build_optimizer(config.optim, self.schedule)
    dtype = jnp.dtype(config.dtype)
    backbone = build_backbone(self.start.model, bn_groups=1, dtype=dtype,
                              conv_impl=config.model.conv_impl,
                              image_size=config.data.image_size)
    if config.finetune.drop_path > 0:
      if not is_vit(self.start.model.arch):
        raise ConfigError(f'finetune.drop_path={config.finetune.drop_path} needs a '
                          f'ViT; {self.start.model.arch} has no stochastic depth')
      backbone = backbone.clone(drop_path=config.finetune.drop_path)
    self.model = Classifier(backbone, self.info.num_classes)
    self.head_warmup_steps = int(round(config.finetune.head_warmup_epochs *
                                       self.epoch_steps))
    self.replicated = NamedSharding(self.mesh, P())
    abstract = jax.eval_shape(self._create, jax.random.PRNGKey(0))
    try:
      self.scales = layers.update_scales(abstract.params, config.finetune.freeze_to,
                                         config.optim.layer_decay)
      self.bn_scales = layers.update_scales(abstract.batch_stats,
                                            config.finetune.freeze_to, 1.0)
    except ValueError as error:
      raise ConfigError(str(error)) from None
    self.abstract = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.replicated),
        abstract)

  def _create(self, rng):
    init_rng, state_rng = jax.random.split(rng)
    size = self.config.data.image_size
    variables = self.model.init(init_rng, jnp.zeros((1, size, size, 3)), train=False)
    params = variables['params']
    return FinetuneState(params=params, batch_stats=variables.get('batch_stats', {}),
                         opt_state=self.optimizer.init(params),
                         step=jnp.zeros((), jnp.int32), rng=state_rng)

  def init_state(self) -> FinetuneState:
    """A fresh replicated state: the head (and a random backbone) from
    config.seed, the start point's backbone weights placed in it."""
    state = jax.jit(self._create, out_shardings=self.replicated)(
        jax.random.PRNGKey(self.config.seed))
    if self.start.variables is None:
      return state

    def place(new, old):
      new = np.asarray(new, old.dtype)
      if new.shape != old.shape:
        raise ConfigError(f'start point weights of shape {new.shape} do not fit '
                          f'the model\'s {old.shape}')
      return jax.device_put(new, self.replicated)

    backbone = self.start.variables
    params = dict(state.params, backbone=jax.tree.map(
        place, backbone['params'], state.params['backbone']))
    batch_stats = state.batch_stats
    if state.batch_stats:
      batch_stats = dict(state.batch_stats, backbone=jax.tree.map(
          place, backbone['batch_stats'], state.batch_stats['backbone']))
    # Every optimiser here starts from zeros whatever the params.
    return state.replace(params=params, batch_stats=batch_stats)

  def restore_or_init(self) -> FinetuneState:
    if self.checkpointer.latest_step() is None:
      return self.init_state()
    return self.checkpointer.restore(self.abstract)

  def train_step(self):
    """Jitted (state, images, labels) -> (state, metrics); images (B, S, S, 3)
    uint8 and labels (B,) sharded over 'data', the state replicated and donated."""
    config, model, optimizer = self.config, self.model, self.optimizer
    ft, num_classes = config.finetune, self.info.num_classes
    mean, std = self.start.mean, self.start.std
    # A ViT (no batch statistics) always runs in training mode: its drop-path.
    bn_train = ft.bn == 'train' or not self.bn_scales
    scales, bn_scales = self.scales, self.bn_scales
    is_backbone = layers.backbone_mask(scales)
    bn_is_backbone = layers.backbone_mask(bn_scales)
    warmup_steps, schedule = self.head_warmup_steps, self.schedule

    def step(state, images, labels):
      rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                               jax.lax.axis_index(AXIS))
      rng_erase, rng_mix, rng_drop = jax.random.split(rng, 3)
      x = augment.normalize(images, jnp.asarray(mean), jnp.asarray(std))
      x = finetune_augment.random_erasing(rng_erase, x, ft.random_erasing)
      x, targets = finetune_augment.mix_batch(
          rng_mix, x, labels, num_classes, ft.mixup_alpha, ft.cutmix_alpha,
          ft.mix_switch_prob, ft.label_smoothing)
      warming = state.step < warmup_steps
      scale = jax.tree.map(
          lambda s, b: jnp.where(b & warming, 0.0, s), scales, is_backbone)

      def loss_fn(params):
        variables = {'params': params, 'batch_stats': state.batch_stats}
        if bn_train:
          logits, updated = model.apply(variables, x, train=True,
                                        mutable=['batch_stats'],
                                        rngs={'dropout': rng_drop})
          batch_stats = updated.get('batch_stats', state.batch_stats)
        else:
          logits = model.apply(variables, x, train=False)
          batch_stats = state.batch_stats
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, (logits, batch_stats)

      (loss, (logits, batch_stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      grads = jax.lax.pmean(grads, AXIS)
      # Frozen layers (and the backbone in the head-only warm-up) see no
      # gradient, and their update, weight decay included, is scaled to 0.
      grads = jax.tree.map(lambda g, s: jnp.where(s > 0, g, 0.0), grads, scale)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      updates = jax.tree.map(lambda u, s: u * s, updates, scale)
      batch_stats = jax.lax.pmean(batch_stats, AXIS)
      batch_stats = jax.tree.map(
          lambda new, old, s, b: jnp.where((s > 0) & ~(b & warming), new, old),
          batch_stats, state.batch_stats, bn_scales, bn_is_backbone)
      metrics = jax.lax.pmean({
          'loss': loss,
          'train_top1': 100 * jnp.mean(jnp.argmax(logits, -1) == labels)}, AXIS)
      metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
      return state.replace(params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state,
                           step=state.step + 1), metrics

    return sharded_jit(step, self.mesh, in_specs=(P(), P(AXIS), P(AXIS)),
                       out_specs=(P(), P()), donate=(0,))

  def eval_step(self):
    """Jitted (params, batch_stats, images, labels, mask) -> {'top1', 'top5',
    'count'}: correct and valid examples of the global batch."""
    model, mean, std = self.model, self.start.mean, self.start.std

    def step(params, batch_stats, images, labels, mask):
      x = augment.normalize(images, jnp.asarray(mean), jnp.asarray(std))
      logits = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=False)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      hits = top5 == labels[:, None]
      return jax.lax.psum({'top1': jnp.sum(hits[:, 0] & mask),
                           'top5': jnp.sum(jnp.any(hits, axis=1) & mask),
                           'count': jnp.sum(mask)}, AXIS)

    return sharded_jit(step, self.mesh, out_specs=P(),
                       in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)))

  def evaluate(self, eval_step, state, batches) -> dict:
    """{'finetune_top1', 'finetune_top5'}: percent of data.eval_split."""
    return classifier_loop.accuracy('finetune', batches, lambda batch: eval_step(
        state.params, state.batch_stats, batch['image'], batch['label'], batch['mask']))


def _saved_config(workdir: str):
  try:
    return pretrained.load_config(workdir)
  except pretrained.PretrainedError:
    return None   # a fresh run


# What a resumed fine-tuning run must share with the run that saved it: the
# state's shapes and the meaning of its step.
RESUME_KEYS = ('pretrained', 'init', 'data.dataset', 'data.train_split',
               'data.labels_per_class', 'data.labels_seed', 'data.image_size', 'model.arch',
               'train.batch_size', 'seed')


def _lookup(config, dotted: str):
  for key in dotted.split('.'):
    if key not in config:   # saved before the key existed: its default then
      return {'labels_per_class': 0, 'labels_seed': 0}[key]
    config = config[key]
  return config


def _resume_problems(saved, config) -> list[str]:
  problems = []
  for key in RESUME_KEYS:
    old, new = _lookup(saved, key), _lookup(config, key)
    if old != new:
      problems.append(f'{key} was {old!r}, now {new!r}')
  return problems


def finetune(config: ml_collections.ConfigDict, workdir: str, *,
             second_interrupt: str = 'raise') -> dict:
  """Fine-tunes and evaluates; resumes from workdir.

  As pretraining: at most one step in flight (the bar counts completed
  steps), SIGTERM or Ctrl-C saves the current step and returns {} (rerun to
  resume), a second Ctrl-C as `preemption.StopRequests(second_interrupt)`.

  Returns:
    The last {'finetune_top1', 'finetune_top5'} and the best so far
    {'finetune_best_top1', 'finetune_best_epoch'} (percent, epochs); {} when
    stopped.

  Raises:
    ConfigError, DatasetError, PretrainedError (one line each) before
    anything is written; health.NonFiniteError if the loss becomes NaN/Inf.
  """
  run = Finetune(config, workdir)
  config, checkpointer = run.config, run.checkpointer
  state = run.restore_or_init()
  start_step, last_step = int(state.step), run.total_steps
  is_main = jax.process_index() == 0
  say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
  if start_step > 0:
    say(f'finetune: resumed from step {start_step} of {checkpointer.path(start_step)}')
  else:
    say(f'finetune: {config.init} start from {run.start.description}; '
        f'{run.info.num_examples} labelled images of {run.info.name} '
        f'{config.data.train_split}, {run.info.num_classes} classes, '
        f'{last_step} steps')
  train_step, eval_step = run.train_step(), run.eval_step()
  state, results = classifier_loop.train_classifier(
      'finetune', config, workdir, run.mesh, checkpointer, state,
      train_step=train_step,
      evaluate=lambda s, batches: run.evaluate(eval_step, s, batches),
      epoch_steps=run.epoch_steps, last_step=last_step, num_classes=run.info.num_classes,
      second_interrupt=second_interrupt)
  if not results:
    return {}
  say(f'finetune: top1 {results["finetune_top1"]:.2f} top5 {results["finetune_top5"]:.2f} '
      f'after {last_step} steps (last epoch); best top1 {results["finetune_best_top1"]:.2f} '
      f'at epoch {results["finetune_best_epoch"]:g}; from '
      f'{config.init} {run.start.description}')
  return results
