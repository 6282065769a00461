"""Command line: MoCo pretraining.

  python -m moco_jax.main --config=configs/NAME.py --workdir=DIR [--config.a.b=v ...]

Any config value can be overridden: --config.moco.queue_size=4096;
--show_config prints the resolved config and exits. Rerun the same command to
resume from the newest checkpoint in DIR. Ctrl-C or SIGTERM: finish the step,
save, exit 0; a second Ctrl-C exits at once (130).
Several processes (hosts): the same command on each, plus either
--distributed (Cloud TPU pods, SLURM, Open MPI: JAX finds the others) or
--coordinator_address=HOST:PORT --num_processes=N --process_id=i.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging
from ml_collections import config_flags

from moco_jax.runtime import cli

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  cli.check_flagfiles(sys.argv)   # before config_flags reads them (one line, not a traceback)
  config_flags.DEFINE_config_file('config', None, 'Path to a config file (a recipe '
                                  'in configs/).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
  flags.DEFINE_bool('show_config', False, 'Print the resolved config and exit.')
  flags.DEFINE_bool('distributed', False,
                    'Join a multi-process run that JAX detects by itself (Cloud '
                    'TPU pod, SLURM, Open MPI); run the same command on every host.')
  flags.DEFINE_string('coordinator_address', None,
                      'HOST:PORT of process 0 for a multi-process run started by '
                      'hand (with --num_processes and --process_id).')
  flags.DEFINE_integer('num_processes', None, 'Processes in the multi-process run.')
  flags.DEFINE_integer('process_id', None, "This process's index, 0…num_processes-1.")
  flags.DEFINE_float('coordinator_timeout', 300.0,
                     'Seconds a multi-process start may wait for the coordinator '
                     'and the other processes before it stops with one line.')


FLAG_NAMES = ('config', 'workdir', 'show_config', 'distributed', 'coordinator_address',
              'num_processes', 'process_id', 'coordinator_timeout')


def usage() -> str:
  return (f'{__doc__.strip()}\n\nrecipes (--config=...):\n{cli.recipe_list("pretrain")}\n\n'
          f'flags:\n{cli.flag_help(FLAGS, FLAG_NAMES)}\n\nconfig sections: model, moco, '
          f'data, optim, train, eval, seed, dtype (--config=X --show_config lists every key)')


def parse_flags(argv):
  """absl's parsing: --help exits 0, every problem is one line (exit 2)."""
  return cli.parse_command_line(
      FLAGS, argv, usage, config_kind='pretrain',
      problem=lambda: None if FLAGS.show_config else cli.workdir_problem(FLAGS.workdir))

def load_config():
  return cli.config_of_kind(FLAGS, 'moco', 'a pretraining config (no moco section); linear '
                            'evaluation runs with python -m moco_jax.lincls')


def main(argv):
  del argv  # checked by parse_flags
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info lines drown the bar
  config = load_config()
  if FLAGS.show_config:
    print(cli.config_text(config))
    return
  # Before anything asks JAX for devices (a config may: configs/quickstart.py):
  # JAX joins a cluster only before its backends start.
  from moco_jax.runtime import distributed
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, auto=FLAGS.distributed,
                           timeout_s=FLAGS.coordinator_timeout)
  except distributed.DistributedError as error:
    cli.fail(error)
  cli.import_tensorflow_quietly()
  # Imported after flag parsing: JAX and TensorFlow take seconds to load.
  from moco_jax import train
  from moco_jax.config.checks import ConfigError
  from moco_jax.data.info import DatasetError
  from moco_jax.runtime.checkpointing import CheckpointError
  from moco_jax.evaluation.collapse import CollapseError
  from moco_jax.runtime.health import NonFiniteError
  from moco_jax.weights.convert import WeightsError
  try:
    train.train_and_evaluate(config, FLAGS.workdir, second_interrupt='exit')
  except (ConfigError, DatasetError, CheckpointError, WeightsError) as error:
    cli.fail(error)
  except (NonFiniteError, CollapseError) as error:
    cli.fail(error, code=3)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
