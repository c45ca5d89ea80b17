"""Embedding index on disk and search: round trip, the recorded model, ranked results, versions."""

import json
import os

import numpy as np
import pytest

from medfinder_jax import index as index_lib
from medfinder_jax import interchange


def constructed_set(n=300, d=32, seed=0):
  """Studies whose report embedding is close to their own image embedding and far from others."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n, d)).astype(np.float32)
  text = (image + 0.05 * rng.normal(size=(n, d))).astype(np.float32)
  return interchange.validate({
      "image_embeddings": image * rng.uniform(0.5, 2.0, size=(n, 1)).astype(np.float32),
      "text_embeddings": text,
      "study_ids": np.array([f"sub-{i:04d}" for i in range(n)]),
      "reports": np.array([f"Study {i}: right lower lobe nodule of {i} mm. " * 20
                           for i in range(n)]),
      "source_paths": np.array([f"CT{i % 10}/ct/sub-{i:04d}.nii.gz" for i in range(n)])})


MODEL = {"backbone": "resnet50", "embed_dim": 32, "fingerprint": "abc123",
         "checkpoint": "/ckpt/best"}


@pytest.fixture
def index_dir(tmp_path):
  return index_lib.build_index(str(tmp_path / "index"), constructed_set(), MODEL)


def test_index_round_trip_stores_unit_embeddings_ids_reports_paths_and_model(index_dir):
  data = constructed_set()
  index = index_lib.load_index(index_dir)
  assert (index.n, index.dim) == (300, 32)
  np.testing.assert_allclose(np.linalg.norm(index.image_embeddings, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(
      index.text_embeddings,
      data.text_embeddings / np.linalg.norm(data.text_embeddings, axis=1, keepdims=True),
      rtol=1e-6)
  np.testing.assert_array_equal(index.study_ids, data.study_ids)
  np.testing.assert_array_equal(index.reports, data.reports)
  np.testing.assert_array_equal(index.source_paths, data.source_paths)
  meta = json.load(open(os.path.join(index_dir, index_lib.META_FILE)))
  assert meta["model"] == MODEL and meta["n"] == 300 and meta["created"].endswith("Z")


def test_text_query_finds_its_own_study_at_rank_1(index_dir):
  data, index = constructed_set(), index_lib.load_index(index_dir)
  for row in (0, 137, 299):
    results = index_lib.search(index, data.text_embeddings[row], top_k=5, against="image")
    assert results[0].study_id == f"sub-{row:04d}" and results[0].rank == 1
    assert results[0].source_path == f"CT{row % 10}/ct/sub-{row:04d}.nii.gz"
    assert results[0].excerpt.startswith(f"Study {row}: right lower lobe nodule")
    assert len(results[0].excerpt) <= 201 and results[0].excerpt.endswith("…")
    assert [r.rank for r in results] == [1, 2, 3, 4, 5]


def test_volume_query_finds_its_own_report_at_rank_1(index_dir):
  data, index = constructed_set(), index_lib.load_index(index_dir)
  results = index_lib.search(index, data.image_embeddings[42], top_k=3, against="text")
  assert results[0].row == 42


def test_results_are_the_top_k_by_cosine_in_order(index_dir):
  index = index_lib.load_index(index_dir)
  query = np.random.default_rng(1).normal(size=32)
  scores = index.image_embeddings @ (query / np.linalg.norm(query))
  results = index_lib.search(index, query, top_k=10)
  assert [r.row for r in results] == list(np.argsort(-scores, kind="stable")[:10])
  np.testing.assert_allclose([r.score for r in results], np.sort(scores)[::-1][:10], rtol=1e-5)
  assert len(index_lib.search(index, query, top_k=1000)) == 300


def test_top_k_rows_breaks_ties_by_lower_row():
  scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1], np.float32)
  np.testing.assert_array_equal(index_lib.top_k_rows(scores, 3), [1, 3, 0])


def test_bad_queries_and_missing_indexes_are_clear_errors(index_dir, tmp_path):
  index = index_lib.load_index(index_dir)
  with pytest.raises(ValueError, match="dimension 32"):
    index_lib.search(index, np.ones(16))
  with pytest.raises(ValueError, match="NaN"):
    index_lib.search(index, np.full(32, np.nan))
  with pytest.raises(ValueError, match="against"):
    index_lib.search(index, np.ones(32), against="volume")
  with pytest.raises(index_lib.IndexFileError, match="no such index"):
    index_lib.load_index(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(index_lib.IndexFileError, match="not a MedFinder index"):
    index_lib.load_index(str(tmp_path / "empty"))


def test_building_over_an_existing_index_needs_overwrite(index_dir):
  with pytest.raises(index_lib.IndexFileError, match="already exists"):
    index_lib.build_index(index_dir, constructed_set(n=10), MODEL)
  index_lib.build_index(index_dir, constructed_set(n=10), MODEL, overwrite=True)
  assert index_lib.load_index(index_dir).n == 10
  assert sorted(os.listdir(os.path.dirname(index_dir))) == ["index"]   # no staging leftovers


def test_overwrite_never_replaces_a_directory_that_is_not_an_index(tmp_path):
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "scan.nii.gz").write_bytes(b"keep me")
  with pytest.raises(index_lib.IndexFileError, match="not an index"):
    index_lib.build_index(str(tmp_path / "data"), constructed_set(n=10), MODEL, overwrite=True)
  assert (tmp_path / "data" / "scan.nii.gz").read_bytes() == b"keep me"


def test_index_targets_are_checked_before_any_work(index_dir, tmp_path):
  index_lib.check_index_target(str(tmp_path / "new"))                 # absent: fine
  index_lib.check_index_target(index_dir, overwrite=True)              # an index: replaceable
  (tmp_path / "empty").mkdir()
  index_lib.check_index_target(str(tmp_path / "empty"), overwrite=True)
  with pytest.raises(index_lib.IndexFileError, match="already exists; pass --overwrite"):
    index_lib.check_index_target(index_dir)
  (tmp_path / "data").mkdir()
  (tmp_path / "data" / "scan.nii.gz").write_bytes(b"keep me")
  with pytest.raises(index_lib.IndexFileError, match="not an index"):
    index_lib.check_index_target(str(tmp_path / "data"), overwrite=True)
  (tmp_path / "file").write_text("x")
  with pytest.raises(index_lib.IndexFileError, match="not a directory"):
    index_lib.check_index_target(str(tmp_path / "file"), overwrite=True)


def test_an_index_of_another_format_version_is_refused(index_dir):
  path = os.path.join(index_dir, index_lib.META_FILE)
  meta = json.load(open(path))
  meta["version"] = 1
  json.dump(meta, open(path, "w"))
  with pytest.raises(index_lib.IndexFileError, match="version 1, this version of launch.py "
                                                     "reads 'medfinder-index' version 2: rebuild"):
    index_lib.load_index(index_dir)
