"""Command line: kNN top-1 of a pretraining run's checkpoint.

  python -m moco_jax.knn --workdir=PRETRAIN_DIR [--step=N] [--config.eval.knn_k=20]
      [--config.eval.knn_features=head]

Uses the config saved with the checkpoint (any value can be overridden, e.g.
--config.data.data_dir=... when the data moved), prints knn_top1 and appends
it, with the features, k and split it was measured with, to
PRETRAIN_DIR/knn_evaluations.jsonl (metrics.jsonl keeps the training run's own
kNN curve).
"""
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # before TensorFlow loads

from absl import app, flags, logging
from ml_collections import config_flags

from moco_jax.config.base import base_config
from moco_jax.runtime import cli
from moco_jax.runtime.mesh import make_mesh

FLAGS = flags.FLAGS
EVALUATIONS_FILE = 'knn_evaluations.jsonl'   # this CLI's results, one JSON line each


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  cli.check_flagfiles(sys.argv)   # before config_flags reads them (one line, not a traceback)
  flags.DEFINE_string('workdir', None, 'A moco_jax pretraining workdir.')
  flags.DEFINE_integer('step', -1, 'Checkpoint step to evaluate; -1: the newest.')
  # Only the overridden values are used, applied to the checkpoint's config.
  config_flags.DEFINE_config_dict('config', base_config(),
                                  'Overrides of the saved config, e.g. --config.eval.knn_k=20.')


def usage() -> str:
  return (f'{__doc__.strip()}\n\nflags:\n{cli.flag_help(FLAGS, ("workdir", "step"))}\n'
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
  from moco_jax.evaluation import knn
  from moco_jax.weights import pretrained
  from moco_jax.config.checks import ConfigError
  from moco_jax.data.info import DatasetError
  from moco_jax.runtime import paths
  try:
    step = pretrained.checkpoint_step(FLAGS.workdir, FLAGS.step)
    config = pretrained.apply_overrides(pretrained.load_config(FLAGS.workdir, step),
                                        config_flags.get_override_values(FLAGS['config']))
    mesh = make_mesh()
    evaluator = knn.KnnEvaluator(config, mesh)
    run = pretrained.load(FLAGS.workdir, mesh, step, config)
    metrics = evaluator(run.encoder_params, run.encoder_batch_stats)
  except (pretrained.PretrainedError, DatasetError, ConfigError) as error:
    cli.fail(error)
  features = knn.knn_features(config)
  line = (f'step {step}: knn_top1 {metrics["knn_top1"]:.2f} (k={evaluator.k}, '
          f't={config.eval.knn_t}, features={features})')
  print(line)
  if jax.process_index() == 0:
    # Apart from metrics.jsonl: the training curve keeps one kNN value per
    # step, measured as the run measured it (its features and k).
    record = {'step': step, 'knn_top1': round(metrics['knn_top1'], 4),
              'knn_features': features, 'knn_k': evaluator.k, 'knn_t': config.eval.knn_t,
              'eval_split': config.data.eval_split}
    target = paths.join(FLAGS.workdir, EVALUATIONS_FILE)
    paths.append_text(target, json.dumps(record) + '\n')
    print(f'recorded in {target}')


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
