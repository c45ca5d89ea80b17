"""The archive index on disk and exact search: round trip, the recorded model, ranked results,
shards appended and removed (each study once), batched blockwise search, versions."""

import datetime
import json
import mmap
import os
import re
import socket
import time

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
  assert shard.image.dtype == np.float16 and not shard.image.flags.owndata   # mapped, no copy


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
  monkeypatch.setattr(index_lib, "GEMM_ROWS", 7)              # many blocks per shard
  monkeypatch.setattr(index_lib, "SCAN_ROWS", 7)
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


def test_single_float16_queries_rank_as_the_batched_gemm_path(tmp_path, monkeypatch):
  """A few queries go through faiss's float16 scanner, a batch through a matrix product: same
  rows."""
  monkeypatch.setattr(index_lib, "GEMM_ROWS", 64)
  monkeypatch.setattr(index_lib, "SCAN_ROWS", 64)
  data = constructed_set(n=300)
  directory = index_lib.build_index(str(tmp_path / "index"), data, MODEL)
  index_lib.remove_studies(directory, [f"sub-{i:04d}" for i in range(0, 300, 7)])
  index = index_lib.load_index(directory)
  queries = index_lib.query_vectors(index, data.text_embeddings[:20])
  batched = index_lib.exact_top_k(index, queries, 10)              # 20 > SCAN_MAX_QUERIES
  for q in range(20):
    rows, scores = index_lib.exact_top_k(index, queries[q:q + 1], 10)
    np.testing.assert_array_equal(rows[0], batched[0][q])
    np.testing.assert_allclose(scores[0], batched[1][q], rtol=1e-5)


def numpy_top_k(queries, gallery, keep, k):
  """The reference: every live row scored in float32 by numpy, sorted by score, then row."""
  scores = np.where(keep, queries @ gallery.T, -np.inf)
  order = np.lexsort((np.broadcast_to(np.arange(gallery.shape[0]), scores.shape), -scores),
                     axis=1)[:, :k]
  return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("queries", [1, 3, 9])     # scanned (<= SCAN_MAX_QUERIES) and GEMM
@pytest.mark.parametrize("against", ["image", "text"])
def test_float16_exact_search_equals_numpy_over_shards_with_replacements_and_removals(
    tmp_path, monkeypatch, queries, against):
  """Many blocks over four shards (scanned by several threads), a replaced study, two hosts'
  copies of one study, removals, exact ties (two studies with one embedding) and dead rows:
  the ids and their order are numpy's over the live rows, the scores equal to float32
  rounding."""
  monkeypatch.setattr(index_lib, "GEMM_ROWS", 16)
  monkeypatch.setattr(index_lib, "SCAN_ROWS", 16)
  data = constructed_set(n=200)
  data.image_embeddings[150] = data.image_embeddings[40]     # an exact tie, 40 wins
  data.text_embeddings[150] = data.text_embeddings[40]
  data.reports[[5, 60, 170]] = ""
  directory = index_lib.build_index(str(tmp_path / "index"), subset(data, range(0, 70)), MODEL)
  index_lib.add_studies(directory, subset(data, range(70, 130)))
  replacement = subset(data, [10, 11])
  replacement.image_embeddings = data.image_embeddings[[100, 101]]
  index_lib.add_studies(directory, replacement, replace=True)
  index_lib.remove_studies(directory, ["sub-0003", "sub-0071", "sub-0100"])
  index_lib.add_studies(directory, subset(data, range(130, 200)))
  index = index_lib.load_index(directory)
  assert index.n == 197 and len(index.shards) == 4
  query = index_lib.query_vectors(index, data.text_embeddings[[40, 10, 101, 7, 150, 60, 5, 1,
                                                               199]][:queries])
  for k, only_with_report in ((10, False), (25, True), (500, False)):
    keep = np.array([index.has_report(r) for r in range(index.n)]) if only_with_report else (
        np.ones(index.n, bool))
    expected_rows, expected_scores = numpy_top_k(query, index.embeddings(against), keep,
                                                 min(k, int(keep.sum())))
    rows, scores = index_lib.exact_top_k(index, query, k, against, only_with_report)
    np.testing.assert_array_equal(rows, expected_rows)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)
  picked = [196, 3, 150, 3, 70, 0]              # any order, repeats, over shards
  np.testing.assert_array_equal(index.vectors(picked, against),
                                index.embeddings(against)[picked])
  if against == "image":
    rows = list(index_lib.exact_top_k(index, query[:1], 2)[0][0])
    assert [index.study_id(r) for r in rows] == ["sub-0040", "sub-0150"]


