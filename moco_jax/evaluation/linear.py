"""Linear evaluation of a pretraining run (the MoCo v1/v2 protocol); the
command line is moco_jax/lincls.py.

A linear layer is trained on features of the frozen query-encoder backbone
(BN in inference mode, features computed per step so crops can vary, no
gradient through the backbone), data-parallel over a 'data' mesh of every
device. OUT gets metrics.jsonl (`loss`, `train_top1`, `lr`; `lincls_top1`,
`lincls_top5` on data.eval_split), TensorBoard events and orbax checkpoints of
the linear layer (rerun the command to resume). At the end the backbone is
checked to be bit-identical to the pretrained checkpoint.

Each evaluation also logs the best top-1 so far and its epoch
(`lincls_best_top1`, `lincls_best_epoch`), as the reference's main_lincls.py
keeps best_acc1; the final line gives both the last and the best epoch.
`head_batch_norm=True` puts a parameter-free BatchNorm (no scale or shift;
torch's BatchNorm1d(affine=False) defaults: momentum 0.1, eps 1e-5) before
the linear layer, as MoCo v3's authors suggest for linear probes (moco-v3
issue 20; MAE's linear probe does the same). Its batch statistics are
averaged over all devices in training (the result does not depend on the
device count; the reference's DDP would use per-GPU ones) and its running
statistics are used in evaluation.
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
from moco_jax.runtime import checkpointing, paths
from moco_jax.evaluation import classifier_loop, knn
from moco_jax.data import inputs
from moco_jax.data.info import single_class_warning
from moco_jax.weights import pretrained
from moco_jax.config.checks import ConfigError, image_size_problems, train_section_problems
from moco_jax.config.ranges import range_problems
from moco_jax.runtime.mesh import AXIS, make_mesh, sharded_jit
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.experiment import steps_per_epoch, total_steps


class BackboneChangedError(RuntimeError):
  """A backbone tensor differs from the pretrained checkpoint's."""


@flax.struct.dataclass
class LinearState:
  """params: the linear layer {'kernel': (F, classes), 'bias': (classes,)};
  opt_state: its optax state; step: int32 scalar."""
  params: Any
  opt_state: Any
  step: jax.Array


@flax.struct.dataclass
class NormalizedLinearState(LinearState):
  """LinearState with head_batch_norm: params {'fc': {'kernel', 'bias'}} and
  batch_stats {'bn': {'mean', 'var'}} of the parameter-free BN (F,). A class
  of its own so that runs without it keep their checkpoint layout."""
  batch_stats: Any


def linear_head(num_classes: int) -> nn.Dense:
  """The reference's new fc: weights N(0, 0.01), bias 0."""
  return nn.Dense(num_classes, kernel_init=nn.initializers.normal(0.01),
                  bias_init=nn.initializers.zeros, name='fc')


class NormalizedLinearHead(nn.Module):
  """BatchNorm without scale or shift, then linear_head (head_batch_norm)."""
  num_classes: int

  @nn.compact
  def __call__(self, features, train: bool = False):
    features = nn.BatchNorm(use_running_average=not train, use_scale=False,
                            use_bias=False, momentum=0.9, epsilon=1e-5,
                            axis_name=AXIS if train else None, name='bn')(features)
    return linear_head(self.num_classes)(features)


def head_variables(state) -> dict:
  """{'params'[, 'batch_stats']} of a LinearState's head."""
  stats = getattr(state, 'batch_stats', None)
  return {'params': state.params, **({'batch_stats': stats} if stats is not None else {})}


