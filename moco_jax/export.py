"""Command line: export a pretraining run's backbone.

  python -m moco_jax.export --workdir=DIR --format=flax|torchvision|detectron2
      [--output=PATH] [--step=N] [--with_head]

The formats are described in moco_jax/weights/export.py.
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging

from moco_jax.weights.export import FORMATS, ExportError, export

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program (main.py) does not clash."""
  flags.DEFINE_string('workdir', None, 'Pretraining workdir (with checkpoints/).')
  flags.DEFINE_enum('format', None, FORMATS, 'Export format.')
  flags.DEFINE_string('output', None, 'File to write; default '
                      'WORKDIR/export/FORMAT_backbone_stepN.EXT.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default: the newest.')
  flags.DEFINE_bool('with_head', False, 'Also export the projection head.')
  flags.mark_flags_as_required(['workdir', 'format'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # orbax's info lines drown the result
  try:
    path = export(FLAGS.workdir, FLAGS.format, FLAGS.output, FLAGS.step,
                  FLAGS.with_head)
  except ExportError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  print(path)


if __name__ == '__main__':
  define_flags()
  app.run(main)
