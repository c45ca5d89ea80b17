"""Approximate search (faiss IVF-SQ8): built by `launch.py index-ann` with its recall@10 against
exact search measured and stored, exact scores for its results, stale after the index changes."""

import json
import os

import numpy as np
import pytest

import launch
from medfinder_jax import ann as ann_lib
from medfinder_jax import index as index_lib
from medfinder_jax import interchange

MODEL = {"backbone": "resnet50", "embed_dim": 32, "fingerprint": "abc123"}


def clustered_set(n=4000, d=32, clusters=40, seed=0, first=0):
  """Studies in clusters (as real embeddings are), reports near their own image."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, d)).astype(np.float32)
  image = centres[rng.integers(0, clusters, n)] + 0.4 * rng.normal(size=(n, d)).astype(np.float32)
  text = image + 0.2 * rng.normal(size=(n, d)).astype(np.float32)
  return interchange.validate({"image_embeddings": image, "text_embeddings": text,
                               "study_ids": np.array([f"s{first + i}" for i in range(n)])})


@pytest.fixture
def index_dir(tmp_path):
  return index_lib.build_index(str(tmp_path / "index"), clustered_set(), MODEL)


def test_index_ann_measures_and_stores_its_recall(index_dir, capsys):
  assert launch.main(["index-ann", "--index", index_dir, "--queries", "300"]) == 0
  out = capsys.readouterr().out
  meta = json.load(open(os.path.join(index_dir, ann_lib.ANN_DIR, ann_lib.ANN_META)))
  assert meta["kind"] == "IVF64,SQ8" and meta["queries"] == 300
  assert meta["recall_at_10"] >= 0.95 and meta["recall_at_10"] == (
      meta["recall_by_nprobe"][str(meta["nprobe"])])
  assert f"recall@10 {meta['recall_at_10']:.3f}" in out
  assert launch.main(["index", "--index", index_dir, "--info"]) == 0
  assert "4000 studies in 1 shards" in capsys.readouterr().out


def test_ann_results_are_exactly_scored_and_mostly_the_exact_ones(index_dir):
  index = index_lib.load_index(index_dir)
  ann_lib.build(index, queries=200, log=lambda line: None)
  ann, why = ann_lib.load(index)
  assert why is None
  data = clustered_set()
  queries = index_lib.query_vectors(index, data.text_embeddings[:100])
  rows, scores = ann.search(index, queries, 10)
  exact_rows, _ = index_lib.exact_top_k(index, queries, 10)
  np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", index.image_embeddings[rows],
                                               queries), rtol=1e-5)
  assert all(np.all(np.diff(s) <= 0) for s in scores)
  overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact_rows)])
  assert overlap >= 0.9


def test_an_ann_index_is_stale_once_the_index_changes(index_dir):
  ann_lib.build(index_lib.load_index(index_dir), queries=100, log=lambda line: None)
  index_lib.add_studies(index_dir, clustered_set(n=10, seed=1, first=5000))
  ann, why = ann_lib.load(index_lib.load_index(index_dir))
  assert ann is None and "stale" in why and "launch.py index-ann" in why


def test_bad_ann_settings_are_user_errors(index_dir, capsys):
  assert launch.main(["index-ann", "--index", index_dir, "--nlist", "999999"]) == 2
  assert "--nlist 999999: expected 1 to the number of studies (4000)" in capsys.readouterr().err
  assert launch.main(["index-ann", "--index", index_dir, "--target_recall", "2"]) == 2
