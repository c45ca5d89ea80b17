"""Rank histogram and recall@K curve PNGs."""

import numpy as np

from medfinder_jax import metrics, plots


def direction(greater, tied=None, rule="mid"):
  greater = np.asarray(greater)
  return metrics.DirectionRanks(greater=greater,
                                tied=np.zeros_like(greater) if tied is None else tied, rule=rule)


def test_recall_curve_agrees_with_recall_at_k_ties_included():
  rng = np.random.default_rng(0)
  ranks = direction(rng.integers(0, 500, size=500), rng.integers(0, 3, size=500))
  ks, recall = plots.recall_curve(ranks, 100)
  summary = metrics.summarize_ranks(ranks)
  assert ks[0] == 1 and ks[-1] == 100
  for k in (1, 5, 10):
    assert recall[k - 1] == summary[f"R@{k}"]
  assert np.all(np.diff(recall) >= 0)


def test_both_plots_are_written_as_png(tmp_path):
  rng = np.random.default_rng(1)
  ranks = {"t2i": direction(rng.integers(0, 3000, size=3000)),
           "i2t": direction(rng.integers(0, 20, size=3000), rng.integers(0, 2, size=3000))}
  paths = plots.save_retrieval_plots(ranks, str(tmp_path / "plots"))
  assert [p.rsplit("/", 1)[1] for p in paths] == ["rank_histogram.png", "recall_at_k.png"]
  for path in paths:
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
