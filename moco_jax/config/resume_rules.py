"""Which config keys a resumed pretraining run may not change, and why: the
saved state (queue, parameters, optimiser state, BN statistics, data
position) depends on them. train.restore_or_init refuses a checkpoint whose
saved config differs in one of them."""

# What a resumed run may not change: (config key, why the saved state depends
# on it). Each must equal the checkpoint's value; a key that one of the two
# configs lacks (older runs) is not compared. Everything else may change on
# resume, e.g. more steps or epochs, log/checkpoint intervals, kNN settings,
# data.data_dir, lr and schedule (docs/pretraining.md lists both).
RESUME_RULES = (
    ('train.batch_size', 'the queue pointer advances by the global batch and '
     'the data position is step x batch: another batch leaves queue rows stale '
     'and replays or skips images'),
    ('moco.symmetric', 'the queue pointer advances by 2B keys per step with the '
     'symmetric loss, by B without'),
    ('moco.queue_size', 'K is the shape of the saved queue'),
    ('moco.bn_groups', 'the saved running BN statistics and the shuffle BN '
     'of the run are over groups of B / bn_groups images'),
    ('model.dim', 'C is the width of the saved queue and of the head'),
    ('model.arch', 'the saved parameters are of this network'),
    ('model.width_multiplier', 'the saved parameters have these widths'),
    ('model.cifar_stem', 'the saved stem has this shape'),
    ('model.head', 'the saved head is of this kind'),
    ('model.head_hidden_dim', 'the saved head has this width'),
    ('model.predictor', 'the saved state holds (or lacks) the v3 predictor\'s '
     'parameters and optimiser state'),
    ('model.stop_grad_conv1', 'the saved optimiser state excludes (or '
     'includes) the frozen patch projection'),
    ('optim.name', 'the saved optimiser state is of this optimiser'),
    ('data.image_size', 'a ViT\'s saved position embeddings have one entry per '
     'patch of this image size (ResNets: allowed)'),
)
# Keys of RESUME_RULES that only matter for some runs: key -> predicate on the
# saved config.
_RULE_APPLIES = {
    'data.image_size': lambda saved: str(_lookup(saved, 'model.arch')).startswith('vit'),
}


def _lookup(config: dict, dotted: str, missing=None):
  value = config
  for key in dotted.split('.'):
    if not isinstance(value, dict) or key not in value:
      return missing
    value = value[key]
  return list(value) if isinstance(value, tuple) else value


def incompatibilities(saved_config: dict, config: dict) -> list[str]:
  """'key: saved in the checkpoint, new now (why)' for every RESUME_RULES
  entry that `config` changes."""
  problems = []
  missing = object()
  for key, why in RESUME_RULES:
    old, new = _lookup(saved_config, key, missing), _lookup(config, key, missing)
    if old is missing or new is missing or old == new:
      continue
    if key in _RULE_APPLIES and not _RULE_APPLIES[key](saved_config):
      continue
    problems.append(f'{key}: {old!r} in the checkpoint, {new!r} now ({why})')
  return problems
