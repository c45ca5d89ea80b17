"""Retrieval metrics: the released code's formulas, chunking, sharding, ties, bootstrap, P@K."""

import importlib.util
import re
import sys
import types

import jax
import numpy as np
import pytest

from medfinder_jax import bootstrap
from medfinder_jax import interchange
from medfinder_jax import metrics
from medfinder_jax import score_pass
from medfinder_jax import score_pass_host
from medfinder_jax import zeroshot
from conftest import RANK_ENGINES, quantized_embeddings
from test_zeroshot import reference_probabilities


def released_compute_metrics(similarities):
  """The released main_ddp.py compute_metrics (torch argsort -> numpy), an independent reference.

  Rows are queries, the ground truth of row i is column i.
  """
  n = similarities.shape[0]
  sorted_indices = np.argsort(-similarities, axis=1, kind="stable")  # argsort(descending=True)
  gt_indices = np.arange(n)
  result = {}
  for k in [1, 5, 10]:
    is_match = (sorted_indices[:, :k] == gt_indices[:, None]).any(axis=1)
    result[f"R@{k}"] = is_match.astype(np.float32).mean() * 100
  ranks = [np.nonzero(sorted_indices[i] == i)[0][0] + 1 for i in range(n)]
  result["MdR"] = np.median(ranks)
  result["MnR"] = np.mean(ranks)
  return result


def assert_same_metrics(ours, reference):
  assert set(ours) == set(reference)
  for name, value in reference.items():
    assert ours[name] == pytest.approx(float(value), rel=1e-6, abs=1e-5), name


def random_similarity(n, seed):
  similarity = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
  # Precondition: no exact ties with the paired score, so argsort's rank is unambiguous.
  assert not np.any((similarity == np.diag(similarity)[:, None]).sum(axis=1) > 1)
  return similarity


def separated_pairs(n, seed):
  """Paired embeddings whose cosine similarities are well separated (gaps > 1e-5, far above
  float32 rounding) within every row and every column, with t2i and i2t ranks that differ.

  Text i holds a row of a Latin square over values in [1, 2] plus an extra coordinate that makes
  its norm 1x or 3x |values|; images are unit axes. Rows are then rotated and rescaled so they
  look generic. Returns (text, image, S) with S the exact cosine similarity matrix (float64).
  """
  rng = np.random.default_rng(seed)
  values = np.linspace(1.0, 2.0, n)
  sigma, tau = rng.permutation(n), rng.permutation(n)
  latin = values[(sigma[None, :] + tau[:, None]) % n]
  extra = np.where(rng.random(n) < 0.5, np.sqrt(8.0) * np.linalg.norm(values), 0.0)
  text = np.concatenate([latin, extra[:, None]], axis=1)
  similarity = latin / np.linalg.norm(text, axis=1, keepdims=True)
  rotation, _ = np.linalg.qr(rng.normal(size=(n + 1, n + 1)))
  scale_t, scale_i = rng.uniform(0.5, 3.0, size=(2, n, 1))
  return ((text @ rotation) * scale_t).astype(np.float32), (rotation[:n] * scale_i).astype(
      np.float32), similarity


def ranks_of(similarity, engine):
  """rank_counts over a given matrix: queries = S and gallery = identity, so queries·galleryᵀ = S."""
  greater, _ = metrics.rank_engine(engine).rank_counts(similarity,
                                           np.eye(similarity.shape[0], dtype=np.float32))["t2i"]
  return 1 + np.asarray(greater)


# --- The released formulas ------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 64, 203, 1000])
def test_ranks_of_a_similarity_matrix_match_released_argsort_metrics(n):
  similarity = random_similarity(n, seed=n)
  reference = released_compute_metrics(similarity)
  assert_same_metrics(metrics.summarize_ranks(metrics.similarity_ranks(similarity)), reference)
  for engine in RANK_ENGINES:
    assert_same_metrics(metrics.summarize_ranks(ranks_of(similarity, engine)), reference)


@pytest.mark.parametrize("n", [64, 203])
def test_retrieval_metrics_match_released_validate_both_directions(n):
  text, image, similarity = separated_pairs(n, seed=n)
  result = metrics.retrieval_metrics(text, image)
  assert result["n"] == n
  assert_same_metrics(result["t2i"], released_compute_metrics(similarity))
  assert_same_metrics(result["i2t"], released_compute_metrics(similarity.T))
  assert result["t2i"] != result["i2t"]   # the construction makes the directions differ


def test_perfect_retrieval_gives_r1_100_and_median_rank_1():
  embeddings = np.random.default_rng(0).normal(size=(50, 16))
  result = metrics.retrieval_metrics(embeddings, embeddings)
  for direction in ("t2i", "i2t"):
    assert result[direction] == {"R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "MdR": 1.0,
                                 "MnR": 1.0}


def test_reversed_retrieval_gives_median_rank_n():
  n = 40
  image = np.eye(n)
  text = 1.0 - np.eye(n)        # each text is farthest from its own image, equally near the rest
  result = metrics.retrieval_metrics(text, image)
  for direction in ("t2i", "i2t"):
    assert result[direction] == {"R@1": 0.0, "R@5": 0.0, "R@10": 0.0, "MdR": float(n),
                                 "MnR": float(n)}


def test_median_rank_of_an_even_count_is_the_mean_of_the_middle_two_like_np_median():
  assert metrics.summarize_ranks([1, 2, 5, 9])["MdR"] == 3.5


def test_a_collapsed_model_scores_chance_not_perfection():
  """All embeddings equal: every pair ties with everything. The default rule gives a random
  ranking's expected values; "best" and "worst" bound them."""
  n = 6
  embeddings = np.ones((n, 4))
  mid = metrics.retrieval_metrics(embeddings, embeddings)
  assert mid["t2i"] == pytest.approx(metrics.chance_levels(n))
  assert mid["ties"] == {"rule": "mid", "t2i_tied_queries": n, "i2t_tied_queries": n}
  best = metrics.retrieval_metrics(embeddings, embeddings, ties="best")
  worst = metrics.retrieval_metrics(embeddings, embeddings, ties="worst")
  assert best["t2i"]["MdR"] == 1.0 and best["t2i"]["R@1"] == 100.0
  assert worst["t2i"]["MdR"] == 6.0 and worst["t2i"]["R@5"] == 0.0


