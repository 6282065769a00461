"""Every accuracy in metrics.jsonl is a percentage named *_top1 / *_top5.

Pretraining (instance discrimination, kNN monitor) and linear evaluation
write into metrics.jsonl; each accuracy must be in [0, 100], and on these
runs every one of them is above 1 at least once (instance discrimination
among 1 + 64 candidates is at least 1/65 = 1.5% at chance, kNN and the
linear layer on the tiny colour-blob classes far more), so a fraction in
[0, 1] cannot pass for a percentage.
"""
import re

from conftest import smoke_config
from moco_jax import train
from moco_jax.runtime.metric_writer import read_metrics
from test_lincls import lincls_config
from moco_jax.evaluation import linear

ACCURACY = re.compile(r'(top\d|acc|accuracy)', re.IGNORECASE)


def accuracies(events):
  found = {}
  for event in events:
    for key, value in event.items():
      if ACCURACY.search(key):
        found.setdefault(key, []).append(value)
  return found


def test_every_logged_accuracy_is_a_percentage(tiny_data_dir, tmp_path):
  pretrain, lincls = str(tmp_path / 'pretrain'), str(tmp_path / 'lincls')
  config = smoke_config(tiny_data_dir, **{'eval.knn_every': 1.0, 'eval.batch_size': 16,
                                          'eval.knn_k': 10, 'train.log_every': 1})
  train.train_and_evaluate(config, pretrain)
  linear.linear_evaluation(
      lincls_config(pretrain, tiny_data_dir, **{'train.num_steps': 4, 'train.log_every': 1,
                                                'optim.base_lr': 0.1}), lincls)
  found = {**accuracies(read_metrics(pretrain)), **accuracies(read_metrics(lincls))}
  assert {'instance_top1', 'instance_top5', 'knn_top1', 'train_top1', 'lincls_top1',
          'lincls_top5'} <= set(found), sorted(found)
  for key, values in found.items():
    assert re.fullmatch(r'[a-z_]+_top[15]', key), key
    assert all(0 <= v <= 100 for v in values), (key, values)
    assert max(values) > 1, (key, values)
