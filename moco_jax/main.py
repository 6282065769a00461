"""Command line: python -m moco_jax.main --config=configs/NAME.py --workdir=DIR.

Any config value can be overridden: --config.moco.queue_size=4096.
Several processes (hosts): the same command on each, plus either
--distributed (Cloud TPU pods, SLURM, Open MPI: JAX finds the others) or
--coordinator_address=HOST:PORT --num_processes=N --process_id=i.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging
from ml_collections import config_flags


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
flags.mark_flags_as_required(['config', 'workdir'])
flags.DEFINE_bool('distributed', False,
                  'Join a multi-process run that JAX detects by itself (Cloud '
                  'TPU pod, SLURM, Open MPI); run the same command on every host.')
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0 for a multi-process run started by '
                    'hand (with --num_processes and --process_id).')
flags.DEFINE_integer('num_processes', None, 'Processes in the multi-process run.')
flags.DEFINE_integer('process_id', None, "This process's index, 0…num_processes-1.")


def parse_flags(argv):
  """absl's parsing, with a bad --config file or override as a one-line error."""
  try:
    argv = FLAGS(argv)
    FLAGS.config.seed  # config_flags defers file errors to the first access
    return argv
  except Exception as error:  # config_flags raises KeyError, AttributeError, …
    while error.args and isinstance(error.args[0], Exception):
      error = error.args[0]  # unwrap AttributeError(KeyError(message))
    if isinstance(error, OSError) and error.__cause__ is not None:
      error = error.__cause__  # the file that failed to load, not the retry
    message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    print(f'error: invalid command line: {" ".join(message.split())}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax/tfds info lines drown the bar
  # Before anything asks JAX for devices: JAX joins a cluster only before its
  # backends start.
  from moco_jax.runtime import distributed
  try:
    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, auto=FLAGS.distributed)
  except distributed.DistributedError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  # Imported after flag parsing: JAX and TensorFlow take seconds to load.
  from moco_jax import train
  from moco_jax.runtime.checkpointing import CheckpointError
  from moco_jax.config.checks import ConfigError
  from moco_jax.weights.convert import WeightsError
  from moco_jax.data.pipeline import DatasetError
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ConfigError, DatasetError, CheckpointError, WeightsError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(3)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