def config_problems(config, num_devices: int, num_classes: int) -> list[str]:
  """Problems with a linear-evaluation config, one line each (each key's own
  range: config/ranges.py, checked before the data is opened)."""
  problems = []
  if not config.pretrained:
    problems.append('pretrained is empty: give --config.pretrained=PRETRAIN_DIR')
  for key in ('train.batch_size', 'eval.batch_size'):
    section, name = key.split('.')
    batch = config[section][name]
    if batch % num_devices:
      problems.append(f'{key}={batch} is not a positive multiple of the '
                      f'{num_devices} devices')
  if config.data.normalization not in MEAN_STD:
    problems.append(f'data.normalization={config.data.normalization!r} is not one of '
                    f'{", ".join(MEAN_STD)}, or empty for the pretraining run\'s')
  if num_classes <= 0:
    problems.append(f'data.dataset={config.data.dataset!r} has no class labels')
  if config.optim.name not in optim.OPTIMIZERS:
    problems.append(f'optim.name={config.optim.name!r} is not one of '
                    f'{", ".join(optim.OPTIMIZERS)}')
  if config.optim.schedule not in optim.SCHEDULES:
    problems.append(f'optim.schedule={config.optim.schedule!r} is not one of '
                    f'{", ".join(optim.SCHEDULES)}')
  return problems + train_section_problems(config)


def _logits_fn(backbone, head, mean, std):
  """logits(head_vars, backbone_vars, images, train) -> (logits, the head's
  new batch_stats or None)."""
  def logits(head_vars, backbone_vars, images, train=False):
    x = augment.normalize(images, mean, std)
    features = backbone.apply(backbone_vars, x, train=False)
    features = jax.lax.stop_gradient(features.astype(jnp.float32))
    if 'batch_stats' not in head_vars:
      return head.apply(head_vars, features), None
    if not train:
      return head.apply(head_vars, features, train=False), None
    out, updates = head.apply(head_vars, features, train=True, mutable=['batch_stats'])
    return out, updates['batch_stats']
  return logits


def make_train_step(mesh, logits_fn, optimizer, schedule):
  """Jitted (state, backbone_vars, images, labels) -> (state, metrics).

  images (B, S, S, 3) uint8 and labels (B,) are sharded over 'data'; the
  state is replicated and donated; backbone_vars are only read.
  """
  def step(state, backbone_vars, images, labels):
    def loss_fn(params):
      logits, stats = logits_fn(dict(head_variables(state), params=params),
                                backbone_vars, images, train=True)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, (logits, stats)

    (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = jax.lax.pmean(grads, AXIS)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    metrics = jax.lax.pmean({
        'loss': loss,
        'train_top1': 100 * jnp.mean(jnp.argmax(logits, -1) == labels)}, AXIS)
    metrics['lr'] = jnp.asarray(schedule(state.step), jnp.float32)
    new = dict(params=optax.apply_updates(state.params, updates),
               opt_state=opt_state, step=state.step + 1)
    if stats is not None:   # head_batch_norm; already averaged over AXIS
      new['batch_stats'] = stats
    return state.replace(**new), metrics

  return sharded_jit(step, mesh, in_specs=(P(), P(), P(AXIS), P(AXIS)),
                     out_specs=(P(), P()), donate=(0,))


def make_eval_step(mesh, logits_fn):
  """Jitted (head_vars, backbone_vars, images, labels, mask) ->
  {'top1', 'top5', 'count'}: correct and valid examples of the global batch."""
  def step(head_vars, backbone_vars, images, labels, mask):
    logits, _ = logits_fn(head_vars, backbone_vars, images)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hits = top5 == labels[:, None]
    return jax.lax.psum({'top1': jnp.sum(hits[:, 0] & mask),
                         'top5': jnp.sum(jnp.any(hits, axis=1) & mask),
                         'count': jnp.sum(mask)}, AXIS)

  return sharded_jit(step, mesh, out_specs=P(),
                     in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS)))


def check_backbone_unchanged(backbone_vars, reference_vars) -> None:
  """Raises BackboneChangedError unless every tensor is bit-identical."""
  got, want = jax.device_get(backbone_vars), jax.device_get(reference_vars)
  if jax.tree.structure(got) != jax.tree.structure(want):
    raise BackboneChangedError('the backbone variables changed structure')
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    if a.dtype != b.dtype or not np.array_equal(a, b):
      raise BackboneChangedError(
          f'backbone tensor {jax.tree_util.keystr(path)} differs from the '
          f'pretrained checkpoint after linear evaluation')


