"""The archive index on disk and exact search: round trip, the recorded model, ranked results,
shards appended and removed (each study once), batched blockwise search, versions."""

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
  np.testing.assert_allclose(np.linalg.norm(index.image_embeddings, axis=1), 1.0, rtol=2e-3)
  np.testing.assert_allclose(   # float16 by default
      index.text_embeddings,
      data.text_embeddings / np.linalg.norm(data.text_embeddings, axis=1, keepdims=True),
      atol=1e-3)
  np.testing.assert_array_equal(index.study_ids, data.study_ids)
  np.testing.assert_array_equal(index.reports, data.reports)
  np.testing.assert_array_equal(index.source_paths, data.source_paths)
  meta = json.load(open(os.path.join(index_dir, index_lib.META_FILE)))
  assert meta["model"] == MODEL and meta["dtype"] == "float16" and meta["created"].endswith("Z")
  shard = index.shards[0]
  assert isinstance(shard.image, np.memmap) and shard.image.dtype == np.float16


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
  scores = index.image_embeddings @ (query / np.linalg.norm(query)).astype(np.float32)
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
  with pytest.raises(index_lib.IndexFileError, match="already exists; pass --append .* or "
                                                     "--overwrite"):
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
  meta["version"] = 2
  json.dump(meta, open(path, "w"))
  with pytest.raises(index_lib.IndexFileError, match="version 2, this version of launch.py "
                                                     "reads 'medfinder-index' version 3: rebuild"):
    index_lib.load_index(index_dir)


# --- An archive: shards appended, studies removed and replaced ------------------------------------

def subset(data, rows, id_prefix="sub"):
  rows = list(rows)
  return interchange.EmbeddingSet(
      image_embeddings=data.image_embeddings[rows], text_embeddings=data.text_embeddings[rows],
      study_ids=np.array([f"{id_prefix}-{i:04d}" for i in rows]), reports=data.reports[rows],
      source_paths=data.source_paths[rows])


def test_appended_shards_are_searched_as_one_index(tmp_path):
  data = constructed_set()
  directory = str(tmp_path / "index")
  index_lib.build_index(directory, subset(data, range(0, 100)), MODEL)
  index_lib.add_studies(directory, subset(data, range(100, 220)))
  index_lib.add_studies(directory, subset(data, range(220, 300)))
  index = index_lib.load_index(directory)
  assert index.n == 300 and len(index.shards) == 3
  assert list(index.study_ids) == [f"sub-{i:04d}" for i in range(300)]
  one = index_lib.load_index(index_lib.build_index(str(tmp_path / "one"), data, MODEL))
  query = data.text_embeddings[250]
  assert index_lib.search(index, query, 20) == index_lib.search(one, query, 20)


def test_a_study_already_present_is_an_error_unless_replaced(tmp_path):
  data = constructed_set(n=20)
  directory = index_lib.build_index(str(tmp_path / "index"), subset(data, range(10)), MODEL)
  with pytest.raises(index_lib.DuplicateStudyError, match="2 of the 4 studies to add are "
                                                          "already in the index .*--replace"):
    index_lib.add_studies(directory, subset(data, range(8, 12)))
  assert index_lib.load_index(directory).n == 10          # nothing written
  replacement = subset(data, range(8, 12))
  replacement.image_embeddings = data.image_embeddings[[0, 1, 2, 3]]
  index_lib.add_studies(directory, replacement, replace=True)
  index = index_lib.load_index(directory)
  ids = list(index.study_ids)
  assert index.n == 12 and len(set(ids)) == 12                 # each study once
  found = index_lib.search(index, data.image_embeddings[0], top_k=2)
  assert {r.study_id for r in found} == {"sub-0000", "sub-0008"}   # 0008 has 0000's image now


def test_removed_studies_are_gone_from_search_and_can_come_back(tmp_path):
  data = constructed_set(n=50)
  directory = index_lib.build_index(str(tmp_path / "index"), data, MODEL)
  assert index_lib.remove_studies(directory, ["sub-0007", "sub-0030"]) == 2
  index = index_lib.load_index(directory)
  assert index.n == 48 and "sub-0007" not in set(index.study_ids)
  assert index.row_of("sub-0007") is None
  assert all(r.study_id != "sub-0007"
             for r in index_lib.search(index, data.text_embeddings[7], top_k=48))
  with pytest.raises(index_lib.IndexFileError, match="not in the index: sub-0007"):
    index_lib.remove_studies(directory, ["sub-0007"])
  index_lib.add_studies(directory, subset(data, [7]))         # no longer a duplicate
  index = index_lib.load_index(directory)
  assert index.n == 49 and index_lib.search(index, data.text_embeddings[7], 1)[0].study_id == (
      "sub-0007")