def test_mid_rule_is_the_expectation_of_random_tie_breaking():
  """Against a Monte-Carlo reference: shuffle each row's items, sort stably by score, read the
  pair's position (the released code's argsort with ties broken at random)."""
  rng = np.random.default_rng(7)
  similarity = rng.integers(0, 3, size=(40, 40)).astype(np.float32)   # many ties
  ours = metrics.summarize_ranks(metrics.similarity_ranks(similarity), ks=(1, 5, 10))
  positions = []
  for _ in range(2000):
    perm = rng.permutation(40)
    order = perm[np.argsort(-similarity[:, perm], axis=1, kind="stable")]
    positions.append(np.argmax(order == np.arange(40)[:, None], axis=1) + 1)
  positions = np.stack(positions)                                      # (draws, queries)
  for k in (1, 5, 10):
    assert ours[f"R@{k}"] == pytest.approx(100 * np.mean(positions <= k), abs=1.0)
  assert ours["MnR"] == pytest.approx(np.mean(positions), abs=0.2)


def test_the_table_warns_when_queries_tie():
  embeddings = np.ones((6, 4))
  table = metrics.format_metrics_table(metrics.retrieval_metrics(embeddings, embeddings))
  assert "warning: the paired item ties with other items in 6 t2i and 6 i2t queries of 6" in table
  assert "'mid' tie rule" in table
  lines = table.splitlines()
  assert lines[0].split() == ["N=6", "R@1", "R@5", "R@10", "MdR", "MnR"] and len(lines) == 4
  assert lines[3] == metrics.tie_warning(metrics.retrieval_metrics(embeddings, embeddings))
  distinct = np.random.default_rng(0).normal(size=(6, 4))
  assert "warning" not in metrics.format_metrics_table(metrics.retrieval_metrics(distinct,
                                                                                 distinct))


def test_released_argsort_rank_lies_between_the_best_and_worst_tie_ranks():
  rng = np.random.default_rng(3)
  similarity = rng.integers(0, 4, size=(30, 30)).astype(np.float32)   # many ties
  argsort_ranks = np.argmax(np.argsort(-similarity, axis=1) == np.arange(30)[:, None], axis=1) + 1
  best = metrics.similarity_ranks(similarity, ties="best").ranks
  worst = metrics.similarity_ranks(similarity, ties="worst").ranks
  assert np.all(best <= argsort_ranks) and np.all(argsort_ranks <= worst)
  assert np.any(best < worst)


def test_non_finite_or_unpaired_embeddings_are_rejected():
  good = np.ones((4, 3))
  with pytest.raises(ValueError, match="NaN or Inf"):
    metrics.retrieval_metrics(good, np.where(np.eye(4, 3) > 0, np.nan, 1.0))
  with pytest.raises(ValueError, match=r"\(N, D\)"):
    metrics.retrieval_metrics(good, np.ones((5, 3)))


def test_rank_engine_is_jax_for_a_mesh_and_host_on_a_cpu():
  mesh = jax.make_mesh((8,), ("data",))
  assert jax.default_backend() == "cpu"
  assert metrics.rank_engine() is score_pass_host
  assert metrics.rank_engine(mesh=mesh) is score_pass
  assert metrics.rank_engine("jax") is score_pass
  with pytest.raises(ValueError, match="takes no mesh"):
    metrics.rank_engine("host", mesh=mesh)
  with pytest.raises(ValueError, match="rank engine must be one of"):
    metrics.rank_engine("gpu")
  with pytest.raises(metrics.SettingsError, match="eval.rank_engine"):
    metrics.MetricSettings(engine="gpu")


def test_rank_engine_auto_picks_jax_where_an_accelerator_plugin_is_installed(monkeypatch):
  """Before JAX is imported (as in `launch.py metrics`), an installed accelerator plugin means JAX
  would run on it; JAX_PLATFORMS=cpu overrides that."""
  monkeypatch.delitem(sys.modules, "jax")
  installed = {"jax_plugins"}
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: object() if name in installed else None)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert metrics.rank_engine() is score_pass
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert metrics.rank_engine() is score_pass_host
  monkeypatch.delenv("JAX_PLATFORMS")
  installed.clear()
  assert metrics.rank_engine() is score_pass_host


# --- Bootstrap ------------------------------------------------------------------------------------

def geometric_ranks(n, seed):
  return np.minimum(np.random.default_rng(seed).geometric(0.05, size=n), n)


def two_directions(n):
  return {"t2i": geometric_ranks(n, 0), "i2t": geometric_ranks(n, 1)}


def tied_directions(n, seed):
  """Two directions of n queries with many ties (mid rule: fractional hits and ranks)."""
  rng = np.random.default_rng(seed)
  return [metrics.DirectionRanks(greater=rng.integers(0, 30, n), tied=rng.integers(0, 4, n),
                                 rule="mid") for _ in range(2)]


def test_bootstrap_replicates_equal_metrics_of_explicitly_resampled_queries():
  directions = tied_directions(300, seed=2)
  totals = metrics._bootstrap_rank_totals(directions, seed=9, ks=(1, 5, 10), num_samples=4)
  counts = bootstrap.resample_counts(9, 0, 4, 300)
  for b in range(4):
    draws = np.repeat(np.arange(300), counts[:, b])       # the resampled queries, as a multiset
    for m, d in enumerate(directions):
      expected = metrics.summarize_ranks(d._replace(greater=d.greater[draws],
                                                    tied=d.tied[draws]))
      for k in (1, 5, 10):
        assert 100 * float(totals[f"R@{k}"][b, m]) / 300 == pytest.approx(expected[f"R@{k}"])
      assert float(totals["MnR"][b, m]) / 300 == pytest.approx(expected["MnR"])
      assert float(totals["MdR"][b, m]) == expected["MdR"]


def test_bootstrap_interval_contains_the_point_estimate():
  ranks = two_directions(300)
  intervals = metrics.bootstrap_rank_intervals(ranks, num_samples=500, seed=0)
  for direction, values in ranks.items():
    point = metrics.summarize_ranks(values)
    for name, (lo, hi) in intervals[direction].items():
      assert lo <= point[name] <= hi, (direction, name)
      assert lo < hi or name == "MdR"


def test_bootstrap_interval_narrows_as_n_grows():
  widths = {}
  for n in (300, 6000):
    ci = metrics.bootstrap_rank_intervals(two_directions(n), num_samples=300)["t2i"]
    widths[n] = {name: hi - lo for name, (lo, hi) in ci.items()}
  for name in ("R@1", "R@10", "MnR"):
    assert widths[6000][name] < widths[300][name] / 2, name


