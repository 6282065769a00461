"""Command line: export a pretraining run's backbone.

  python -m moco_jax.export --workdir=DIR --format=flax|torchvision|detectron2|timm
      [--output=PATH] [--step=N] [--with_head]

The formats are described in moco_jax/weights/export.py.
"""
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging

from moco_jax.runtime import cli

FLAGS = flags.FLAGS
FORMATS = ('flax', 'torchvision', 'detectron2', 'timm')  # weights.export.FORMATS
FLAG_NAMES = ('workdir', 'format', 'output', 'step', 'with_head')


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program (main.py) does not clash."""
  flags.DEFINE_string('workdir', None, 'Pretraining workdir (with checkpoints/).')
  flags.DEFINE_enum('format', None, FORMATS, 'Export format.')
  flags.DEFINE_string('output', None, 'File to write; default '
                      'WORKDIR/export/FORMAT_backbone_stepN.EXT.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  flags.DEFINE_bool('with_head', False, 'Also export the projection head.')


def usage() -> str:
  return f'{__doc__.strip()}\n\nflags:\n{cli.flag_help(FLAGS, FLAG_NAMES)}'


def parse_flags(argv):
  """absl's parsing: --help exits 0, every problem is one line (exit 2)."""
  return cli.parse_command_line(
      FLAGS, argv, usage,
      problem=lambda: (cli.workdir_problem(FLAGS.workdir, must_exist=True)
                       or (None if FLAGS.format else
                           f'--format is required: --format={"|".join(FORMATS)}')))

def main(argv):
  del argv  # checked by parse_flags
  logging.set_verbosity(logging.WARNING)  # orbax's info lines drown the result
  cli.import_tensorflow_quietly()
  from moco_jax.weights.export import ExportError, export
  try:
    path = export(FLAGS.workdir, FLAGS.format, FLAGS.output, FLAGS.step,
                  FLAGS.with_head)
  except ExportError as error:
    cli.fail(error)
  print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