class LinearEval:
  """Everything derived from a linear-evaluation config and its pretrained run."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.mesh = mesh or make_mesh()
    config = config.copy_and_resolve_references()
    problems = range_problems(config)   # before any value is used
    if problems:
      raise ConfigError('; '.join(problems))
    if not config.pretrained:
      raise ConfigError('pretrained is empty: give --config.pretrained=PRETRAIN_DIR')
    if paths.absolute(workdir) == paths.absolute(config.pretrained):
      raise ConfigError(f'--workdir={workdir} is the pretraining run itself; give '
                        f'linear evaluation its own workdir')
    if config.pretrained_step < 0:
      # Resume on the backbone the run started with, even if newer ones exist.
      try:
        config.pretrained_step = pretrained.load_config(workdir).pretrained_step
      except pretrained.PretrainedError:
        pass  # a fresh run
    config.pretrained_step = pretrained.checkpoint_step(config.pretrained,
                                                        config.pretrained_step)
    pre_config = pretrained.load_config(config.pretrained, config.pretrained_step)
    if not config.data.normalization:
      config.data.normalization = pre_config.data.normalization
    problems = image_size_problems(pre_config.model.arch, config.data.image_size)
    if problems:   # before the data is opened
      raise ConfigError('; '.join(problems))
    self.info = inputs.dataset_info(config.data)
    # The evaluation split too, before anything is written to the workdir.
    inputs.dataset_info(config.data, config.data.eval_split)
    problems = config_problems(config, self.mesh.size, self.info.num_classes)
    if problems:
      raise ConfigError('; '.join(problems))
    if self.info.num_classes == 1 and jax.process_index() == 0:
      print(single_class_warning('lincls_top1', config.data), flush=True)
    self.config, self.pre_config = config, pre_config
    self.epoch_steps = steps_per_epoch(config, self.info)
    self.total_steps = total_steps(config, self.epoch_steps)
    # lr 30 is used as given at any batch size, as the reference does,
    # unless optim.scale_lr makes it per 256 images.
    lr_batch = config.train.batch_size if config.optim.scale_lr else 256
    self.schedule = optim.learning_rate_schedule(
        config.optim, lr_batch, self.epoch_steps, self.total_steps)
    self.optimizer = optim.build_optimizer(config.optim, self.schedule)
    self.batch_norm = bool(config.get('head_batch_norm', False))
    self.head = (NormalizedLinearHead(self.info.num_classes) if self.batch_norm
                 else linear_head(self.info.num_classes))
    mean, std = MEAN_STD[config.data.normalization]
    self.logits_fn = _logits_fn(knn.backbone_from_config(pre_config),
                                self.head, mean, std)
    self.replicated = NamedSharding(self.mesh, P())
    self.checkpointer = checkpointing.Checkpointer(workdir, config.train.keep_checkpoints)

  def load_backbone(self):
    """{'params', 'batch_stats'} of the pretrained query backbone."""
    run = pretrained.load(self.config.pretrained, self.mesh,
                          self.config.pretrained_step, self.pre_config)
    return {'params': run.params, 'batch_stats': run.batch_stats}

  def init_state(self):
    """A fresh replicated state (the linear layer from config.seed)."""
    num_features = knn.backbone_from_config(self.pre_config).num_features

    def create(rng):
      variables = self.head.init(rng, jnp.zeros((1, num_features)))
      params = variables['params']
      state = dict(params=params, opt_state=self.optimizer.init(params),
                   step=jnp.zeros((), jnp.int32))
      if self.batch_norm:
        return NormalizedLinearState(batch_stats=variables['batch_stats'], **state)
      return LinearState(**state)

    return jax.jit(create, out_shardings=self.replicated)(
        jax.random.PRNGKey(self.config.seed))

  def evaluate(self, eval_step, head_vars, backbone_vars, batches) -> dict:
    """{'lincls_top1', 'lincls_top5'}: percent of data.eval_split.
    head_vars: head_variables(state)."""
    return classifier_loop.accuracy('lincls', batches, lambda batch: eval_step(
        head_vars, backbone_vars, batch['image'], batch['label'], batch['mask']))


def startup_summary(run: LinearEval, workdir: str) -> str:
  """One line: devices, backbone, data, batch, lr and length, workdir."""
  config, pre = run.config, run.pre_config
  devices = list(run.mesh.devices.flat)
  lr = run.schedule(0) if config.optim.warmup_epochs <= 0 else config.optim.base_lr
  return (f'lincls: {len(devices)} {devices[0].platform.upper()} device'
          f'{"s" if len(devices) > 1 else ""}; frozen {pre.model.arch} backbone of '
          f'{config.pretrained} (step {config.pretrained_step}); {run.info.num_examples:,} '
          f'training images ({run.info.name} {config.data.train_split}), '
          f'{run.info.num_classes} classes, eval on {config.data.eval_split}; batch '
          f'{config.train.batch_size}, {config.optim.name} lr {float(lr):g} '
          f'({config.optim.schedule}); {run.total_steps:,} steps = '
          f'{run.total_steps / run.epoch_steps:.3g} epochs; workdir {paths.absolute(workdir)}')


def _restore_or_init(run: LinearEval):
  if run.checkpointer.latest_step() is None:
    return run.init_state()
  abstract = jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=run.replicated),
      jax.eval_shape(run.init_state))
  return run.checkpointer.restore(abstract)


def linear_evaluation(config: ml_collections.ConfigDict, workdir: str, *,
                      second_interrupt: str = 'raise') -> dict:
  """Trains and evaluates the linear layer; resumes from workdir.

  As pretraining: at most one step in flight (the bar counts completed
  steps), SIGTERM or Ctrl-C saves the current step and returns {} (rerun to
  resume), a second Ctrl-C as `preemption.StopRequests(second_interrupt)`.

  Returns:
    The final {'lincls_top1', 'lincls_top5'} (percent); {} when stopped.

  Raises:
    BackboneChangedError if the backbone no longer equals the checkpoint's.
    health.NonFiniteError if the loss becomes NaN/Inf (nothing saved after).
  """
  run = LinearEval(config, workdir)
  config, checkpointer = run.config, run.checkpointer
  backbone_vars = run.load_backbone()
  state = _restore_or_init(run)
  start_step, last_step = int(state.step), run.total_steps
  is_main = jax.process_index() == 0
  say = (lambda line: print(line, flush=True)) if is_main else (lambda line: None)
  say(startup_summary(run, workdir))
  if start_step > 0:
    say(f'lincls: resumed from step {start_step} of {checkpointer.path(start_step)}')
  train_step = make_train_step(run.mesh, run.logits_fn, run.optimizer, run.schedule)
  eval_step = make_eval_step(run.mesh, run.logits_fn)
  state, results = classifier_loop.train_classifier(
      'lincls', config, workdir, run.mesh, checkpointer, state,
      train_step=lambda s, *batch: train_step(s, backbone_vars, *batch),
      evaluate=lambda s, batches: run.evaluate(eval_step, head_variables(s), backbone_vars,
                                               batches),
      epoch_steps=run.epoch_steps, last_step=last_step, num_classes=run.info.num_classes,
      second_interrupt=second_interrupt)
  if not results:
    return {}
  # As the reference's sanity check: the frozen backbone must equal the
  # checkpoint it was loaded from, tensor by tensor.
  check_backbone_unchanged(backbone_vars, run.load_backbone())
  say(f'lincls: top1 {results["lincls_top1"]:.2f} top5 {results["lincls_top5"]:.2f} '
      f'after {last_step} steps (last epoch); best top1 {results["lincls_best_top1"]:.2f} '
      f'at epoch {results["lincls_best_epoch"]:g}; on {config.pretrained} '
      f'(step {config.pretrained_step}); backbone unchanged')
  return results
