"""Few-shot linear evaluation in closed form (big_vision's protocol, on L2-normalised features).

For each seed and each shot count k, k training images of every class are
drawn (data/subset.py: per class, a permutation by
np.random.default_rng(seed), its first k), their frozen backbone features
(BN in inference mode, the evaluation transform) are L2-normalised, and a
ridge regression from the features to one-hot targets is solved exactly:

  W = argmin ||Xc W - Yc||^2 + l2_reg ||W||^2,   b = mean(Y) - mean(X) W

(Xc, Yc: features and targets centred on the k-shot set, so the bias is not
regularised). Each image of data.eval_split is classified as
argmax(x W + b). The result per k is the mean and the standard deviation
(ddof 1) over the seeds of the top-1 accuracy, in percent.

Differences from big_vision's fewshot_lsr (which reads the whole training
split's features, standardises every dimension on the k-shot set, adds a
bias feature of 100 and targets in {-1, 1}, and uses l2_reg 2^10): features
are L2-normalised instead of standardised, the bias is exactly unregularised
(with targets in {-1, 1} the predictions would be the same), and only the
k-shot images' features are computed. The command line is moco_jax/fewshot.py;
pretraining runs it every eval.fewshot_every epochs (train.py).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from moco_jax.config.base import base_config
from moco_jax.config.checks import ConfigError
from moco_jax.augment.normalization import MEAN_STD
from moco_jax.data import inputs
from moco_jax.data.info import DatasetError
from moco_jax.evaluation import knn

# eval.fewshot_shots, _seeds, _l2_reg as config/base.py sets them (runs
# saved before the keys existed get these). The l2_reg of 1: big_vision's
# 2^10 is for standardised features, whose squared norm is about their width
# D (512 to 2048 here), i.e. 2^10 / D = 0.5 to 2 on unit-norm features.
_EVAL_DEFAULTS = base_config().eval
DEFAULT_SHOTS = tuple(_EVAL_DEFAULTS.fewshot_shots)
DEFAULT_SEEDS = _EVAL_DEFAULTS.fewshot_seeds
DEFAULT_L2_REG = _EVAL_DEFAULTS.fewshot_l2_reg


def settings(config, shots=None, seeds=None, l2_reg=None) -> tuple:
  """(shots, seeds, l2_reg): the arguments given, else eval.fewshot_*."""
  pick = lambda given, key, default: config.eval.get(key, default) if given is None else given
  return (tuple(pick(shots, 'fewshot_shots', DEFAULT_SHOTS)),
          pick(seeds, 'fewshot_seeds', DEFAULT_SEEDS),
          pick(l2_reg, 'fewshot_l2_reg', DEFAULT_L2_REG))


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ridge_classifier(features, labels, num_classes: int, l2_reg: float):
  """The closed-form ridge regression of one-hot targets on features.

  Args:
    features: (N, F) float.
    labels: (N,) int in [0, num_classes).
    num_classes: C.
    l2_reg: the penalty on W (> 0); the bias is not penalised.

  Returns:
    (W (F, C), b (C,)) float64 NumPy: scores = features @ W + b. Solved in
    the primal (F x F system) when N >= F, else in the dual (N x N).
  """
  x = np.asarray(features, np.float64)
  y = np.eye(num_classes)[np.asarray(labels)]
  x_mean, y_mean = x.mean(axis=0), y.mean(axis=0)
  xc, yc = x - x_mean, y - y_mean
  n, f = xc.shape
  if n >= f:
    w = np.linalg.solve(xc.T @ xc + l2_reg * np.eye(f), xc.T @ yc)
  else:
    w = xc.T @ np.linalg.solve(xc @ xc.T + l2_reg * np.eye(n), yc)
  return w, y_mean - x_mean @ w


def few_shot_accuracy(train_features, train_labels, test_features, test_labels,
                      num_classes: int, l2_reg: float = DEFAULT_L2_REG) -> float:
  """Top-1 (percent) of the ridge classifier fit on the L2-normalised train
  features, on the L2-normalised test features.

  Args:
    train_features: (N, F) frozen features of the k-shot images.
    train_labels: (N,) int.
    test_features: (T, F).
    test_labels: (T,) int.
    num_classes: C; labels must lie in [0, C).
    l2_reg: the ridge penalty (see DEFAULT_L2_REG).

  Raises:
    ValueError: a label outside [0, num_classes).
  """
  for name, labels in (('training', train_labels), ('test', test_labels)):
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
      raise ValueError(f'{name} labels span [{labels.min()}, {labels.max()}]: '
                       f'not within the {num_classes} classes')
  w, b = ridge_classifier(l2_normalize(np.asarray(train_features, np.float64)),
                          train_labels, num_classes, l2_reg)
  scores = l2_normalize(np.asarray(test_features, np.float64)) @ w + b
  return 100.0 * float(np.mean(np.argmax(scores, axis=1) == np.asarray(test_labels)))


def summarize(accuracies: dict) -> dict:
  """{shots: [top-1 per seed]} -> {'fewshot_{k}shot_top1': mean,
  'fewshot_{k}shot_top1_std': std over seeds (ddof 1; 0 for one seed)}."""
  out = {}
  for shots, values in sorted(accuracies.items()):
    values = np.asarray(values, np.float64)
    out[f'fewshot_{shots}shot_top1'] = float(values.mean())
    out[f'fewshot_{shots}shot_top1_std'] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
  return out


def check_shots(shots, seeds: int) -> tuple:
  shots = tuple(int(k) for k in shots)
  if not shots or min(shots) <= 0:
    raise ConfigError(f'few-shot counts {list(shots)} must be positive integers, '
                      f'e.g. 1,5,10,25')
  if seeds <= 0:
    raise ConfigError(f'few-shot seeds={seeds} must be at least 1')
  return shots


class FewShotEvaluator:
  """Few-shot top-1 of a backbone: k-shot images from data.train_split,
  queries data.eval_split (the config's data section), backbone features.

  Usage: `FewShotEvaluator(config, mesh)(params, batch_stats)` with the
  backbone's variables (or the whole encoder's: {'backbone', 'head'}) ->
  summarize()'s dict. eval.batch_size (global) must divide by the devices.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh, shots=None,
               seeds: int | None = None, l2_reg: float | None = None,
               on_device: bool | None = None):
    """shots, seeds, l2_reg: default eval.fewshot_shots, _seeds, _l2_reg.
    on_device: the run's input decision (data/inputs.on_device); None: this
    evaluator's own run decides it once."""
    shots, seeds, l2_reg = settings(config, shots, seeds, l2_reg)
    batch = config.eval.batch_size
    if batch <= 0 or batch % mesh.size:
      raise ConfigError(f'eval.batch_size={batch} must be a positive multiple of '
                       f'the {mesh.size} devices')
    self.shots, self.seeds = check_shots(shots, seeds), seeds
    if l2_reg <= 0:
      raise ConfigError(f'few-shot l2_reg={l2_reg} must be positive')
    self.config, self.mesh, self.l2_reg = config, mesh, l2_reg
    self.num_classes = inputs.dataset_info(config.data).num_classes
    if self.num_classes <= 0:
      raise DatasetError(
          f'data.dataset {config.data.dataset!r} has no class labels for few-shot '
          f'evaluation')
    self.local_batch = batch // jax.process_count()
    # Checks every k-shot draw up front (one line for too few examples).
    self._train_configs = {}
    for seed in range(seeds):
      for k in self.shots:
        data = self._subset_config(k, seed)
        try:
          inputs.dataset_info(data)
        except DatasetError as error:
          raise DatasetError(f'{k}-shot evaluation: {error}') from None
        self._train_configs[k, seed] = data
    if on_device is None:
      on_device = inputs.on_device(config.data, mesh, with_eval=True)[0]
    self.on_device = on_device
    self.test_batches = inputs.eval_batches(config.data, config.data.eval_split,
                                            self.local_batch, mesh, on_device)
    mean, std = MEAN_STD[config.data.normalization]
    features = knn.features_fn(knn.backbone_from_config(config), mean, std)
    # Replicated outputs: every process gets the whole global batch.
    self._features = jax.jit(
        lambda params, batch_stats, images, labels, mask: (
            features(params, batch_stats, images), labels, mask),
        out_shardings=NamedSharding(mesh, P()))

  def _subset_config(self, shots: int, seed: int):
    data = ml_collections.ConfigDict(self.config.data.to_dict())
    data.labels_per_class, data.labels_seed = shots, seed
    data.cache = False
    return data

  def split_features(self, params, batch_stats, batches):
    """(features (N, F) float32, labels (N,)) of every example of `batches`."""
    features, labels = [], []
    for batch in batches:
      out, label, mask = jax.device_get(self._features(
          params, batch_stats, batch['image'], batch['label'], batch['mask']))
      features.append(out[mask])
      labels.append(label[mask])
    return np.concatenate(features), np.concatenate(labels)

  def accuracies(self, params, batch_stats) -> dict:
    """{shots: [top-1 percent per seed]}."""
    if 'backbone' in params:   # the whole encoder's variables
      params, batch_stats = params['backbone'], batch_stats.get('backbone', {})
    test_x, test_y = self.split_features(params, batch_stats, self.test_batches)
    results = {k: [] for k in self.shots}
    for (k, seed), data in self._train_configs.items():
      train_x, train_y = self.split_features(params, batch_stats, inputs.eval_batches(
          data, data.train_split, self.local_batch, self.mesh, self.on_device))
      results[k].append(few_shot_accuracy(train_x, train_y, test_x, test_y,
                                          self.num_classes, self.l2_reg))
    return results

  def __call__(self, params, batch_stats) -> dict:
    return summarize(self.accuracies(params, batch_stats))



def periodic_evaluator(config, mesh, epoch_steps: int, on_device: bool):
  """(evaluator, every_steps) for pretraining: eval.fewshot_every epochs
  (fractions allowed) and the last step; (None, 0) when it is 0 (default).
  on_device: the run's input decision (Experiment.on_device).
  Built before anything compiles, so a bad setting fails fast."""
  every = config.eval.fewshot_every
  if every <= 0:
    return None, 0
  return (FewShotEvaluator(config, mesh, on_device=on_device),
          max(1, round(every * epoch_steps)))


def log(evaluator, state, step: int, writer, bar) -> dict:
  """Runs `evaluator` on the query encoder of `state`; writes the metrics and
  one line per shot count."""
  metrics = evaluator(state.params, state.batch_stats)
  writer.write(step, metrics)
  bar.write(f'step {step}: few-shot top-1 ' + ', '.join(
      f'{k}-shot {metrics[f"fewshot_{k}shot_top1"]:.2f}' for k in evaluator.shots))
  return metrics