def test_bootstrap_is_reproducible_from_its_seed_and_fewer_samples_are_a_prefix():
  ranks = two_directions(300)
  directions = [metrics._as_direction_ranks(r) for r in ranks.values()]
  first = metrics._bootstrap_rank_totals(directions, 1, (1, 5, 10), 100)
  again = metrics._bootstrap_rank_totals(directions, 1, (1, 5, 10), 40)
  np.testing.assert_array_equal(again["MnR"], first["MnR"][:40])
  assert (metrics.bootstrap_rank_intervals(ranks, num_samples=100, seed=1)
          == metrics.bootstrap_rank_intervals(ranks, num_samples=100, seed=1))
  assert (metrics.bootstrap_rank_intervals(ranks, num_samples=100, seed=2)
          != metrics.bootstrap_rank_intervals(ranks, num_samples=100, seed=1))


def test_retrieval_metrics_report_intervals_for_every_metric():
  text, image = quantized_embeddings(80, 8, seed=6)
  result = metrics.retrieval_metrics(text, image, bootstrap_samples=50, seed=3)
  assert result["ci"]["samples"] == 50 and result["ci"]["level"] == 0.95
  for direction in ("t2i", "i2t"):
    assert set(result["ci"][direction]) == set(result[direction])


# --- Keyword retrieval ----------------------------------------------------------------------------

def test_precision_at_k_counts_relevant_items_among_the_k_best_scores():
  n = 150
  order = np.random.default_rng(0).permutation(n)       # gallery item order[r] is ranked r
  scores = np.empty(n)
  scores[order] = np.linspace(1.0, 0.0, n)
  relevant = np.zeros(n, bool)
  relevant[order[:30]] = True                          # the 30 best are relevant
  result = metrics.precision_at_k(scores[None], relevant[None])
  assert [float(result[f"P@{k}"][0]) for k in (20, 50, 100)] == [100.0, 60.0, 30.0]


def test_precision_at_k_larger_than_the_gallery_is_not_reported():
  scores = np.linspace(1.0, 0.0, 40)[None]
  relevant = (np.arange(40) % 2 == 0)[None]
  result = metrics.precision_at_k(scores, relevant)
  assert float(result["P@20"][0]) == 50.0
  assert result["P@50"] is None and result["P@100"] is None


def test_keyword_metrics_rank_images_by_cosine_to_the_keyword_embedding():
  n = 120
  gallery = np.eye(n) * np.random.default_rng(1).uniform(1, 5, size=(n, 1))  # norms do not matter
  keyword = np.linspace(2.0, 1.0, n)[None]           # image j scores higher the lower j is
  relevance = (np.arange(n) % 4 == 0)[None]
  result = metrics.keyword_metrics(keyword, gallery, relevance, ["nodule"],
                                   bootstrap_samples=200, seed=0)["nodule"]
  assert (result["P@20"], result["P@50"], result["P@100"]) == (25.0, 26.0, 25.0)
  assert result["n_relevant"] == 30 and result["chance"] == 25.0
  for k in (20, 50, 100):
    lo, hi = result["ci"][f"P@{k}"]
    assert lo <= result[f"P@{k}"] <= hi


def test_bootstrapped_precision_fills_the_top_k_with_resampled_copies():
  # Every gallery item relevant: whatever the resample, its top K holds exactly K relevant copies.
  scores = np.linspace(1.0, 0.0, 60)[None]
  relevant = np.ones((1, 60), bool)
  hits = metrics._bootstrap_precisions(metrics._descending_order(scores), relevant, 0, (20, 50), 20)
  assert np.all(np.asarray(hits[20]) == 20) and np.all(np.asarray(hits[50]) == 50)


def test_bootstrapped_precision_equals_p_at_k_of_the_explicitly_resampled_gallery():
  rng = np.random.default_rng(4)
  scores = rng.integers(0, 40, size=(3, 200)).astype(np.float32)      # many tied scores
  relevant = rng.random((3, 200)) < 0.3
  hits = metrics._bootstrap_precisions(metrics._descending_order(scores), relevant, 5, (20, 50),
                                       4)
  counts = bootstrap.resample_counts(5, 0, 4, 200)
  for b in range(4):
    drawn = np.repeat(np.arange(200), counts[:, b])           # the resampled gallery
    for q in range(3):
      ranked = drawn[np.argsort(-scores[q, drawn], kind="stable")]
      for k in (20, 50):
        assert hits[k][b, q] == relevant[q, ranked[:k]].sum()


# --- Tables ---------------------------------------------------------------------------------------

def test_table_has_a_row_per_direction_with_intervals_and_optional_chance():
  text, image = quantized_embeddings(30, 8, seed=7)
  result = metrics.retrieval_metrics(text, image, bootstrap_samples=20)
  table = metrics.format_metrics_table(result, show_chance=True)
  lines = table.splitlines()
  assert lines[0].split()[1:] == ["R@1", "R@5", "R@10", "MdR", "MnR"]
  assert [line.split()[0] for line in lines[1:]] == ["t2i", "i2t", "chance"]
  assert f"{result['t2i']['R@1']:.2f} [{result['ci']['t2i']['R@1'][0]:.2f}," in lines[1]
  assert lines[3].split()[1:] == ["3.33", "16.67", "33.33", "15.50", "15.50"]


def test_chance_levels_are_those_of_a_random_ranking():
  assert metrics.chance_levels(200) == {"R@1": 0.5, "R@5": 2.5, "R@10": 5.0, "MdR": 100.5,
                                        "MnR": 100.5}
  assert metrics.chance_levels(4)["R@10"] == 100.0


def eval_config(**changes):
  """Config `eval` of configs/default.py, with `changes` set."""
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config().eval
  for key, value in changes.items():
    config[key] = value
  return config


@pytest.mark.parametrize("field, value, message", [
    ("ties", "median", "eval.ties='median'"),
    ("recall_ks", (1, 0), "eval.recall_ks=(1, 0)"),
    ("recall_ks", (), "eval.recall_ks=()"),
    ("recall_ks", (0, -1), "eval.recall_ks=(0, -1)"),
    ("keyword_topk", (20, -5), "eval.keyword_topk=(20, -5)"),
    ("ci_level", 1.5, "eval.ci_level=1.5"),
    ("ci_level", 1.0, "eval.ci_level=1.0"),
    ("ci_level", 0.0, "eval.ci_level=0.0"),
    ("volume_retrieval.ks", (5, 0), "eval.volume_retrieval.ks=(5, 0)"),
    ("volume_retrieval.gallery", "some", "eval.volume_retrieval.gallery='some'"),
    ("bootstrap_samples", -1, "--bootstrap must be 0")])
