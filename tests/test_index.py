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