def test_exact_search_leaves_no_gallery_pages_mapped(tmp_path):
  """Each block's pages are released after it is scored, so a server that searched the whole
  gallery does not keep it in its RSS (the pages stay in the page cache)."""
  data = constructed_set(n=3000, d=512)                 # a 3000 KiB float16 gallery
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL))

  def search_all():
    for batch in (1, 64):                              # scanned, then by matrix products
      index_lib.exact_top_k(index, index_lib.query_vectors(index, data.text_embeddings[:batch]), 5)
    index.vectors(np.arange(0, 3000, 10))               # and rows read for re-scoring
  search_all()                                          # maps the code it runs, once
  before = resident_file_kib()
  search_all()
  after = resident_file_kib()
  assert after - before < 1000
  np.asarray(index.shards[0].image).sum()               # the probe sees a mapped gallery
  assert resident_file_kib() - after > 2000


def resident_file_kib():
  with open("/proc/self/status", encoding="utf-8") as f:
    return int(next(line for line in f if line.startswith("RssFile:")).split()[1])


@pytest.mark.parametrize("damage", ["truncated", "not npy", "3d"])
def test_a_damaged_embeddings_file_is_an_error_naming_it(index_dir, damage):
  shard = index_lib.load_index(index_dir).shards[0]
  path = os.path.join(shard.folder, index_lib.IMAGE_FILE)
  if damage == "truncated":
    os.truncate(path, os.path.getsize(path) // 2)
  elif damage == "not npy":
    open(path, "wb").write(b"not an array")
  else:
    np.save(path, np.zeros((300, 4, 8), np.float16))
  with pytest.raises(index_lib.IndexFileError, match=f"{path}: unreadable embeddings .*remove "
                                                     f"this shard or rebuild the index"):
    index_lib.load_index(index_dir)


def test_top_k_rows_are_the_k_best_of_a_full_sort_for_every_k():
  rng = np.random.default_rng(0)
  for trial in range(5):
    scores = rng.permutation(40).astype(np.float32)          # distinct: one right answer
    expected = np.argsort(-scores)
    for k in range(1, 43):
      np.testing.assert_array_equal(index_lib.top_k_rows(scores, k), expected[:k],
                                    err_msg=f"trial {trial}, k={k}")
  none = index_lib.top_k_rows(scores, 0)
  assert none.shape == (0,) and none.dtype == np.int64


def test_search_cuts_excerpts_at_the_length_asked(index_dir):
  data, index = constructed_set(), index_lib.load_index(index_dir)
  results = index_lib.search(index, data.text_embeddings[3], top_k=2, excerpt_chars=40)
  assert results[0].excerpt.startswith("Study 3: right lower lobe")
  assert all(len(r.excerpt) <= 41 and r.excerpt.endswith("…") for r in results)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("rows", [0, 5])
def test_as_float32_gives_numpy_float32_values(dtype, rows):
  block = np.random.default_rng(2).normal(size=(rows, 24)).astype(dtype)
  out = index_lib.as_float32(block)
  assert out.dtype == np.float32 and out.shape == (rows, 24)
  np.testing.assert_array_equal(out, block.astype(np.float32))


def test_search_ranks_every_study_by_default_and_returns_ten(tmp_path):
  data = constructed_set(n=12)
  data.reports[[1, 3]] = ""
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL))
  results = index_lib.search(index, data.image_embeddings[1], against="text")
  assert len(results) == 10 and results[0].row == 1       # a study without a report too
  assert len(index_lib.search(index, data.image_embeddings[1], top_k=12, against="text")) == 12


def test_search_refuses_no_results_or_a_batch_of_queries(index_dir):
  index = index_lib.load_index(index_dir)
  with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
    index_lib.search(index, np.ones(32), top_k=0)
  with pytest.raises(ValueError, match="search takes one query; use exact_top_k for a batch of 2"):
    index_lib.search(index, np.ones((2, 32)))


def test_removing_no_study_is_an_error(index_dir):
  with pytest.raises(index_lib.IndexFileError, match="no study ids to remove"):
    index_lib.remove_studies(index_dir, [])


def test_exact_top_k_takes_float64_strided_queries_and_ranks_every_study_by_default(tmp_path):
  data = constructed_set(n=12)
  data.reports[[2, 5]] = ""
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL))
  unit = data.text_embeddings / np.linalg.norm(data.text_embeddings, axis=1, keepdims=True)
  queries = np.asfortranarray(unit[[2, 5, 7]].astype(np.float64))    # float64, column-major
  rows, scores = index_lib.exact_top_k(index, queries, 12)
  expected = index.image_embeddings.astype(np.float32) @ unit[[2, 5, 7]].T.astype(np.float32)
  assert rows.shape == (3, 12)                                        # no-report rows too
  np.testing.assert_allclose(scores, np.sort(expected.T, axis=1)[:, ::-1], rtol=1e-4, atol=1e-5)
  assert list(rows[:, 0]) == [2, 5, 7]
  none_rows, none_scores = index_lib.exact_top_k(index, queries, 0)
  assert none_rows.shape == none_scores.shape == (3, 0)