def test_unusable_eval_settings_name_the_field(field, value, message):
  config = eval_config()
  metrics.MetricSettings.from_config(config)
  *parents, name = field.split(".")
  section = config
  for parent in parents:
    section = section[parent]
  with section.ignore_type():
    section[name] = value
  with pytest.raises(metrics.SettingsError, match=re.escape(message)):
    metrics.MetricSettings.from_config(config)


def test_an_embedding_set_with_keywords_derives_relevance_from_reports():
  from medfinder_jax import interchange  # pylint: disable=import-outside-toplevel
  n = 30
  image = np.eye(n, 32, dtype=np.float32)
  keyword = np.zeros((1, 32), np.float32)
  keyword[0, :10] = 1.0              # the keyword embedding points at the first 10 images
  embeddings = interchange.validate({
      "image_embeddings": image, "text_embeddings": image,
      "study_ids": np.array([f"s{i}" for i in range(n)]),
      "reports": np.array(["Left lower lobe atelectasis." if i < 10 else "No atelectasis."
                           for i in range(n)]),
      "keywords": np.array(["atelectasis"]), "keyword_embeddings": keyword})
  result, ranks = metrics.embedding_metrics(embeddings, metrics.MetricSettings())
  assert result["t2i"]["R@1"] == 100.0 and set(ranks) == {"t2i", "i2t"}
  assert result["keywords"]["atelectasis"]["n_relevant"] == 10
  assert result["keywords"]["atelectasis"]["P@20"] == 50.0
  assert result["keyword_relevance_from"] == "reports"


# --- Volume -> volume retrieval ------------------------------------------------------------------

def brute_force_volume_retrieval(image, labels, ks, exclude_self, with_findings):
  """Full argsort per query (ties to the lower index), then the textbook P@K / AP@K / Jaccard."""
  unit = image / np.linalg.norm(image, axis=1, keepdims=True)
  labels = labels > 0
  n = len(labels)
  gallery = labels.any(axis=1) if with_findings else np.ones(n, bool)
  out = {f"{m}@{k}": [] for k in ks for m in ("P", "MAP", "Jaccard")}
  for q in range(n):
    candidates = np.array([j for j in range(n) if gallery[j] and not (exclude_self and j == q)])
    ranked = candidates[np.argsort(-(unit[candidates] @ unit[q]), kind="stable")]
    shared = np.sum(labels[q] & labels[ranked], axis=1)
    relevant = shared > 0
    jaccard = shared / np.maximum(np.sum(labels[q] | labels[ranked], axis=1), 1)
    total = relevant.sum()
    for k in ks:
      out[f"Jaccard@{k}"].append(np.mean(jaccard[:k]))
      if total:
        hits = relevant[:k]
        precisions = np.array([np.mean(hits[:i + 1]) for i in range(k)])
        out[f"P@{k}"].append(100 * np.mean(hits))
        out[f"MAP@{k}"].append(100 * np.sum(precisions[hits]) / min(k, total))
  return {name: float(np.mean(values)) for name, values in out.items()}


@pytest.mark.parametrize("engine", RANK_ENGINES)
@pytest.mark.parametrize("exclude_self,gallery", [(True, "all"), (False, "with_findings")])
def test_volume_retrieval_equals_a_brute_force_reference(exclude_self, gallery, engine):
  rng = np.random.default_rng(20)
  labels = (rng.random((300, 6)) < 0.25).astype(np.int8)
  image = labels @ rng.normal(size=(6, 16)) + rng.normal(size=(300, 16))
  ks = (1, 5, 10, 50)
  ours = metrics.volume_retrieval(image, labels, ks, exclude_self=exclude_self, gallery=gallery,
                                  engine=engine)
  reference = brute_force_volume_retrieval(image, labels, ks, exclude_self,
                                           gallery == "with_findings")
  for name, value in reference.items():
    assert ours[name] == pytest.approx(value), name
  assert ours["n_queries"] == int(sum(
      (labels @ labels.T > 0).sum(axis=1) - (labels.any(axis=1) if exclude_self else 0) > 0))


def test_volume_retrieval_with_k_above_the_gallery_is_none():
  labels = np.eye(4, dtype=np.int8)[[0, 0, 1, 1]]
  result = metrics.volume_retrieval(np.eye(4)[[0, 0, 1, 1]], labels, ks=(1, 5))
  assert result["P@1"] == 100.0 and result["MAP@1"] == 100.0
  assert result["P@5"] is None and result["gallery_size"] == 3


# --- Scans with several reconstructions ------------------------------------------------------------

def reconstructions():
  """Three scans; scan "a" has three reconstructions with one (identical) report."""
  rng = np.random.default_rng(21)
  text = rng.normal(size=(3, 8)).astype(np.float32)
  scan_of_row = [0, 0, 0, 1, 2]
  image = (text[scan_of_row] + 0.1 * rng.normal(size=(5, 8))).astype(np.float32)
  return interchange.validate({
      "image_embeddings": image, "text_embeddings": text[scan_of_row],
      "study_ids": np.array(["a_1", "a_2", "a_3", "b_1", "c_1"]),
      "scan_ids": np.array(["a", "a", "a", "b", "c"]),
      "reports": np.array(["effusion.", "effusion.", "effusion.", "nodule.", "no findings."]),
      "labels": np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], np.int8),
      "label_names": np.array(["effusion", "nodule"])})


def test_scan_gallery_merges_reconstructions_and_counts_identical_reports_once():
  embeddings = reconstructions()
  merged = metrics.scan_gallery(embeddings)
  assert list(merged.study_ids) == ["a", "b", "c"]
  unit = np.asarray(metrics.l2_normalize(embeddings.image_embeddings))
  np.testing.assert_allclose(merged.image_embeddings[0], unit[:3].mean(axis=0), rtol=1e-6)
  np.testing.assert_array_equal(merged.labels, [[1, 1], [0, 1], [0, 0]])
  per_volume, _ = metrics.embedding_metrics(embeddings, metrics.MetricSettings())
  per_scan, _ = metrics.embedding_metrics(embeddings, metrics.MetricSettings(gallery="scan"))
  assert per_volume["n"] == 5 and per_volume["ties"]["i2t_tied_queries"] == 3
  assert per_volume["gallery"] == {"unit": "volume", "size": 5, "merged": False}
  assert per_scan["n"] == 3 and per_scan["gallery"] == {"unit": "scan", "size": 3,
                                                        "merged": True}
  assert per_scan["t2i"]["R@1"] == per_scan["i2t"]["R@1"] == 100.0


