"""plots.py draws from metrics and arrays without a display (Agg)."""
import numpy as np

from moco_jax.evaluation import plots


def test_curves_views_and_retrieval_are_written(tmp_path):
  events = [{'step': s, 'loss': 8 - s / 10, 'instance_top1': float(s)} for s in range(10, 60, 10)]
  events += [{'step': 0, 'knn_top1': 30.0}, {'step': 50, 'knn_top1': 41.5}]
  written = plots.plot_curves(events, str(tmp_path))
  assert [p.split('/')[-1] for p in written] == ['loss.png', 'knn.png']

  rng = np.random.default_rng(0)
  views = rng.random((2, 4, 8, 8, 3))
  plots.plot_views(views[0], views[1], str(tmp_path / 'views.png'))
  found = dict(queries=rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
               query_labels=np.array([0, 1]),
               neighbours=rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8),
               neighbour_labels=np.array([[0, 1, 0], [1, 1, 0]]),
               similarities=np.array([[0.9, 0.8, 0.7], [0.95, 0.5, 0.1]]))
  plots.plot_retrieval(found, ['cat', 'dog'], str(tmp_path / 'retrieval.png'))
  for name in ('loss.png', 'knn.png', 'views.png', 'retrieval.png'):
    assert (tmp_path / name).stat().st_size > 1000


def test_displayable_undoes_normalisation():
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.25)
  image = np.random.default_rng(0).random((4, 4, 3))
  normalised = (image - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(plots.displayable(normalised, mean, std), image, atol=1e-12)