@pytest.mark.parametrize("batch", [2, 6])             # the float16-scan and matrix-product paths
def test_merging_many_blocks_keeps_the_true_top_k_for_large_k(tmp_path, monkeypatch, batch):
  monkeypatch.setattr(index_lib, "GEMM_ROWS", 64)
  monkeypatch.setattr(index_lib, "SCAN_ROWS", 64)
  data = constructed_set(n=300)
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL))
  queries = index_lib.query_vectors(index, data.text_embeddings[:batch])
  full = queries @ index.image_embeddings.astype(np.float32).T
  for k in (1, 3, 40, 100):
    rows, _ = index_lib.exact_top_k(index, queries, k)
    for q in range(batch):
      np.testing.assert_array_equal(np.sort(full[q][rows[q]])[::-1], np.sort(full[q])[::-1][:k],
                                    err_msg=f"k={k}, query {q}")


def test_a_replaced_study_moves_to_its_new_commit_place(tmp_path):
  data = constructed_set(n=12)
  directory = index_lib.build_index(str(tmp_path / "index"), subset(data, range(10)), MODEL)
  index_lib.add_studies(directory, subset(data, [0, 10]), replace=True)
  ids = list(index_lib.load_index(directory).study_ids)       # rows in commit order
  assert ids == [f"sub-{i:04d}" for i in [*range(1, 10), 0, 10]]


def test_a_study_removed_twice_by_racing_writers_is_just_gone(tmp_path):
  data = constructed_set(n=6)
  directory = index_lib.build_index(str(tmp_path / "index"), data, MODEL)
  index_lib.remove_studies(directory, ["sub-0002"])
  removals = os.path.join(directory, index_lib.REMOVALS_DIR)
  (first,) = os.listdir(removals)
  with open(os.path.join(removals, first), encoding="utf-8") as f:
    record = f.read()
  with open(os.path.join(removals, "z" + first), "w", encoding="utf-8") as f:   # a later commit
    f.write(record)
  assert "sub-0002" not in index_lib.load_index(directory).study_ids
  assert index_lib.live_study_ids(directory) == {f"sub-{i:04d}" for i in (0, 1, 3, 4, 5)}