def test_unknown_gallery_is_refused_naming_the_field():
  with pytest.raises(metrics.SettingsError, match="eval.gallery"):
    metrics.MetricSettings(gallery="study")


# --- Defaults a caller relies on (mutation testing) -----------------------------------------------

def test_paired_ranks_default_to_the_mid_tie_rule():
  """Four identical pairs: every item ties with the paired one, so each query's mid rank is the
  middle of 1..4."""
  same = np.ones((4, 3), np.float32)
  for direction in metrics.paired_ranks(same, same).values():
    assert direction.rule == "mid"
    np.testing.assert_array_equal(direction.ranks, 2.5)


# --- Zero-shot from an embedding set, and the tables below the directions (mutation testing) -----

def zeroshot_set(**extra):
  """Ten studies, two findings, prompts that separate them; `extra` adds or drops fields."""
  rng = np.random.default_rng(31)
  labels = (rng.random((10, 2)) < 0.5).astype(np.int8)
  labels[0], labels[1] = [1, 0], [0, 1]          # both classes of both findings present
  prompts = rng.normal(size=(2, 2, 6)).astype(np.float32)
  image = (labels @ prompts[:, 0] + (1 - labels) @ prompts[:, 1]
           + 0.5 * rng.normal(size=(10, 6))).astype(np.float32)
  fields = {"image_embeddings": image, "text_embeddings": image + 0.1,
            "study_ids": np.array([f"s{i}" for i in range(10)]), "labels": labels,
            "label_names": np.array(["effusion", "nodule"]), "prompt_embeddings": prompts}
  fields.update(extra)
  return interchange.validate({k: v for k, v in fields.items() if v is not None})


def test_zeroshot_scores_use_the_files_similarity_scale_or_one_without_it():
  embeddings = zeroshot_set(logit_scale=np.float32(14.0))
  np.testing.assert_allclose(metrics.zeroshot_scores(embeddings), reference_probabilities(
      embeddings.image_embeddings, embeddings.prompt_embeddings, 14.0), rtol=1e-5)
  unscaled = zeroshot_set()
  np.testing.assert_allclose(metrics.zeroshot_scores(unscaled), reference_probabilities(
      unscaled.image_embeddings, unscaled.prompt_embeddings, 1.0), rtol=1e-5)
  assert metrics.zeroshot_scores(zeroshot_set(prompt_embeddings=None)) is None


def test_zeroshot_section_says_what_is_missing_and_which_thresholds_it_used():
  settings = metrics.MetricSettings(bootstrap_samples=25, seed=4, level=0.9)
  assert metrics.zeroshot_metrics(zeroshot_set(prompt_embeddings=None), settings) == {
      "skipped": "no prompt_embeddings in the embedding set"}
  assert metrics.zeroshot_metrics(zeroshot_set(labels=None, prompt_embeddings=None), settings) == {
      "skipped": "no labels or prompt_embeddings in the embedding set"}
  embeddings = zeroshot_set(label_thresholds=np.array([0.3, 0.6], np.float32))
  section = metrics.zeroshot_metrics(embeddings, settings)
  expected = zeroshot.classification_metrics(
      metrics.zeroshot_scores(embeddings), embeddings.labels, ["effusion", "nodule"],
      thresholds=[0.3, 0.6], threshold_source="validation split", bootstrap_samples=25, seed=4,
      level=0.9)
  assert section == expected and section["ci"] == {"level": 0.9, "samples": 25, "seed": 4}
  own = metrics.zeroshot_metrics(zeroshot_set(), settings)
  assert own["threshold_source"].startswith("evaluated split itself")
  assert own["effusion"]["threshold"] == pytest.approx(float(zeroshot.youden_thresholds(
      metrics.zeroshot_scores(zeroshot_set()), zeroshot_set().labels)[0]))


def test_full_table_lays_out_keyword_and_volume_retrieval_below_the_directions():
  result = {
      "n": 12, "t2i": {"R@1": 50.0, "MdR": 1.5}, "i2t": {"R@1": 25.0, "MdR": 3.0},
      "keywords": {
          "effusion": {"P@1": 100.0, "P@5": 60.0, "n_relevant": 4, "chance": 33.333,
                       "ci": {"P@1": [80.0, 100.0], "P@5": [40.0, 80.0]}},
          "nodule": {"P@1": 0.0, "P@5": None, "n_relevant": 1, "chance": 8.3333}},
      "volume_retrieval": {"P@1": 75.0, "MAP@1": 75.0, "Jaccard@1": 0.5, "P@5": 40.0,
                           "MAP@5": 52.125, "Jaccard@5": 0.31234, "n_queries": 8,
                           "gallery": "all", "gallery_size": 11, "exclude_self": True,
                           "relevance": "shares a label"}}
  assert metrics.format_metrics_table(result, show_chance=True).splitlines()[4:] == [
      "",
      "keyword                      P@1                   P@5  relevant  chance",
      "effusion  100.00 [80.00, 100.00]  60.00 [40.00, 80.00]         4   33.33",
      "nodule                      0.00                   n/a         1    8.33",
      "",
      "volume->volume over 8 queries, gallery all (11 volumes, query excluded), relevant = "
      "shares a label",
      "volume->volume     @1     @5",
      "P               75.00  40.00",
      "MAP             75.00  52.12",
      "Jaccard         0.500  0.312"]
  kept = dict(result, volume_retrieval=dict(result["volume_retrieval"], exclude_self=False))
  table = metrics.format_metrics_table(kept, digits=1).splitlines()
  assert table[4:7] == ["keyword                   P@1                P@5  relevant",
                        "effusion  100.0 [80.0, 100.0]  60.0 [40.0, 80.0]         4",
                        "nodule                    0.0                n/a         1"]
  assert table[8] == ("volume->volume over 8 queries, gallery all (11 volumes), relevant = "
                      "shares a label")
  assert table[10:] == ["P                75.0   40.0", "MAP              75.0   52.1",
                        "Jaccard         0.500  0.312"]


