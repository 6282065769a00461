"""One upgrade step for configs saved by older versions of moco_jax.

A checkpoint's saved config lacks the keys added after it was written. The
code that reads a run's config (export, kNN, linear evaluation,
load_pretrained) reads every key directly; `upgrade` fills the missing ones
once, when a saved config is loaded (weights/pretrained.load_config), with
the value that reproduces how the old run behaved. That value is
base_config()'s default except where the default changed later (noted).

Keys that were renamed rather than added are left as saved (an old
moco.bn_splits stays; shapes never depend on it), so a saved config still
says what the old run was.
"""
import ml_collections

# dotted key -> its value for runs saved before the key existed.
ADDED_KEYS = {
    'model.conv_impl': 'xla',           # base_config's 'auto' came later
    'model.predictor': False,
    'model.stop_grad_conv1': False,
    'moco.symmetric': False,
    'moco.momentum_schedule': 'constant',
    'data.fused_jpeg_crop': False,
    'data.on_device': False,
    'data.on_device_max_fraction': 0.25,
    'train.stop_on_collapse': False,
    'eval.knn_features': 'backbone',
    'data.loader': 'tf.data',           # base_config's 'auto' may pick Grain
    'data.worker_count': 'auto',
    'eval.fewshot_every': 0.0,
    'eval.fewshot_shots': (1, 5, 10, 25),
    'eval.fewshot_seeds': 3,
    'eval.fewshot_l2_reg': 1.0,
}


def missing_keys(config: ml_collections.ConfigDict) -> list[str]:
  """The ADDED_KEYS that `config` lacks."""
  missing = []
  for dotted in ADDED_KEYS:
    section, key = dotted.split('.')
    if section not in config or key not in config[section]:
      missing.append(dotted)
  return missing


def upgrade(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Fills the ADDED_KEYS that `config` (a saved pretraining config) lacks,
  in place; returns it. Sections absent altogether are left absent."""
  for dotted in missing_keys(config):
    section, key = dotted.split('.')
    if section in config:
      with config.unlocked():
        config[section][key] = ADDED_KEYS[dotted]
  return config