def test_ties_at_the_kth_place_keep_the_lower_rows():
  """Equal scores straddling the cut: the promise is "ties: lower row first", so the lowest tied
  rows are kept, in row order, by the single-block top k and by the merge of blocks alike."""
  scores = np.zeros(40, np.float32)
  scores[[3, 11, 25]] = 1.0                      # three clear winners, then 37 rows tied at 0
  np.testing.assert_array_equal(index_lib.top_k_rows(scores, 13),
                                [3, 11, 25, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
  order = np.random.default_rng(0).permutation(40)   # candidates in no particular row order
  rows, merged = index_lib._merge(order[None, :20], scores[order[:20]][None],
                                  order[None, 20:], scores[order[20:]][None], 13)
  np.testing.assert_array_equal(rows[0], [3, 11, 25, 0, 1, 2, 4, 5, 6, 7, 8, 9, 10])
  np.testing.assert_array_equal(merged[0], scores[rows[0]])


# --- Writing: targets, staging, dtypes, names -----------------------------------------------------

def test_appending_needs_an_index_at_the_target(index_dir, tmp_path):
  index_lib.check_index_target(index_dir, append=True)                 # an index: append to it
  (tmp_path / "data").mkdir()
  with pytest.raises(index_lib.IndexFileError, match=f"{tmp_path / 'data'}: not a MedFinder index"):
    index_lib.check_index_target(str(tmp_path / "data"), append=True)


def test_unusable_embeddings_to_index_are_an_error_naming_the_target(tmp_path):
  target = str(tmp_path / "index")
  with pytest.raises(interchange.InterchangeError, match=f"{target}: missing required field"):
    index_lib.build_index(target, {"image_embeddings": np.ones((2, 4), np.float32)}, MODEL)
  assert not os.path.exists(target)


def test_an_index_is_staged_in_its_target_s_parent(tmp_path, monkeypatch):
  """The staging folder is renamed into place: it must be on the target's filesystem (the system
  temporary directory may be another one)."""
  elsewhere = tmp_path / "system-tmp"
  elsewhere.mkdir()
  monkeypatch.setattr(index_lib.tempfile, "tempdir", str(elsewhere))
  staged = []
  add_studies = index_lib.add_studies
  monkeypatch.setattr(index_lib, "add_studies",
                      lambda directory, *a, **k: staged.append(directory) or add_studies(
                          directory, *a, **k))
  target = str(tmp_path / "indexes" / "index")
  index_lib.build_index(target, constructed_set(n=4), MODEL)
  assert [os.path.dirname(s) for s in staged] == [str(tmp_path / "indexes")]
  assert os.listdir(tmp_path / "indexes") == ["index"] and not os.listdir(elsewhere)


def test_a_failed_build_leaves_nothing_behind_and_the_old_index_as_it_was(index_dir):
  with pytest.raises(ValueError, match="3 thumbnails for 10 studies"):
    index_lib.build_index(index_dir, constructed_set(n=10), MODEL, overwrite=True,
                          thumbnails=[b""] * 3)
  assert os.listdir(os.path.dirname(index_dir)) == ["index"]
  assert list(index_lib.load_index(index_dir).study_ids) == list(constructed_set().study_ids)


def test_a_float32_index_stores_float32_unit_rows(tmp_path):
  data = constructed_set(n=6)
  directory = index_lib.build_index(str(tmp_path / "index"), data, MODEL, dtype="float32")
  index = index_lib.load_index(directory)
  assert index.meta["dtype"] == "float32" and index.shards[0].image.dtype == np.float32
  unit = data.image_embeddings / np.linalg.norm(data.image_embeddings, axis=1, keepdims=True)
  np.testing.assert_allclose(index.image_embeddings, unit, rtol=1e-6, atol=1e-7)


def test_commit_names_and_stamps_are_utc_time_safe_host_pid_and_random(monkeypatch):
  """`<UTC time>-<host>-<pid>-<random>` in any host time zone (names sort by time across hosts),
  the host name made safe for a file name."""
  monkeypatch.setattr(index_lib.socket, "gethostname", lambda: "ct node/3.example.org")
  monkeypatch.setenv("TZ", "JST-9")
  time.tzset()
  try:
    before = datetime.datetime.now(datetime.timezone.utc)
    name, stamp = index_lib.commit_name(), index_lib._stamp()   # pylint: disable=protected-access
    after = datetime.datetime.now(datetime.timezone.utc)
  finally:
    monkeypatch.undo()
    time.tzset()
  match = re.fullmatch(rf"(\d{{8}}T\d{{12}}Z)-ct_node_3_example_org-{os.getpid()}-[0-9a-f]{{6}}",
                       name)
  assert match, name
  named = datetime.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%fZ").replace(
      tzinfo=datetime.timezone.utc)
  stamped = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(
      tzinfo=datetime.timezone.utc)
  assert before <= named <= after
  assert before.replace(microsecond=0) <= stamped <= after


def test_a_host_without_a_name_is_named_host(monkeypatch):
  monkeypatch.setattr(index_lib.socket, "gethostname", lambda: "")
  assert f"-host-{os.getpid()}-" in index_lib.commit_name()


def test_an_unknown_index_dtype_is_an_error_naming_the_choices(tmp_path):
  with pytest.raises(index_lib.IndexFileError, match=re.escape(
      "index dtype 'bfloat16': expected one of ('float16', 'float32')")):
    index_lib.build_index(str(tmp_path / "index"), constructed_set(n=4), MODEL, dtype="bfloat16")


def test_creating_an_index_makes_its_folders_there_and_nothing_in_the_working_directory(
    tmp_path, monkeypatch):
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  directory = str(tmp_path / "index")
  index_lib.open_or_create(directory, 32, MODEL)
  assert sorted(os.listdir(directory)) == [index_lib.META_FILE, index_lib.REMOVALS_DIR,
                                           index_lib.SHARDS_DIR]
  assert not os.listdir(tmp_path / "cwd")


def test_studies_of_another_dimension_are_an_error_naming_both(index_dir):
  with pytest.raises(index_lib.IndexFileError, match=re.escape(
      f"{os.path.join(index_dir, index_lib.META_FILE)}: the index holds 32-d embeddings, the "
      f"studies to add are 16-d (another model)")):
    index_lib.open_or_create(index_dir, 16, MODEL)
  with pytest.raises(index_lib.IndexFileError, match=re.escape(
      f"{index_dir}: the index holds 32-d embeddings, the studies to add are 16-d")):
    index_lib.add_studies(index_dir, constructed_set(n=4, d=16))
  with pytest.raises(interchange.InterchangeError, match=f"{index_dir}: missing required field"):
    index_lib.add_studies(index_dir, {"image_embeddings": np.ones((2, 32), np.float32)})


@pytest.mark.parametrize("count, shown", [
    (5, "(sub-0000, sub-0001, sub-0002, sub-0003, sub-0004)"),
    (6, "(sub-0000, sub-0001, sub-0002, sub-0003, sub-0004 and 1 more)")])
def test_a_duplicate_error_names_the_first_five_studies(index_dir, count, shown):
  with pytest.raises(index_lib.DuplicateStudyError, match=re.escape(
      f"{count} of the {count} studies to add are already in the index {shown}; pass --replace")):
    index_lib.add_studies(index_dir, subset(constructed_set(), range(count)))


def test_a_shard_is_written_hidden_in_shards_and_appears_whole(index_dir, monkeypatch):
  """Readers skip the hidden staging folder (a search meanwhile sees the old studies); it is on
  the shard's filesystem, so the rename that publishes it is atomic."""
  seen = []
  write_shard = index_lib._write_shard   # pylint: disable=protected-access

  def write_and_look(folder, *args, **kwargs):
    write_shard(folder, *args, **kwargs)
    seen.append((folder, index_lib.load_index(index_dir).n))
  monkeypatch.setattr(index_lib, "_write_shard", write_and_look)
  name = index_lib.add_studies(index_dir, subset(constructed_set(n=302), [300, 301]))
  ((folder, n_meanwhile),) = seen
  assert os.path.dirname(folder) == os.path.join(index_dir, index_lib.SHARDS_DIR)
  assert os.path.basename(folder).startswith(".") and n_meanwhile == 300
  assert index_lib.load_index(index_dir).n == 302 and index_lib.load_index(
      index_dir).shards[-1].name == name


def test_a_failed_append_leaves_the_index_as_it_was(index_dir):
  shards = sorted(os.listdir(os.path.join(index_dir, index_lib.SHARDS_DIR)))
  with pytest.raises(ValueError, match="1 thumbnails for 2 studies"):
    index_lib.add_studies(index_dir, subset(constructed_set(n=302), [300, 301]), thumbnails=[b""])
  assert sorted(os.listdir(os.path.join(index_dir, index_lib.SHARDS_DIR))) == shards
  assert index_lib.load_index(index_dir).n == 300


def test_studies_without_reports_or_paths_are_indexed_with_empty_ones(tmp_path):
  data = constructed_set(n=3)
  bare = interchange.EmbeddingSet(image_embeddings=data.image_embeddings,
                                  text_embeddings=data.text_embeddings, study_ids=data.study_ids)
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), bare, MODEL))
  assert list(index.reports) == list(index.source_paths) == ["", "", ""]
  assert index.reports_count == 0 and not index.has_report(0)
  assert index.thumbnail(0) == b"" and not index.study(0)["has_thumbnail"]   # none given