def test_scan_gallery_ors_keyword_relevance_and_keeps_the_first_source_path():
  embeddings = reconstructions()
  fields = dict(embeddings.fields(),
                source_paths=np.array(["a1.nii", "a2.nii", "a3.nii", "b.nii", "c.nii"]),
                keywords=np.array(["effusion", "nodule"]),
                keyword_embeddings=np.eye(2, 8, dtype=np.float32),
                keyword_relevance=np.array([[1, 0, 0, 0, 0], [0, 0, 1, 1, 0]], bool))
  merged = metrics.scan_gallery(interchange.validate(fields))
  assert list(merged.source_paths) == ["a1.nii", "b.nii", "c.nii"]
  np.testing.assert_array_equal(merged.keyword_relevance, [[1, 0, 0], [1, 1, 0]])
  assert merged.image_embeddings.dtype == np.float32


def test_direction_table_names_scans_and_shows_chance_for_the_results_own_ks():
  """A per-scan gallery says so in the corner; the chance row comes from the result (its K list,
  here R@50), or from N when a hand-made result has none."""
  result = {"n": 40, "gallery": {"unit": "scan", "size": 40, "merged": True},
            "t2i": {"R@1": 12.5, "R@50": 100.0}, "i2t": {"R@1": 7.5, "R@50": 100.0},
            "ci": {"t2i": {"R@1": [5.0, 20.0]}},
            "chance": metrics.chance_levels(40, ks=(1, 50))}
  assert metrics.format_metrics_table(result, show_chance=True).splitlines() == [
      "N=40 scans                  R@1    R@50",
      "t2i         12.50 [5.00, 20.00]  100.00",
      "i2t                        7.50  100.00",
      "chance                     2.50  100.00"]
  hand_made = {"n": 40, "t2i": {"R@1": 12.5, "R@5": 20.0}, "i2t": {"R@1": 7.5, "R@5": 15.0}}
  assert metrics.format_metrics_table(hand_made, show_chance=True, digits=1).splitlines() == [
      "N=40     R@1   R@5",
      "t2i     12.5  20.0",
      "i2t      7.5  15.0",
      "chance   2.5  12.5"]
  assert len(metrics.format_metrics_table(hand_made).splitlines()) == 3
  keywords = {"effusion": {"P@1": 50.0, "n_relevant": 2, "chance": 33.333}}
  assert metrics.format_keyword_table(keywords, show_chance=True, digits=1).splitlines() == [
      "keyword    P@1  relevant  chance", "effusion  50.0         2    33.3"]


def test_full_table_ends_with_the_zeroshot_table():
  section = zeroshot.classification_metrics(np.array([[0.9], [0.2], [0.7], [0.4]], np.float32),
                                            np.array([[1], [0], [1], [0]]), ["effusion"])
  result = {"n": 4, "t2i": {"R@1": 50.0}, "i2t": {"R@1": 25.0}, "zeroshot": section}
  table = metrics.format_metrics_table(result)
  assert table.startswith("N=4") and table.endswith("\n\n" + zeroshot.format_table(section))
  assert "zero-shot" not in metrics.format_metrics_table(dict(result, zeroshot={"skipped": "x"}))


def test_bootstrap_intervals_are_percentiles_of_the_metrics_of_resampled_queries():
  """The intervals are in the metrics' own units (R@K percent, ranks), the 5th and 95th
  percentiles at level 0.9 of the metric over explicitly resampled queries; by default 1,000
  resamples from seed 0."""
  directions = tied_directions(120, seed=3)
  ranks = dict(zip(metrics.DIRECTIONS, directions))
  got = metrics.bootstrap_rank_intervals(ranks, ks=(1, 5), num_samples=40, seed=6, level=0.9)
  counts = bootstrap.resample_counts(6, 0, 40, 120)
  for direction, d in ranks.items():
    replicates = [metrics.summarize_ranks(d._replace(greater=d.greater[draws], tied=d.tied[draws]),
                                          ks=(1, 5))
                  for draws in (np.repeat(np.arange(120), counts[:, b]) for b in range(40))]
    for metric in ("R@1", "R@5", "MdR", "MnR"):
      values = [r[metric] for r in replicates]
      np.testing.assert_allclose(got[direction][metric], np.percentile(values, [5, 95]),
                                 rtol=1e-9, err_msg=f"{direction} {metric}")
  assert metrics.bootstrap_rank_intervals(ranks) == metrics.bootstrap_rank_intervals(
      ranks, num_samples=1000, seed=0)


# --- Settings from the config, and embedding_metrics forwarding them (mutation testing) -----------

def test_settings_from_config_read_every_eval_field():
  config = eval_config(recall_ks=(1, 3), keyword_topk=(2,), ties="worst", bootstrap_samples=7,
                       ci_level=0.8, gallery="scan", rank_engine="host")
  config.volume_retrieval.ks, config.volume_retrieval.exclude_self = (2, 4), False
  config.volume_retrieval.gallery = "with_findings"
  settings = metrics.MetricSettings.from_config(config, seed=5)
  assert settings == metrics.MetricSettings(
      ks=(1, 3), keyword_ks=(2,), ties="worst", bootstrap_samples=7, level=0.8, seed=5,
      gallery="scan", volume_ks=(2, 4), volume_exclude_self=False,
      volume_gallery="with_findings",
      zeroshot=zeroshot.ZeroShotSettings.from_config(config.zeroshot), engine="host")
  assert settings.zeroshot.enabled and settings.zeroshot.findings == tuple(config.zeroshot.findings)
  assert metrics.MetricSettings.from_config(config, bootstrap_samples=0).bootstrap_samples == 0
  assert metrics.MetricSettings.from_config(config).seed == 0
  assert metrics.MetricSettings.from_config(eval_config()).volume_exclude_self is True


def test_settings_from_an_eval_config_without_the_optional_sections_take_the_defaults():
  """A config written before gallery, volume retrieval, zero-shot and the rank engine existed."""
  config = eval_config()
  for key in ("gallery", "volume_retrieval", "zeroshot", "rank_engine"):
    del config[key]
  settings = metrics.MetricSettings.from_config(config)
  assert (settings.gallery, settings.volume_ks, settings.volume_exclude_self,
          settings.volume_gallery, settings.zeroshot.enabled, settings.engine) == (
              "volume", (), True, "all", False, "auto")


