"""Export TFDS splits to one .npz for data.dataset='npz:PATH' (data/npz.py).

python -m moco_jax.data.export_npz --dataset=cifar10 --data_dir=../shared/tfds \
    --splits=train,test --out=cifar10.npz

The file (CIFAR-10: 184 MB) lets a machine without TensorFlow train with
data.on_device (e.g. benchmarks/time_to_accuracy.py on an accelerator).
"""
import sys

from absl import app, flags

from moco_jax.runtime import paths

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  flags.DEFINE_string('dataset', 'cifar10', 'TFDS name.')
  flags.DEFINE_string('data_dir', '', 'TFDS data_dir ("" = TFDS default).')
  flags.DEFINE_list('splits', ['train', 'test'], 'Splits to export.')
  flags.DEFINE_string('out', '', 'The .npz to write.')


def main(argv):
  del argv
  from moco_jax.data.info import DatasetError
  from moco_jax.data.npz import export_npz
  if not FLAGS.out or not FLAGS.out.endswith('.npz'):
    print(f'error: --out={FLAGS.out!r} must name a .npz file', file=sys.stderr)
    sys.exit(2)
  if not paths.isdir(paths.dirname(paths.absolute(FLAGS.out))):
    print(f'error: --out={FLAGS.out!r}: its folder does not exist', file=sys.stderr)
    sys.exit(2)
  try:
    counts = export_npz(FLAGS.dataset, FLAGS.data_dir or None, FLAGS.splits, FLAGS.out)
  except (DatasetError, ValueError, KeyError) as error:
    print(f'error: {str(error).splitlines()[0]}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {FLAGS.out}: ' + ', '.join(f'{s} {n:,} images' for s, n in counts.items()))


if __name__ == '__main__':
  define_flags()
  app.run(main)
