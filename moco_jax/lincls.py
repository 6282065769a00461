"""Command line: linear evaluation of a pretraining run.

  python -m moco_jax.lincls --config=configs/lincls_cifar10.py --workdir=OUT \
      --config.pretrained=PRETRAIN_DIR

The protocol is described in moco_jax/evaluation/linear.py.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from moco_jax.config.checks import ConfigError
from moco_jax.data.sources import DatasetError
from moco_jax.evaluation.linear import linear_evaluation
from moco_jax.weights.pretrained import PretrainedError


def main(argv):
  from absl import app, flags, logging
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info lines
  try:
    linear_evaluation(flags.FLAGS.config, flags.FLAGS.workdir)
  except (ConfigError, DatasetError, PretrainedError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


def _define_flags():
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file('config', None, 'Path to a lincls config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
  flags.mark_flags_as_required(['config', 'workdir'])


if __name__ == '__main__':
  from absl import app
  _define_flags()  # here, not at import: tests import this module
  app.run(main)