def test_a_shard_s_files_hold_what_the_readme_documents(tmp_path, monkeypatch):
  """shard.json, studies.arrow and thumbnails.bin as another tool reads them (json, pyarrow)."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  data = constructed_set(n=3)
  data.reports[2] = " "
  directory = index_lib.build_index(str(tmp_path / "index"), subset(data, [0, 1]), MODEL)
  name = index_lib.add_studies(directory, subset(data, [1, 2]), thumbnails=[b"ab", b"cde"],
                               replace=True)
  folder = os.path.join(directory, index_lib.SHARDS_DIR, name)
  with open(os.path.join(folder, index_lib.SHARD_META), encoding="utf-8") as f:
    record = json.load(f)
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record.pop("created"))
  assert record == {"n": 2, "dim": 32, "dtype": "float16", "replaces": ["sub-0001"],
                    "writer": {"host": socket.gethostname(), "pid": os.getpid()}}
  table = pa.ipc.open_file(os.path.join(folder, index_lib.TABLE_FILE)).read_all()
  assert table.to_pydict() == {
      "study_id": ["sub-0001", "sub-0002"], "source_path": list(data.source_paths[1:]),
      "report": list(data.reports[1:]), "has_report": [True, False],
      "thumbnail": [index_lib.THUMBNAILS_FILE] * 2, "thumbnail_offset": [0, 2],
      "thumbnail_length": [2, 3]}
  with open(os.path.join(folder, index_lib.THUMBNAILS_FILE), "rb") as f:
    assert f.read() == b"abcde"
  first = index_lib.load_index(directory).shards[0].table
  assert first.column("thumbnail").to_pylist() == ["", ""]
  assert first.column("thumbnail_length").to_pylist() == [0, 0]
  assert not os.listdir(tmp_path / "cwd")


# --- Reading: damaged files -----------------------------------------------------------------------

@pytest.mark.parametrize("content, problem", [
    ("{not json", "unreadable ("), ("[]", "format None version None, this version"),
    ('{"format": "other-index", "version": 3}', "format 'other-index' version 3, this version")])
def test_an_unreadable_or_foreign_index_meta_is_an_error_naming_it(index_dir, content, problem):
  path = os.path.join(index_dir, index_lib.META_FILE)
  open(path, "w", encoding="utf-8").write(content)
  with pytest.raises(index_lib.IndexFileError, match=re.escape(f"{path}: {problem}")):
    index_lib.load_index(index_dir)


def test_other_files_beside_the_commits_are_ignored(index_dir):
  """A stray note in shards/ or removals/, an unfinished removal record, macOS's AppleDouble
  copy of a record ("._<name>.json"): not commits."""
  index_lib.remove_studies(index_dir, ["sub-0001"])
  removals = os.path.join(index_dir, index_lib.REMOVALS_DIR)
  (record,) = os.listdir(removals)
  for path in (os.path.join(index_dir, index_lib.SHARDS_DIR, "notes.txt"),
               os.path.join(removals, "notes.txt"), os.path.join(removals, "._" + record),
               os.path.join(removals, record + ".tmp-0a1b2c3d")):
    open(path, "wb").write(b"\0\1 not a commit")
  index = index_lib.load_index(index_dir)
  assert index.n == 299 and len(index.commits) == 2


@pytest.mark.parametrize("damage", ["truncated", "not arrow"])
def test_a_damaged_metadata_table_is_an_error_naming_it(index_dir, damage):
  shard = index_lib.load_index(index_dir).shards[0]
  path = os.path.join(shard.folder, index_lib.TABLE_FILE)
  if damage == "truncated":
    os.truncate(path, os.path.getsize(path) // 2)
  else:
    open(path, "wb").write(b"not a table")
  with pytest.raises(index_lib.IndexFileError, match=f"{path}: unreadable metadata table .*remove "
                                                     f"this shard or rebuild the index"):
    index_lib.load_index(index_dir)


@pytest.mark.parametrize("record", ["not json", '{"ids": ["sub-0001"]}', '["sub-0001"]'])
def test_a_damaged_removal_record_is_an_error_naming_it(index_dir, record):
  index_lib.remove_studies(index_dir, ["sub-0001"])
  removals = os.path.join(index_dir, index_lib.REMOVALS_DIR)
  path = os.path.join(removals, os.listdir(removals)[0])
  open(path, "w", encoding="utf-8").write(record)
  with pytest.raises(index_lib.IndexFileError, match=f"{path}: unreadable removal record"):
    index_lib.load_index(index_dir)


def embeddings_file(index_dir):
  return os.path.join(index_lib.load_index(index_dir).shards[0].folder, index_lib.IMAGE_FILE)


def test_an_npy_file_of_format_version_2_is_read(index_dir):
  path = embeddings_file(index_dir)
  array = np.load(path)
  with open(path, "wb") as f:
    np.lib.format.write_array(f, array, version=(2, 0))
  np.testing.assert_array_equal(index_lib.load_index(index_dir).embeddings("image", np.float16),
                                array)


@pytest.mark.parametrize("write, problem", [
    (lambda f, a: np.lib.format.write_array(f, a, version=(3, 0)),
     "npy format version (3, 0), expected 1.0 or 2.0"),
    (lambda f, a: np.save(f, np.asfortranarray(a)),
     "a Fortran-order array of shape (300, 32), expected a C-order (rows, dim) one"),
    (lambda f, a: np.save(f, a.reshape(300, 4, 8)),
     "a array of shape (300, 4, 8), expected a C-order (rows, dim) one")])
def test_an_npy_file_of_another_layout_is_an_error_saying_what_was_expected(index_dir, write,
                                                                            problem):
  path = embeddings_file(index_dir)
  array = np.load(path)
  with open(path, "wb") as f:
    write(f, array)
  with pytest.raises(index_lib.IndexFileError, match=re.escape(f"{path}: unreadable embeddings "
                                                               f"({problem}); remove this shard")):
    index_lib.load_index(index_dir)


@pytest.mark.parametrize("shape, dtype", [((300, 16), np.float16), ((299, 32), np.float16),
                                          ((300, 32), np.float32)])
def test_embeddings_of_another_shape_or_dtype_are_an_error_saying_what_was_expected(
    index_dir, shape, dtype):
  path = embeddings_file(index_dir)
  np.save(path, np.zeros(shape, dtype))
  found = f"{shape} {np.dtype(dtype).name}"
  with pytest.raises(index_lib.IndexFileError, match=re.escape(
      f"{path}: {found}, expected (300, 32) float16 (studies.arrow has 300 rows)")):
    index_lib.load_index(index_dir)


# --- Reading: rows, studies, thumbnails, description ----------------------------------------------

def npy_rows_by_study(directory):
  """{study id: (image row, text row)} as the shard files hold them (np.load, pyarrow), later
  commits superseding earlier ones, removals applied: the live rows, read independently."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  commits = [(n, "shard") for n in os.listdir(os.path.join(directory, index_lib.SHARDS_DIR))]
  commits += [(n[:-len(".json")], "removal")
              for n in os.listdir(os.path.join(directory, index_lib.REMOVALS_DIR))]
  rows = {}
  for name, kind in sorted(commits):
    if kind == "removal":
      with open(os.path.join(directory, index_lib.REMOVALS_DIR, name + ".json")) as f:
        for study in json.load(f)["study_ids"]:
          del rows[study]
      continue
    folder = os.path.join(directory, index_lib.SHARDS_DIR, name)
    ids = pa.ipc.open_file(os.path.join(folder, index_lib.TABLE_FILE)).read_all()["study_id"]
    image, text = (np.load(os.path.join(folder, f))
                   for f in (index_lib.IMAGE_FILE, index_lib.TEXT_FILE))
    for local, study in enumerate(ids.to_pylist()):
      rows.pop(study, None)
      rows[study] = (image[local], text[local])
  return rows


