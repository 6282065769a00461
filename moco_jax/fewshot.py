"""Command line: few-shot linear evaluation (closed-form ridge regression) of a
pretraining run's checkpoint.

  python -m moco_jax.fewshot --workdir=PRETRAIN_DIR [--step=N] [--shots=1,5,10,25]
      [--seeds=3] [--l2_reg=1.0] [--random_init] [--config.data.data_dir=...]

k images per class of data.train_split (per seed), their frozen backbone
features, a ridge classifier in closed form, top-1 on data.eval_split; mean
and std over the seeds (moco_jax/evaluation/fewshot.py). Uses the config
saved with the checkpoint (--config.data.* evaluates on another labelled
dataset). --random_init evaluates the same network at its random
initialisation instead (model seed --config.seed), the baseline the
pretrained features should beat. Prints one line per shot count and a JSON
line; appends the metrics to PRETRAIN_DIR/metrics.jsonl at the checkpoint's
step (not with --random_init).
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


def define_flags():
  """Command-line flags; defined only when run as a program, so importing
  this module next to another absl program does not clash."""
  cli.check_flagfiles(sys.argv)   # before config_flags reads them (one line, not a traceback)
  flags.DEFINE_string('workdir', None, 'A moco_jax pretraining workdir.')
  flags.DEFINE_integer('step', -1, 'Checkpoint step to evaluate; -1: the newest.')
  flags.DEFINE_list('shots', None, 'Images per class, comma-separated; default '
                    'eval.fewshot_shots (1,5,10,25).')
  flags.DEFINE_integer('seeds', None, 'Draws of the k-shot images (seeds 0..N-1); '
                       'default eval.fewshot_seeds (3).')
  flags.DEFINE_float('l2_reg', None, 'Ridge penalty on the unit-norm features; '
                     'default eval.fewshot_l2_reg (1.0).')
  flags.DEFINE_boolean('random_init', False, 'Evaluate the randomly initialised network.')
  config_flags.DEFINE_config_dict('config', base_config(),
                                  'Overrides of the saved config, e.g. --config.data.data_dir=...')


NAMES = ('workdir', 'step', 'shots', 'seeds', 'l2_reg', 'random_init')


def usage() -> str:
  return (f'{__doc__.strip()}\n\nflags:\n{cli.flag_help(FLAGS, NAMES)}\n'
          f'  --config.SECTION.KEY=VALUE: override a value of the saved config')


def parse_flags(argv):
  """absl's parsing: --help exits 0, every problem is one line (exit 2)."""
  return cli.parse_command_line(
      FLAGS, argv, usage,
      problem=lambda: cli.workdir_problem(FLAGS.workdir, must_exist=True))


def _shots():
  if FLAGS.shots is None:
    return None
  try:
    return [int(k) for k in FLAGS.shots]
  except ValueError:
    cli.fail(f'--shots={",".join(FLAGS.shots)} is not a comma-separated list of '
             f'integers such as 1,5,10,25')


def _random_variables(config):
  import jax
  import jax.numpy as jnp
  from moco_jax.evaluation import knn
  backbone = knn.backbone_from_config(config)
  size = config.data.image_size
  variables = backbone.init(jax.random.PRNGKey(config.seed),
                            jnp.zeros((1, size, size, 3)), train=False)
  return variables['params'], variables.get('batch_stats', {})


def main(argv):
  del argv  # checked by parse_flags
  logging.set_verbosity(logging.WARNING)
  cli.import_tensorflow_quietly()
  import jax
  from moco_jax.config.checks import ConfigError
  from moco_jax.data.info import DatasetError
  from moco_jax.evaluation import fewshot
  from moco_jax.runtime.metric_writer import MetricWriter
  from moco_jax.weights import pretrained
  shots = _shots()
  try:
    step = pretrained.checkpoint_step(FLAGS.workdir, FLAGS.step)
    config = pretrained.apply_overrides(pretrained.load_config(FLAGS.workdir, step),
                                        config_flags.get_override_values(FLAGS['config']))
    mesh = make_mesh()
    evaluator = fewshot.FewShotEvaluator(config, mesh, shots, FLAGS.seeds, FLAGS.l2_reg)
    if FLAGS.random_init:
      params, batch_stats = _random_variables(config)
    else:
      run = pretrained.load(FLAGS.workdir, mesh, step, config)
      params, batch_stats = run.params, run.batch_stats
    metrics = evaluator(params, batch_stats)
  except (pretrained.PretrainedError, DatasetError, ConfigError) as error:
    cli.fail(error)
  what = (f'random init (seed {config.seed})' if FLAGS.random_init
          else f'step {step}')
  for k in evaluator.shots:
    print(f'{what}: {k}-shot top-1 {metrics[f"fewshot_{k}shot_top1"]:.2f} +- '
          f'{metrics[f"fewshot_{k}shot_top1_std"]:.2f} ({evaluator.seeds} seeds, '
          f'{config.data.dataset} {config.data.eval_split}, l2_reg {evaluator.l2_reg:g})')
  print(json.dumps(dict(metrics, step=step, random_init=FLAGS.random_init)))
  if not FLAGS.random_init:
    writer = MetricWriter(FLAGS.workdir, enabled=jax.process_index() == 0)
    writer.write(step, metrics)
    writer.close()


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