def test_embedding_metrics_forward_every_setting_to_each_section():
  """Each section equals its function called directly with the settings' values (none left at
  a default)."""
  rng = np.random.default_rng(32)
  embeddings = zeroshot_set(
      reports=np.array(["effusion." if i % 2 else "no findings." for i in range(10)]),
      keywords=np.array(["effusion"]), keyword_embeddings=rng.normal(size=(1, 6)).astype(
          np.float32), label_thresholds=np.array([0.4, 0.5], np.float32))
  settings = metrics.MetricSettings(
      ks=(1, 3), keyword_ks=(2, 4), ties="best", bootstrap_samples=15, level=0.8, seed=3,
      volume_ks=(2, 3), volume_exclude_self=False, volume_gallery="with_findings",
      zeroshot=zeroshot.ZeroShotSettings(), engine="host")
  result, ranks = metrics.embedding_metrics(embeddings, settings)
  expected_ranks = metrics.paired_ranks(embeddings.text_embeddings, embeddings.image_embeddings,
                                        ties="best")
  expected = metrics.metrics_from_ranks(expected_ranks, ks=(1, 3), bootstrap_samples=15, seed=3,
                                        level=0.8)
  assert {d: ranks[d].rule for d in ranks} == {"t2i": "best", "i2t": "best"}
  assert {k: result[k] for k in expected} == expected
  assert result["gallery"] == {"unit": "volume", "size": 10, "merged": False}
  relevance = np.array([[i % 2 == 1 for i in range(10)]])
  assert result["keywords"] == metrics.keyword_metrics(
      embeddings.keyword_embeddings, embeddings.image_embeddings, relevance, embeddings.keywords,
      ks=(2, 4), bootstrap_samples=15, seed=3, level=0.8)
  assert result["keyword_relevance_from"] == "reports"
  assert result["volume_retrieval"] == metrics.volume_retrieval(
      embeddings.image_embeddings, embeddings.labels, (2, 3), exclude_self=False,
      gallery="with_findings")
  assert result["zeroshot"] == metrics.zeroshot_metrics(embeddings, settings)
  given = interchange.validate(dict(embeddings.fields(), keyword_relevance=~relevance))
  with_file, _ = metrics.embedding_metrics(given, settings)
  assert with_file["keyword_relevance_from"] == "file"
  assert with_file["keywords"]["effusion"]["n_relevant"] == (~relevance).sum()
  assert with_file["keywords"] != result["keywords"]
  kept_out, _ = metrics.embedding_metrics(embeddings, metrics.MetricSettings(volume_ks=(2,)))
  assert kept_out["volume_retrieval"] == metrics.volume_retrieval(
      embeddings.image_embeddings, embeddings.labels, (2,), exclude_self=True)
  without, _ = metrics.embedding_metrics(embeddings, metrics.MetricSettings(volume_ks=()))
  assert "volume_retrieval" not in without and "zeroshot" not in without


@pytest.mark.parametrize("rule, meaning", [
    ("mid", "the expected result under random tie-breaking"),
    ("best", "the best position among the tied items, an optimistic bound"),
    ("worst", "the worst position among the tied items, a pessimistic bound")])
def test_tie_warning_counts_both_directions_and_explains_the_rule(rule, meaning):
  result = {"n": 9, "ties": {"t2i_tied_queries": 3, "rule": rule}}
  assert metrics.tie_warning(result) == (
      f"warning: the paired item ties with other items in 3 t2i and 0 i2t queries of 9 (equal "
      f"scores: a collapsed model?); ranked by the '{rule}' tie rule, {meaning} (config "
      f"eval.ties)")
  assert metrics.tie_warning({"n": 9, "ties": {"i2t_tied_queries": 1}}).endswith(
      "ranked by the '?' tie rule,  (config eval.ties)")


# --- Engines, pair checks and the arguments each layer passes on (mutation testing) ---------------

def test_a_loaded_jax_decides_the_engine_over_installed_plugins(monkeypatch):
  """Once JAX is imported its backend is the truth: a CPU backend beside an installed plugin
  (a CUDA wheel on a machine without a GPU) stays on the host; a GPU backend takes JAX. Before
  JAX is imported, libtpu counts like a CUDA/ROCm plugin."""
  installed = {"jax_plugins"}
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: object() if name in installed else None)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert metrics.rank_engine() is score_pass_host                  # the real JAX, on the CPU
  monkeypatch.setitem(sys.modules, "jax", types.SimpleNamespace(default_backend=lambda: "gpu"))
  installed.clear()
  assert metrics.rank_engine() is score_pass
  monkeypatch.delitem(sys.modules, "jax")
  installed.add("libtpu")
  assert metrics.rank_engine() is score_pass


def test_ranks_on_a_mesh_equal_the_host_engine():
  text, image = quantized_embeddings(37, 8, seed=33)
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  on_mesh = metrics.paired_ranks(text, image, mesh=mesh, block_size=8)
  host = metrics.paired_ranks(text, image, engine="host")
  for direction in metrics.DIRECTIONS:
    np.testing.assert_array_equal(on_mesh[direction].greater, host[direction].greater)
    np.testing.assert_array_equal(on_mesh[direction].tied, host[direction].tied)
  assert metrics.retrieval_metrics(text, image, mesh=mesh) == metrics.retrieval_metrics(text, image)


def test_one_pair_is_ranked_first_and_no_pairs_or_an_unknown_tie_rule_are_errors():
  one = np.ones((1, 4), np.float32)
  result = metrics.retrieval_metrics(one, one)
  assert result["t2i"]["R@1"] == 100.0 and result["i2t"]["MdR"] == 1.0 and result["n"] == 1
  with pytest.raises(ValueError, match=r"N >= 1; got text \(0, 4\) and image \(0, 4\)"):
    metrics.paired_ranks(one[:0], one[:0])
  with pytest.raises(ValueError, match="ties must be one of .*'first'"):
    metrics.paired_ranks(one, one, ties="first")


def test_non_finite_embeddings_are_named():
  good, bad = np.ones((4, 3)), np.where(np.eye(4, 3) > 0, np.nan, 1.0)
  with pytest.raises(ValueError, match="^image_embeddings contains NaN or Inf values$"):
    metrics.retrieval_metrics(good, bad)
  with pytest.raises(ValueError, match="^text_embeddings contains NaN or Inf values$"):
    metrics.retrieval_metrics(bad, good)