@pytest.fixture
def archive(tmp_path):
  """Three shards: one study, then seven, then a replacement of sub-0003 with a new sub-0008 that
  is then removed (a dead row after the last live one)."""
  data = constructed_set(n=9)
  directory = index_lib.build_index(str(tmp_path / "index"), subset(data, [0]), MODEL)
  index_lib.add_studies(directory, subset(data, range(1, 8)))
  index_lib.add_studies(directory, subset(data, [3, 8]), replace=True)
  index_lib.remove_studies(directory, ["sub-0008"])
  return directory


def test_embeddings_and_vectors_are_the_live_rows_of_the_files(archive):
  index, expected = index_lib.load_index(archive), npy_rows_by_study(archive)
  ids = [f"sub-{i:04d}" for i in (0, 1, 2, 4, 5, 6, 7, 3)]
  assert list(index.study_ids) == ids == list(expected)
  for position, against in enumerate(index_lib.TARGETS):
    rows = np.array([expected[s][position] for s in ids])
    np.testing.assert_array_equal(index.embeddings(against), rows)
    assert index.embeddings(against).dtype == np.float32
    assert index.embeddings(against, np.float16).dtype == np.float16
    picked = [7, 0, 3, 0]
    vectors = index.vectors(picked, against)
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, rows[picked])
    assert index.vectors([], against).shape == (0, 32)
  np.testing.assert_array_equal(index.embeddings(), index.embeddings("image"))


