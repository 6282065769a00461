"""Command line: linear evaluation of a pretraining run.

  python -m moco_jax.lincls --config=configs/lincls_cifar10.py --workdir=OUT \\
      --config.pretrained=PRETRAIN_DIR

The protocol is described in moco_jax/evaluation/linear.py. Rerun the same
command to resume; Ctrl-C or SIGTERM saves the current step first (a second
Ctrl-C exits at once).
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging
from ml_collections import config_flags

from moco_jax.runtime import cli

FLAGS = flags.FLAGS
FLAG_NAMES = ('config', 'workdir')


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  cli.check_flagfiles(sys.argv)   # before config_flags reads them (one line, not a traceback)
  config_flags.DEFINE_config_file('config', None, 'Path to a lincls config file '
                                  '(configs/lincls_*.py).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')


def main(argv):
  del argv  # checked by parse_flags
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info lines
  cli.import_tensorflow_quietly()
  from moco_jax.config.checks import ConfigError
  from moco_jax.data.info import DatasetError
  from moco_jax.evaluation.linear import linear_evaluation
  from moco_jax.weights.pretrained import PretrainedError
  from moco_jax.runtime.health import NonFiniteError
  try:
    linear_evaluation(load_config(), FLAGS.workdir, second_interrupt='exit')
  except (ConfigError, DatasetError, PretrainedError) as error:
    cli.fail(error)
  except NonFiniteError as error:
    cli.fail(error, code=3)


def usage() -> str:
  return (f'{__doc__.strip()}\n\nrecipes (--config=...):\n{cli.recipe_list("lincls")}\n\n'
          f'flags:\n{cli.flag_help(FLAGS, FLAG_NAMES)}\n'
          f'  --config.SECTION.KEY=VALUE: override a config value')


def parse_flags(argv):
  """absl's parsing: --help exits 0, every problem is one line (exit 2)."""
  return cli.parse_command_line(
      FLAGS, argv, usage, config_kind='lincls',
      problem=lambda: cli.workdir_problem(FLAGS.workdir))

def load_config():
  return cli.config_of_kind(FLAGS, 'pretrained', 'a linear-evaluation config (no `pretrained` '
                            'key; use configs/lincls_*.py); pretraining runs with python -m '
                            'moco_jax.main')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