def test_concurrent_writers_each_add_a_shard_and_listing_merges_them(tmp_path):
  """Two writers that embedded overlapping studies (two hosts): each study is in the index once,
  as the later shard has it."""
  data = constructed_set(n=40)
  directory = str(tmp_path / "index")
  index_lib.open_or_create(directory, 32, MODEL)
  index_lib.open_or_create(directory, 32, MODEL)               # a second writer: same index
  first = index_lib.add_studies(directory, subset(data, range(0, 25)))
  # The second writer checked for duplicates before the first committed: it writes rows 20-39.
  second = index_lib.commit_name()
  staging = os.path.join(directory, index_lib.SHARDS_DIR, ".tmp-" + second)
  os.makedirs(staging)
  index_lib._write_shard(staging, subset(data, range(20, 40)), "float16", None, [])  # pylint: disable=protected-access
  os.replace(staging, os.path.join(directory, index_lib.SHARDS_DIR, second))
  index = index_lib.load_index(directory)
  assert first < second and index.n == 40 and len(set(index.study_ids)) == 40
  shard, _ = index.locate(index.row_of("sub-0022"))
  assert shard.name == second
  results = index_lib.search(index, data.text_embeddings[22], top_k=40)
  assert len(results) == 40 and len({r.study_id for r in results}) == 40


def test_batched_blockwise_search_equals_one_query_at_a_time(tmp_path, monkeypatch):
  monkeypatch.setattr(index_lib, "BLOCK_ROWS", 7)             # many blocks per shard
  data = constructed_set(n=60)
  directory = index_lib.build_index(str(tmp_path / "index"), subset(data, range(30)), MODEL,
                                    dtype="float32")
  index_lib.add_studies(directory, subset(data, range(30, 60)))
  index_lib.remove_studies(directory, ["sub-0003"])
  index = index_lib.load_index(directory)
  queries = index_lib.query_vectors(index, data.text_embeddings[:16])
  rows, scores = index_lib.exact_top_k(index, queries, 5)
  full = queries @ index.image_embeddings.T
  for q in range(16):
    np.testing.assert_array_equal(rows[q], np.argsort(-full[q], kind="stable")[:5])
    assert [r.row for r in index_lib.search(index, data.text_embeddings[q], 5)] == list(rows[q])
  np.testing.assert_allclose(scores, -np.sort(-full, axis=1)[:, :5], rtol=1e-5)


def test_volume_queries_can_rank_only_studies_with_a_report(tmp_path):
  data = constructed_set(n=10)
  data.reports[[1, 3]] = ""
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL))
  results = index_lib.search(index, data.image_embeddings[1], top_k=10, against="text",
                             only_with_report=True)
  assert len(results) == 8 and {r.row for r in results}.isdisjoint({1, 3})


def test_thumbnails_are_stored_by_row_and_read_back(tmp_path):
  data = constructed_set(n=3)
  pngs = [b"\x89PNG first", b"", b"\x89PNG third"]
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL,
                                                     thumbnails=pngs))
  assert [index.thumbnail(r) for r in range(3)] == pngs
  assert [index.study(r)["has_thumbnail"] for r in range(3)] == [True, False, True]


def test_single_float16_queries_rank_as_the_batched_blas_path(tmp_path, monkeypatch):
  """A few queries go through faiss's fused float16 kernel, a batch through BLAS: same rows."""
  monkeypatch.setattr(index_lib, "BLOCK_ROWS", 64)
  data = constructed_set(n=300)
  directory = index_lib.build_index(str(tmp_path / "index"), data, MODEL)
  index_lib.remove_studies(directory, [f"sub-{i:04d}" for i in range(0, 300, 7)])
  index = index_lib.load_index(directory)
  queries = index_lib.query_vectors(index, data.text_embeddings[:20])
  batched = index_lib.exact_top_k(index, queries, 10)              # 20 > FUSED_MAX_QUERIES
  for q in range(20):
    rows, scores = index_lib.exact_top_k(index, queries[q:q + 1], 10)
    np.testing.assert_array_equal(rows[0], batched[0][q])
    np.testing.assert_allclose(scores[0], batched[1][q], rtol=1e-5)