def test_retrieval_metrics_pass_on_ks_bootstrap_seed_and_level_and_add_chance():
  text, image = quantized_embeddings(60, 8, seed=34)
  ranks = metrics.paired_ranks(text, image)
  result = metrics.retrieval_metrics(text, image, ks=(2, 60), bootstrap_samples=12, seed=8,
                                     level=0.7)
  assert list(result["t2i"]) == ["R@2", "R@60", "MdR", "MnR"]
  assert result["chance"] == metrics.chance_levels(60, (2, 60))
  intervals = metrics.bootstrap_rank_intervals(ranks, ks=(2, 60), num_samples=12, seed=8,
                                               level=0.7)
  assert {d: result["ci"][d] for d in metrics.DIRECTIONS} == intervals
  assert {k: result["ci"][k] for k in ("level", "samples", "seed")} == {
      "level": 0.7, "samples": 12, "seed": 8}
  plain = metrics.retrieval_metrics(text, image)
  assert "ci" not in plain and metrics.metrics_from_ranks(ranks) == plain
  assert metrics.metrics_from_ranks(ranks, bootstrap_samples=12) == metrics.metrics_from_ranks(
      ranks, bootstrap_samples=12, seed=0, level=0.95)
  assert metrics.retrieval_metrics(text, image, bootstrap_samples=12) == metrics.retrieval_metrics(
      text, image, bootstrap_samples=12, seed=0, level=0.95)


def test_bootstrap_median_rank_of_distinct_ranks_is_that_of_the_resampled_queries():
  """An even N of distinct ranks: the median is the mean of the two middle resampled ranks."""
  ranks = np.random.default_rng(35).permutation(40) + 1
  totals = metrics._bootstrap_rank_totals([metrics._as_direction_ranks(ranks)], seed=2,
                                          ks=(1,), num_samples=30)
  counts = bootstrap.resample_counts(2, 0, 30, 40)
  for b in range(30):
    assert float(totals["MdR"][b, 0]) == np.median(np.repeat(ranks, counts[:, b]))


def test_precision_at_k_equal_to_the_gallery_size_is_the_prevalence():
  scores = np.random.default_rng(36).random((2, 5)).astype(np.float32)
  relevant = np.array([[1, 0, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  np.testing.assert_allclose(metrics.precision_at_k(scores, relevant, ks=(5,))["P@5"],
                             100 * relevant.mean(axis=1))


def test_no_volume_retrieval_is_a_valid_setting():
  assert metrics.MetricSettings(volume_ks=()).volume_ks == ()


def test_keyword_metrics_report_k_up_to_the_gallery_with_intervals_in_percent():
  """K = N is reported (P@N = the prevalence), K > N is None with no interval; intervals are
  the percentiles of 100·hits/K over the resampled galleries; no bootstrap, no "ci"."""
  rng = np.random.default_rng(37)
  keywords, gallery = rng.normal(size=(2, 5)), rng.normal(size=(6, 5))
  relevance = np.array([[1, 0, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0]], bool)
  got = metrics.keyword_metrics(keywords, gallery, relevance, ["a", "b"], ks=(2, 6, 10),
                                bootstrap_samples=20, seed=3, level=0.8)
  point = metrics.precision_at_k(keywords @ gallery.T / np.linalg.norm(gallery, axis=1),
                                 relevance, ks=(2, 6))
  order = metrics._descending_order(metrics.l2_normalize(keywords) @ metrics.l2_normalize(
      gallery).T)
  hits = metrics._bootstrap_precisions(order, relevance, 3, (2, 6), 20)
  for q, name in enumerate(["a", "b"]):
    assert got[name]["P@2"] == pytest.approx(point["P@2"][q])
    assert got[name]["P@6"] == pytest.approx(100 * relevance[q].mean())
    assert got[name]["P@10"] is None and got[name]["ci"]["P@10"] is None
    assert got[name]["n_relevant"] == relevance[q].sum()
    assert got[name]["chance"] == pytest.approx(100 * relevance[q].sum() / 6)
    for k in (2, 6):
      np.testing.assert_allclose(got[name]["ci"][f"P@{k}"],
                                 np.percentile(100 * hits[k][:, q] / k, [10, 90]))
  plain = metrics.keyword_metrics(keywords, gallery, relevance, ["a", "b"], ks=(2,))
  assert "ci" not in plain["a"]
  assert metrics.keyword_metrics(keywords, gallery, relevance, ["a", "b"], ks=(2,),
                                 bootstrap_samples=20) == metrics.keyword_metrics(
      keywords, gallery, relevance, ["a", "b"], ks=(2,), bootstrap_samples=20, seed=0)
  beyond = metrics.keyword_metrics(keywords, gallery, relevance, ["a", "b"], ks=(7,),
                                   bootstrap_samples=5)
  assert beyond["a"]["P@7"] is None and beyond["a"]["ci"] == {"P@7": None}


def test_volume_retrieval_keeping_the_query_has_the_whole_gallery_and_states_its_protocol():
  rng = np.random.default_rng(38)
  labels = np.array([[1, 0], [1, 0], [0, 1], [0, 0], [1, 1]], np.int8)
  image = labels @ rng.normal(size=(2, 4)) + 0.3 * rng.normal(size=(5, 4))
  got = metrics.volume_retrieval(image, labels, ks=(9, 1, 5), exclude_self=False)
  reference = brute_force_volume_retrieval(image, labels, (1, 5), False, False)
  assert {k: v for k, v in got.items() if k[0] in "PMJ" and v is not None} == pytest.approx(
      reference)
  assert {k: v for k, v in got.items() if k[0] not in "PMJ"} == {
      "gallery": "all", "gallery_size": 5, "exclude_self": False,
      "relevance": "shares a positive label", "n_queries": 4}
  assert got["P@9"] is None and got["MAP@9"] is None and got["Jaccard@9"] is None
  excluded = metrics.volume_retrieval(image, labels, ks=(4,))
  assert excluded["gallery_size"] == 4 and excluded["exclude_self"] is True
  assert excluded["P@4"] == pytest.approx(brute_force_volume_retrieval(
      image, labels, (4,), True, False)["P@4"])


def test_volume_retrieval_without_relevant_volumes_or_without_a_gallery():
  image = np.random.default_rng(39).normal(size=(4, 3))
  no_findings = np.zeros((4, 2), np.int8)
  none_relevant = metrics.volume_retrieval(image, no_findings, ks=(1,))
  assert (none_relevant["P@1"], none_relevant["MAP@1"], none_relevant["Jaccard@1"],
          none_relevant["n_queries"]) == (None, None, 0.0, 0)
  assert metrics.volume_retrieval(image, no_findings, ks=(1,), gallery="with_findings") == {
      "gallery": "with_findings", "gallery_size": 0, "exclude_self": True,
      "relevance": "shares a positive label", "n_queries": 0,
      "P@1": None, "MAP@1": None, "Jaccard@1": None}
