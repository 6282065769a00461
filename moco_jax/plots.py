"""Command line: pictures of a pretraining run, written into its workdir.

  python -m moco_jax.plots --workdir=DIR [--step=N] [--config.data.data_dir=...]

Writes loss.png, knn.png, views.png and retrieval.png (described in
moco_jax/evaluation/plots.py) and prints their paths.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging
from ml_collections import config_flags

from moco_jax.config.base import base_config
from moco_jax.evaluation.plots import (augmented_views, class_names, plot_curves,
                                       plot_retrieval, plot_views, retrieval)
from moco_jax.runtime import cli, paths
from moco_jax.runtime.mesh import make_mesh

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  flags.DEFINE_string('workdir', None, 'A moco_jax pretraining workdir.')
  flags.DEFINE_integer('step', -1, 'Checkpoint for the pictures; -1: the newest.')
  flags.DEFINE_integer('num_images', 8, 'Images in the views and retrieval grids.')
  flags.DEFINE_integer('neighbours', 8, 'Neighbours shown per retrieval query.')
  flags.DEFINE_integer('bank_size', 50_000, 'Training images searched for neighbours '
                       '(the first ones of the split).')
  config_flags.DEFINE_config_dict('config', base_config(),
                                  'Overrides of the saved config, e.g. --config.data.data_dir=...')


FLAG_NAMES = ('workdir', 'step', 'num_images', 'neighbours', 'bank_size')


def usage() -> str:
  return (f'{__doc__.strip()}\n\nflags:\n{cli.flag_help(FLAGS, FLAG_NAMES)}\n'
          f'  --config.SECTION.KEY=VALUE: override a value of the saved config')


def parse_flags(argv):
  """absl's parsing: --help exits 0, every problem is one line (exit 2)."""
  return cli.parse_command_line(
      FLAGS, argv, usage,
      problem=lambda: cli.workdir_problem(FLAGS.workdir, must_exist=True))

def main(argv):
  del argv  # checked by parse_flags
  logging.set_verbosity(logging.WARNING)
  cli.import_tensorflow_quietly()
  import jax
  from moco_jax.weights import pretrained
  from moco_jax.data.info import DatasetError
  from moco_jax.runtime.metric_writer import read_metrics
  workdir = FLAGS.workdir
  written = plot_curves(read_metrics(workdir), workdir)
  try:
    step = pretrained.checkpoint_step(workdir, FLAGS.step)
    config = pretrained.apply_overrides(pretrained.load_config(workdir, step),
                                        config_flags.get_override_values(FLAGS['config']))
    view_q, view_k = augmented_views(config, FLAGS.num_images)
    written.append(plot_views(view_q, view_k, paths.join(workdir, 'views.png')))
    one_device = make_mesh(jax.devices()[:1])  # features on one device
    run = pretrained.load(workdir, one_device, step, config)
    found = retrieval(config, run.params, run.batch_stats, FLAGS.num_images,
                      FLAGS.bank_size, FLAGS.neighbours)
    written.append(plot_retrieval(found, class_names(config.data),
                                  paths.join(workdir, 'retrieval.png')))
  except (pretrained.PretrainedError, DatasetError) as error:
    for path in written:
      print(path)
    cli.fail(error)
  for path in written:
    print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