def test_a_loaded_index_names_its_directory_commits_and_has_its_own_memo(archive):
  index = index_lib.load_index(archive)
  shards = sorted(os.listdir(os.path.join(archive, index_lib.SHARDS_DIR)))
  (removal,) = os.listdir(os.path.join(archive, index_lib.REMOVALS_DIR))
  assert index.directory == archive
  assert index.commits == [f"shard:{n}" for n in shards] + [f"removal:{removal[:-5]}"]
  index.cache["keyword"] = 1
  assert index_lib.load_index(archive).cache == {}
  with pytest.raises(ValueError, match=re.escape(f"the index {archive} expects vectors of "
                                                 f"dimension 32")):
    index_lib.search(index, np.ones(16))


def test_studies_and_thumbnails_are_read_back_by_row(tmp_path):
  data = constructed_set(n=3)
  data.reports[1] = ""
  pngs = [b"\x89", b"", b"\x89PNG third"]                     # one byte is a thumbnail too
  index = index_lib.load_index(index_lib.build_index(str(tmp_path / "index"), data, MODEL,
                                                     thumbnails=pngs))
  assert [index.study(r) for r in range(3)] == [
      {"study_id": f"sub-{r:04d}", "source_path": f"CT{r}/ct/sub-{r:04d}.nii.gz",
       "report": data.reports[r], "has_thumbnail": bool(pngs[r])} for r in range(3)]
  assert [index.thumbnail(r) for r in range(3)] == pngs
  assert [index.has_report(r) for r in range(3)] == [True, False, True]
  assert index.reports_count == 2


