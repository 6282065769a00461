"""Command line: python -m moco_jax.main --config=configs/NAME.py --workdir=DIR.

Any config value can be overridden: --config.moco.queue_size=4096.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging
from ml_collections import config_flags

from moco_jax.config_checks import ConfigError
from moco_jax.input_pipeline import DatasetError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info lines drown the bar
  from moco_jax import train  # after flag parsing: jax/tf imports are slow
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DatasetError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main)