def test_describe_counts_the_live_studies_and_the_shards_bytes(archive):
  index = index_lib.load_index(archive)
  shards = os.path.join(archive, index_lib.SHARDS_DIR)
  size = sum(os.path.getsize(os.path.join(folder, f))
             for folder, _, files in os.walk(shards) for f in files)
  assert index_lib.describe(index) == {"n": 8, "dim": 32, "dtype": "float16", "shards": 3,
                                       "bytes": size}


# --- Memory-mapped rows: reads and released pages -------------------------------------------------

def mapped_pages(mapped):
  """(pages,) bool: which pages of a MappedRows mapping this process has mapped (the present bit
  of /proc/self/pagemap; page-cache residency, which release keeps, does not count)."""
  page = mmap.PAGESIZE
  start = np.frombuffer(mapped.mapping, np.uint8).ctypes.data
  count = -(-len(mapped.mapping) // page)
  with open("/proc/self/pagemap", "rb") as f:
    f.seek(start // page * 8)
    entries = np.frombuffer(f.read(8 * count), np.uint64)
  return (entries >> np.uint64(63)).astype(bool)


def pages_of_rows(path, start, stop, row_bytes):
  """The pages holding any byte of rows [start, stop) of an .npy file (np.load's data offset)."""
  offset = np.load(path, mmap_mode="r").offset
  first, end = offset + start * row_bytes, offset + stop * row_bytes
  return set(range(first // mmap.PAGESIZE, -(-end // mmap.PAGESIZE)))


@pytest.mark.parametrize("n, d, dtype", [(3000, 8, "float32"),     # many rows to a page
                                         (3000, 8, "float16"),
                                         (6, 2048, "float32")])    # a row over two pages
def test_released_pages_are_exactly_those_of_the_rows_asked(tmp_path, n, d, dtype):
  directory = index_lib.build_index(str(tmp_path / "index"), constructed_set(n=n, d=d), MODEL,
                                    dtype=dtype)
  shard = index_lib.load_index(directory).shards[0]
  mapped, row_bytes = shard.mapped["text"], d * np.dtype(dtype).itemsize
  start, stop = n // 6 + 1, n // 2 + 1
  np.asarray(mapped.rows).sum()                             # every page mapped
  assert mapped_pages(mapped).all()
  shard.release("text", start, stop)
  expected = pages_of_rows(mapped.path, start, stop, row_bytes)
  assert set(np.flatnonzero(~mapped_pages(mapped))) == expected
  np.asarray(mapped.rows).sum()
  shard.release("text")                                     # by default, every row
  assert not mapped_pages(mapped).any()
  np.asarray(mapped.rows).sum()
  mapped.release()
  assert not mapped_pages(mapped).any()


@pytest.mark.parametrize("d, dtype", [(8, "float16"), (2048, "float32")])
def test_read_rows_are_the_file_s_rows_and_nothing_is_left_mapped(tmp_path, d, dtype):
  directory = index_lib.build_index(str(tmp_path / "index"), constructed_set(n=6, d=d), MODEL,
                                    dtype=dtype)
  index = index_lib.load_index(directory)
  mapped = index.shards[0].mapped["image"]
  picked = [5, 0, 3, 3, 1]
  rows = mapped.read(picked)
  assert rows.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(rows, np.load(mapped.path)[picked])
  index.embeddings("image")                                 # reads and releases every row
  assert not mapped_pages(mapped).any()
  mapped.read(picked)
  assert not mapped_pages(mapped).any()


def test_exact_search_without_faiss_ranks_by_matrix_products(index_dir, monkeypatch):
  monkeypatch.setattr(index_lib, "_half_quantizer", lambda dim: None)   # as without faiss
  index = index_lib.load_index(index_dir)
  queries = index_lib.query_vectors(index, constructed_set().text_embeddings[:2])
  rows, scores = index_lib.exact_top_k(index, queries, 5)
  expected_rows, expected_scores = numpy_top_k(queries, index.embeddings(), True, 5)
  np.testing.assert_array_equal(rows, expected_rows)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(index_lib.as_float32(index.shards[0].image[:3]),
                                np.asarray(index.shards[0].image[:3], np.float32))


# --- Search: excerpts -----------------------------------------------------------------------------

def test_excerpts_collapse_whitespace_and_cut_at_the_last_word_that_fits():
  assert index_lib.excerpt("alpha\n beta\tgamma  delta", 17) == "alpha beta gamma…"
  assert index_lib.excerpt("alpha beta", 10) == "alpha beta"                 # fits exactly
  assert index_lib.excerpt("x" * 30, 10) == "x" * 10 + "…"                   # one long word
