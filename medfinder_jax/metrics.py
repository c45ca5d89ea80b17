"""Retrieval metrics over paired embeddings: ranks, R@K, MdR, MnR, keyword P@K, bootstrap CIs.

Conventions (the released MedFinder code's, docs/released_code.md "Evaluation"):
- Row i of the text embeddings and row i of the image embeddings are one study (a pair).
- t2i: queries are texts, the gallery is the images, S = T·Iᵀ (row i = text query i). i2t: queries
  are images against the text gallery, i.e. Sᵀ. Embeddings are L2-normalized first.
- rank_i is 1-based: 1 means the paired item scored highest in row i.
  R@K = 100 · the fraction of queries whose paired item ranks ≤ K (percent), MdR = median(rank)
  (np.median: the mean of the two middle ranks when N is even, so it can end in .5),
  MnR = mean(rank).

Ties. Ranks are counted, not sorted: for query i, greater_i = #{j : S_ij > S_ii} and
tied_i = #{j ≠ i : S_ij = S_ii}. The released code sorts each row with an unstable
`torch.argsort(descending=True)` and reads the paired item's position, so a tied pair lands
anywhere in [1 + greater, 1 + greater + tied], as the sort happens to order it; for float
embeddings of a working model ties are rare, but a collapsed model (all embeddings equal) ties
everything, and a rule that takes the best position then scores it R@1 = 100. Ties are never
rewarded here; the rule is `ties`:
  "mid" (default, reports and model selection): the expected result under random tie-breaking.
        The rank is the mid-rank 1 + greater + tied/2; R@K counts each query with the
        probability that its pair lands in the top K, clip((K - greater) / (tied + 1), 0, 1).
        A collapsed model scores exactly chance.
  "best": 1 + greater (an optimistic bound); "worst": 1 + greater + tied (a pessimistic one).
Every result records how many queries had a tie, and the table warns when any had one.

One pass, S never materialized: S is visited in square tiles (1024² scores at a time by
default); t2i counts by the rows and i2t by the columns of the same tiles, so each score is
computed once, and the paired scores are read from the same kind of tile (bit-identical to their
rows and columns). Two engines count this way (rank_engine picks): score_pass_host on the host
CPU (its BLAS, threads, no JAX: what `launch.py metrics` uses on a machine without an
accelerator) and score_pass on JAX (meshes, with tile rows spread over the devices, and
accelerators). Results do not depend on the engine, the tiling or the mesh except through float
rounding of the matmul itself.

Keyword retrieval: P@K of keyword queries against the image gallery, relevance labels from
findings.keyword_relevance, which does not count negated mentions.
Confidence intervals: percentile bootstrap, seeded, resampling query pairs (R@K, MdR, MnR; one
resample shared by t2i and i2t) or the gallery (P@K, one query per keyword).
"""

import dataclasses
import importlib.util
import os
import sys
from typing import NamedTuple

import numpy as np

from medfinder_jax import bootstrap
from medfinder_jax import errors
from medfinder_jax import findings
from medfinder_jax import interchange
from medfinder_jax import zeroshot as zeroshot_lib


RECALL_KS = (1, 5, 10)
VOLUME_KS = (1, 5, 10, 50)
PRECISION_KS = (20, 50, 100)
DIRECTIONS = ("t2i", "i2t")
TIE_RULES = ("mid", "best", "worst")
RANK_ENGINES = ("auto", "host", "jax")


class DirectionRanks(NamedTuple):
  """Per-query result of one direction, indexed by pair (study) row; see "Ties" above."""
  greater: np.ndarray   # (N,) int64: gallery items scoring strictly more than the paired one
  tied: np.ndarray      # (N,) int64: other items whose score equals the paired one's exactly
  rule: str             # the tie rule, one of TIE_RULES

  @property
  def ranks(self):
    """(N,) 1-based ranks under the rule (float64: a mid-rank can end in .5)."""
    extra = {"best": 0.0, "mid": 0.5, "worst": 1.0}[self.rule]
    return 1.0 + self.greater + extra * self.tied

  def hits(self, k):
    """(N,) float64 in [0, 1]: whether (for "mid": the probability that) the pair is in the
    top k."""
    if self.rule == "mid":
      return np.clip((k - self.greater) / (self.tied + 1.0), 0.0, 1.0)
    return (self.ranks <= k).astype(np.float64)


# --- Ranks ----------------------------------------------------------------------------------------

def l2_normalize(x, eps=1e-12):
  """Rows scaled to unit L2 norm (float32); all-zero rows stay zero, like torch F.normalize."""
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(norm, np.float32(eps))


def _accelerator_expected():
  """Whether JAX runs (or would run) on an accelerator, without importing JAX when it is not
  loaded yet: a loaded JAX is asked; otherwise an installed accelerator plugin (jax_plugins:
  CUDA/ROCm, libtpu) counts unless JAX_PLATFORMS pins the CPU."""
  jax = sys.modules.get("jax")
  if jax is not None:
    return jax.default_backend() != "cpu"
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def rank_engine(engine="auto", mesh=None):
  """The module whose passes over score matrices rank (score_pass or score_pass_host: both have
  rank_counts and volume_neighbours).

  "jax": score_pass, and it is the only one that takes a mesh; "host": score_pass_host;
  "auto": score_pass for a mesh or an accelerator, else score_pass_host (faster on a CPU, and
  JAX is never imported for it).
  """
  if engine not in RANK_ENGINES:
    raise ValueError(f"rank engine must be one of {RANK_ENGINES}, got {engine!r}")
  if engine == "host" and mesh is not None:
    raise ValueError("the host rank engine runs on this process's CPU and takes no mesh; use "
                     "engine 'jax' or 'auto' with a mesh")
  if engine == "jax" or (engine == "auto" and (mesh is not None or _accelerator_expected())):
    from medfinder_jax import score_pass   # pylint: disable=import-outside-toplevel  (JAX)
    return score_pass
  from medfinder_jax import score_pass_host   # pylint: disable=import-outside-toplevel
  return score_pass_host


def similarity_ranks(similarity, ties="mid"):
  """DirectionRanks of the diagonal items of a square score matrix (rows = queries).

  For matrices already in memory (tests, small N); large N goes through paired_ranks.
  """
  _check_ties(ties)
  similarity = np.asarray(similarity)
  paired = np.diagonal(similarity)[:, None]
  greater = np.sum(similarity > paired, axis=1).astype(np.int64)
  tied = np.sum(similarity == paired, axis=1).astype(np.int64) - 1
  return DirectionRanks(greater=greater, tied=tied, rule=ties)


class SettingsError(errors.UserError):
  """Metric settings (config `eval`, or flags) that cannot be used; names the field."""


GALLERIES = ("volume", "scan")
VOLUME_GALLERIES = ("all", "with_findings")


@dataclasses.dataclass(frozen=True)
class MetricSettings:
  """How an embedding set is scored: R@K cut-offs, keyword P@K cut-offs, the tie rule, the
  bootstrap, the gallery unit, volume->volume retrieval, zero-shot classification and the rank
  engine.

  Built from config `eval` by `from_config`, which checks every field before any expensive work
  (a whole epoch, or embedding a split) rather than after it.
  """
  ks: tuple = RECALL_KS
  keyword_ks: tuple = PRECISION_KS
  ties: str = "mid"
  bootstrap_samples: int = 0
  level: float = 0.95
  seed: int = 0
  gallery: str = "volume"
  volume_ks: tuple = VOLUME_KS
  volume_exclude_self: bool = True
  volume_gallery: str = "all"
  zeroshot: zeroshot_lib.ZeroShotSettings = zeroshot_lib.ZeroShotSettings(enabled=False)
  engine: str = "auto"

  def __post_init__(self):
    for name, field, example in (("ks", "eval.recall_ks", RECALL_KS),
                                 ("keyword_ks", "eval.keyword_topk", PRECISION_KS),
                                 ("volume_ks", "eval.volume_retrieval.ks", VOLUME_KS)):
      values = tuple(getattr(self, name))
      if (not values and name != "volume_ks") or not all(
          isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in values):
        raise SettingsError(f"config {field}={values!r}: expected positive integers, e.g. "
                            f"{example}")
    if self.ties not in TIE_RULES:
      raise SettingsError(f"config eval.ties={self.ties!r}: expected one of {TIE_RULES}")
    if not isinstance(self.bootstrap_samples, int) or self.bootstrap_samples < 0:
      raise SettingsError(f"--bootstrap must be 0 (off) or a positive count, got "
                          f"{self.bootstrap_samples}")
    if not 0.0 < float(self.level) < 1.0:
      raise SettingsError(f"config eval.ci_level={self.level}: expected a level between 0 and 1 "
                          f"(exclusive), e.g. 0.95")
    if self.gallery not in GALLERIES:
      raise SettingsError(f"config eval.gallery={self.gallery!r}: expected one of {GALLERIES} "
                          f"(one gallery item per volume, or per scan with its reconstructions "
                          f"merged)")
    if self.engine not in RANK_ENGINES:
      raise SettingsError(f"config eval.rank_engine={self.engine!r}: expected one of "
                          f"{RANK_ENGINES} (auto: JAX on a mesh or an accelerator, the host "
                          f"CPU's BLAS otherwise)")
    if self.volume_gallery not in VOLUME_GALLERIES:
      raise SettingsError(f"config eval.volume_retrieval.gallery={self.volume_gallery!r}: "
                          f"expected one of {VOLUME_GALLERIES}")

  @classmethod
  def from_config(cls, eval_config, seed=0, bootstrap_samples=None):
    """From config `eval` (recall_ks, keyword_topk, ties, bootstrap_samples, ci_level, gallery,
    volume_retrieval, zeroshot); `bootstrap_samples` (e.g. a --bootstrap flag) replaces the
    config's when given."""
    samples = eval_config.bootstrap_samples if bootstrap_samples is None else bootstrap_samples
    volume = eval_config.get("volume_retrieval")
    return cls(ks=tuple(eval_config.recall_ks), keyword_ks=tuple(eval_config.keyword_topk),
               ties=str(eval_config.ties), bootstrap_samples=samples,
               level=float(eval_config.ci_level), seed=int(seed),
               gallery=str(eval_config.get("gallery", "volume")),
               volume_ks=tuple(volume.ks) if volume is not None else (),
               volume_exclude_self=bool(volume.exclude_self) if volume is not None else True,
               volume_gallery=str(volume.gallery) if volume is not None else "all",
               zeroshot=zeroshot_lib.ZeroShotSettings.from_config(eval_config.get("zeroshot")),
               engine=str(eval_config.get("rank_engine", "auto")))


def _check_ties(ties):
  if ties not in TIE_RULES:
    raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")


def _check_pairs(text_embeddings, image_embeddings):
  text, image = np.shape(text_embeddings), np.shape(image_embeddings)
  if len(text) != 2 or text != image or text[0] < 1:
    raise ValueError(f"text and image embeddings must both be (N, D) with N >= 1; "
                     f"got text {text} and image {image}")


def paired_ranks(text_embeddings, image_embeddings, *, ties="mid", block_size=None, mesh=None,
                 engine="auto"):
  """{"t2i": DirectionRanks, "i2t": DirectionRanks} for paired (N, D) text/image embeddings.

  Both are L2-normalized first; t2i ranks images for each text (rows of S), i2t texts for each
  image (columns of S), both from one pass over S (rank_counts of the engine rank_engine picks;
  block_size: rows/columns per tile, mesh: devices for the JAX engine).
  """
  _check_ties(ties)
  _check_pairs(text_embeddings, image_embeddings)
  counter = rank_engine(engine, mesh).rank_counts
  options = {"mesh": mesh} if mesh is not None else {}
  counts = counter(l2_normalize(text_embeddings), l2_normalize(image_embeddings),
                   block_size=block_size, **options)
  return {d: DirectionRanks(greater=np.asarray(counts[d][0], np.int64),
                            tied=np.asarray(counts[d][1], np.int64), rule=ties)
          for d in DIRECTIONS}


# --- Summaries ------------------------------------------------------------------------------------

def summarize_ranks(ranks, ks=RECALL_KS):
  """{"R@K": percent, ..., "MdR": median rank, "MnR": mean rank} of a DirectionRanks (or of
  plain 1-based ranks, read as ranks without ties)."""
  ranks = _as_direction_ranks(ranks)
  summary = {f"R@{k}": float(100.0 * np.mean(ranks.hits(k))) for k in ks}
  summary["MdR"] = float(np.median(ranks.ranks))
  summary["MnR"] = float(np.mean(ranks.ranks))
  return summary


def chance_levels(n, ks=RECALL_KS):
  """What a random ranking of N items scores: R@K = 100·min(K, N)/N, MdR ≈ MnR = (N + 1)/2."""
  chance = {f"R@{k}": 100.0 * min(k, n) / n for k in ks}
  chance["MdR"] = chance["MnR"] = (n + 1) / 2
  return chance


def _bootstrap_rank_totals(directions, seed, ks, num_samples):
  """{"R@K": hits, "MnR": rank sum, "MdR": median rank}, each (num_samples, M), of bootstrap
  replicates for M DirectionRanks of the same N queries.

  Each replicate resamples the N query rows (pairs) with replacement, the same rows for every
  direction; the host divides the totals by N (medians are exact order statistics, as
  np.median's)."""
  ranks = np.stack([d.ranks for d in directions])
  order = np.argsort(ranks, axis=1, kind="stable")
  sorted_ranks, n = np.ascontiguousarray(np.take_along_axis(ranks, order, axis=1)), ranks.shape[1]
  hits = np.ascontiguousarray(np.take_along_axis(           # (M, K, N) in rank order
      np.stack([np.stack([d.hits(k) for k in ks]) for d in directions]), order[:, None], axis=2))
  middle = np.array([(n + 1) // 2, n // 2 + 1], np.int64)   # equal when N is odd

  def kernel(counts):
    m, r = len(directions), counts.shape[1]
    out_hits, out_sum, out_median = np.zeros((m, len(ks), r)), np.zeros((m, r)), np.zeros((m, r))
    bootstrap.kernels().rank_totals(counts, order, sorted_ranks, hits, middle, out_hits, out_sum,
                                    out_median)
    return {**{f"R@{k}": out_hits[:, i].T for i, k in enumerate(ks)}, "MnR": out_sum.T,
            "MdR": out_median.T}

  return bootstrap.run_replicates(kernel, seed, num_samples, n)


def bootstrap_rank_intervals(ranks_by_direction, *, ks=RECALL_KS, num_samples=1000, seed=0,
                             level=0.95):
  """Percentile bootstrap CIs of every summarize_ranks metric, resampling queries (pairs).

  ranks_by_direction: {"t2i": DirectionRanks, "i2t": DirectionRanks} of the same N pairs (or
  plain (N,) 1-based ranks; one paired resample serves both). Returns {direction: {metric:
  [lo, hi]}}. Deterministic given seed.
  """
  names = list(ranks_by_direction)
  directions = [_as_direction_ranks(ranks_by_direction[d]) for d in names]
  n = len(directions[0].greater)
  totals = _bootstrap_rank_totals(directions, seed, ks, int(num_samples))
  per_query = {f"R@{k}": 100.0 / n for k in ks} | {"MnR": 1.0 / n, "MdR": 1.0}
  intervals = {name: {} for name in names}
  for metric, values in totals.items():
    lo_hi = bootstrap.percentile_interval(np.asarray(values, np.float64) * per_query[metric],
                                          level)
    for m, name in enumerate(names):
      intervals[name][metric] = [float(lo_hi[0, m]), float(lo_hi[1, m])]
  return {name: {key: intervals[name][key] for key in _metric_names(ks)} for name in names}


def _as_direction_ranks(ranks):
  """DirectionRanks as given, or of plain 1-based ranks (read as ranks without ties)."""
  if isinstance(ranks, DirectionRanks):
    return ranks
  ranks = np.asarray(ranks, np.float64)
  return DirectionRanks(greater=ranks - 1, tied=np.zeros_like(ranks), rule="best")


def _metric_names(ks):
  return [f"R@{k}" for k in ks] + ["MdR", "MnR"]


def metrics_from_ranks(ranks_by_direction, *, ks=RECALL_KS, bootstrap_samples=0, seed=0,
                       level=0.95):
  """The metrics.json dict from {"t2i": DirectionRanks, "i2t": DirectionRanks} (of one rule).

  {"t2i": {"R@1", "R@5", "R@10", "MdR", "MnR"}, "i2t": {...}, "n": N,
   "chance": {...}, "ties": {"rule", "t2i_tied_queries", "i2t_tied_queries"},
   "ci": {"level", "samples", "seed", "t2i": {metric: [lo, hi]}, "i2t": {...}}  (bootstrap > 0)}
  """
  n = len(next(iter(ranks_by_direction.values())).greater)
  metrics = {d: summarize_ranks(r, ks) for d, r in ranks_by_direction.items()}
  metrics["n"] = n
  metrics["chance"] = chance_levels(n, ks)
  metrics["ties"] = {"rule": next(iter(ranks_by_direction.values())).rule}
  for d, r in ranks_by_direction.items():
    metrics["ties"][f"{d}_tied_queries"] = int(np.count_nonzero(r.tied))
  if bootstrap_samples:
    intervals = bootstrap_rank_intervals(ranks_by_direction, ks=ks,
                                         num_samples=bootstrap_samples, seed=seed, level=level)
    metrics["ci"] = {"level": level, "samples": int(bootstrap_samples), "seed": int(seed),
                     **intervals}
  return metrics


def retrieval_metrics(text_embeddings, image_embeddings, *, ks=RECALL_KS, bootstrap_samples=0,
                      seed=0, level=0.95, ties="mid", block_size=None, mesh=None,
                      engine="auto"):
  """Text<->image retrieval metrics of N paired embeddings (row i of each = study i).

  text_embeddings, image_embeddings: (N, D) float, finite. Returns the metrics_from_ranks dict:
  {"t2i": {"R@1", "R@5", "R@10", "MdR", "MnR"}, "i2t": {...}, "n": N, ...} with R@K in percent.
  """
  for name, x in (("text_embeddings", text_embeddings), ("image_embeddings", image_embeddings)):
    if not np.all(np.isfinite(np.asarray(x))):
      raise ValueError(f"{name} contains NaN or Inf values")
  ranks = paired_ranks(text_embeddings, image_embeddings, ties=ties, block_size=block_size,
                       mesh=mesh, engine=engine)
  return metrics_from_ranks(ranks, ks=ks, bootstrap_samples=bootstrap_samples, seed=seed,
                            level=level)


# --- Keyword retrieval ----------------------------------------------------------------------------

def precision_at_k(scores, relevant, ks=PRECISION_KS):
  """P@K in percent for keyword queries over a gallery.

  scores: (Q, N) query-gallery scores; relevant: (Q, N) bool, gallery item relevant to query.
  Returns {"P@K": (Q,) float64 array, or None when K > N}. The released code skips K > N too
  (precision over fewer than K retrieved items would not be P@K). Ties in score go to the lower
  gallery index (a stable descending sort).
  """
  return _precisions_in_order(_descending_order(scores), relevant, ks)


def _precisions_in_order(order, relevant, ks):
  """precision_at_k from each query's gallery order (_descending_order)."""
  relevant = np.asarray(relevant, bool)
  n = order.shape[-1]
  valid = [k for k in ks if k <= n]
  out = {f"P@{k}": None for k in ks}
  if not valid:
    return out
  hits = np.cumsum(np.take_along_axis(relevant, order[..., :max(valid)], axis=-1), axis=-1)
  for k in valid:
    out[f"P@{k}"] = 100.0 * hits[..., k - 1] / k
  return out


def _descending_order(scores):
  """Gallery indices of each row of (Q, N) scores, best first, ties to the lower index."""
  return np.argsort(-np.asarray(scores, np.float32), axis=-1, kind="stable")


def _bootstrap_precisions(order, relevant, seed, ks, num_samples):
  """{K: (num_samples, Q) relevant-in-top-K counts} for the (Q, N) gallery order of each query
  (_descending_order) and relevance, resampling the gallery: a gallery item drawn c times fills
  c consecutive places of the ranking."""
  relevant_sorted = np.ascontiguousarray(np.take_along_axis(np.asarray(relevant, bool), order,
                                                            axis=-1))
  ks = np.asarray(ks, np.int64)

  def kernel(counts):
    out = np.zeros((order.shape[0], len(ks), counts.shape[1]))
    bootstrap.kernels().precision_totals(counts, order, relevant_sorted, ks, out)
    return {int(k): out[:, j].T for j, k in enumerate(ks)}

  return bootstrap.run_replicates(kernel, seed, num_samples, order.shape[-1])


def keyword_metrics(keyword_embeddings, gallery_embeddings, relevance, keywords, *,
                    ks=PRECISION_KS, bootstrap_samples=0, seed=0, level=0.95):
  """Keyword -> image retrieval: P@K per keyword, with the relevant count and the chance level.

  keyword_embeddings: (Q, D) text embeddings of the keyword queries; gallery_embeddings: (N, D)
  (the image embeddings, as in the released code); relevance: (Q, N) bool, e.g. from
  findings.keyword_relevance; keywords: Q names. Both embeddings are L2-normalized.
  Returns {keyword: {"P@20": percent | None (K > N), ..., "n_relevant": int,
  "chance": 100·n_relevant/N (expected P@K of a random ranking), "ci": {"P@K": [lo, hi] | None}}}.
  CIs resample the gallery (there is one query per keyword).
  """
  relevance = np.asarray(relevance, bool)
  order = _descending_order(l2_normalize(keyword_embeddings) @ l2_normalize(gallery_embeddings).T)
  point = _precisions_in_order(order, relevance, ks)
  n = relevance.shape[-1]
  valid = tuple(k for k in ks if k <= n)
  intervals = {}
  if bootstrap_samples and valid:
    hits = _bootstrap_precisions(order, relevance, seed, valid, int(bootstrap_samples))
    intervals = {f"P@{k}": bootstrap.percentile_interval(100.0 * np.asarray(v, np.float64) / k,
                                                         level)
                 for k, v in hits.items()}
  results = {}
  for q, keyword in enumerate(keywords):
    entry = {name: (None if v is None else float(v[q])) for name, v in point.items()}
    entry["n_relevant"] = int(relevance[q].sum())
    entry["chance"] = 100.0 * entry["n_relevant"] / n
    if bootstrap_samples:
      entry["ci"] = {f"P@{k}": ([float(intervals[f"P@{k}"][0, q]), float(intervals[f"P@{k}"][1, q])]
                                if f"P@{k}" in intervals else None) for k in ks}
    results[str(keyword)] = entry
  return results


# --- Volume -> volume retrieval ------------------------------------------------------------------

def volume_retrieval(image_embeddings, labels, ks=VOLUME_KS, *, exclude_self=True,
                     gallery="all", engine="auto"):
  """Volume -> volume retrieval with label-overlap relevance (as CT-CLIP and CT-FM report it).

  Each volume queries the gallery (every volume, or with gallery="with_findings" only those with
  at least one positive label, as CT-CLIP; the query itself is left out unless exclude_self is
  False). A gallery volume is relevant when it shares at least one positive label with the query.
  Returns, in percent, averaged over the queries that have at least one relevant volume:
    P@K    relevant volumes among the top K, / K;
    MAP@K  mean over queries of AP@K = (1 / min(K, R)) Σ_{k ≤ K} P(k)·rel(k), R = the query's
           relevant volumes in the gallery;
  and over every query, as a fraction in [0, 1]:
    Jaccard@K  the mean Jaccard index of the label sets of the query and each of its top K (what
               CT-CLIP's volume-to-volume script reports as "MAP@K").
  Ties in score go to the lower gallery index. engine: as for paired_ranks (rank_engine).
  """
  labels = np.asarray(labels) > 0
  n = labels.shape[0]
  in_gallery = labels.any(axis=1) if gallery == "with_findings" else np.ones(n, bool)
  size = int(in_gallery.sum()) - (1 if exclude_self else 0)
  valid = tuple(k for k in ks if k <= size)
  result = {"gallery": gallery, "gallery_size": max(size, 0), "exclude_self": bool(exclude_self),
            "relevance": "shares a positive label"}
  if not valid:
    return {**result, "n_queries": 0, **{f"{m}@{k}": None for k in ks
                                         for m in ("P", "MAP", "Jaccard")}}
  top, relevant = (np.asarray(x) for x in rank_engine(engine).volume_neighbours(
      l2_normalize(image_embeddings), labels.astype(np.float32), in_gallery,
      k=max(valid), exclude_self=bool(exclude_self)))
  retrieved = labels[top]                                         # (N, K, L)
  hits = np.any(retrieved & labels[:, None, :], axis=-1)          # (N, K)
  union = np.sum(retrieved | labels[:, None, :], axis=-1)
  jaccard = np.where(union > 0, np.sum(retrieved & labels[:, None, :], axis=-1) /
                     np.maximum(union, 1), 0.0)
  queries = relevant > 0
  precision_at = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
  for k in ks:
    if k not in valid:
      result.update({f"P@{k}": None, f"MAP@{k}": None, f"Jaccard@{k}": None})
      continue
    ap = np.sum(precision_at[:, :k] * hits[:, :k], axis=1) / np.maximum(
        np.minimum(k, relevant), 1)
    result[f"P@{k}"] = float(100.0 * hits[queries, :k].mean()) if queries.any() else None
    result[f"MAP@{k}"] = float(100.0 * ap[queries].mean()) if queries.any() else None
    result[f"Jaccard@{k}"] = float(jaccard[:, :k].mean())
  result["n_queries"] = int(queries.sum())
  return result


# --- A whole embedding set ------------------------------------------------------------------------

def scan_gallery(embeddings):
  """One row per scan: the reconstructions of a scan (rows with the same `scan_ids`) merged into
  one gallery item, so that their identical reports count once. The image embedding is the mean
  of the normalized image embeddings; text, report, labels and source path are the first row's
  (identical within a scan; labels are OR-ed); the study id becomes the scan id. Without
  scan_ids every row is its own scan."""
  if embeddings.scan_ids is None:
    return embeddings
  scans, first, inverse = np.unique(embeddings.scan_ids, return_index=True, return_inverse=True)
  keep = np.sort(first)
  position = np.empty(len(scans), np.int64)
  position[np.argsort(first)] = np.arange(len(scans))
  group = position[inverse]                                  # merged row of each original row
  image = np.zeros((len(keep), embeddings.dim), np.float64)
  np.add.at(image, group, np.asarray(l2_normalize(embeddings.image_embeddings)))
  image /= np.bincount(group)[:, None]
  merged = dict(embeddings.fields())
  merged.update(image_embeddings=image.astype(np.float32),
                text_embeddings=embeddings.text_embeddings[keep],
                study_ids=embeddings.scan_ids[keep], scan_ids=embeddings.scan_ids[keep])
  for name in ("reports", "source_paths"):
    if merged.get(name) is not None:
      merged[name] = merged[name][keep]
  if embeddings.labels is not None:
    labels = np.zeros((len(keep), embeddings.labels.shape[1]), np.int8)
    np.maximum.at(labels, group, embeddings.labels)
    merged["labels"] = labels
  if embeddings.keyword_relevance is not None:
    relevance = np.zeros((embeddings.keyword_relevance.shape[0], len(keep)), bool)
    np.logical_or.at(relevance.T, group, embeddings.keyword_relevance.T)
    merged["keyword_relevance"] = relevance
  return interchange.validate(merged)


def zeroshot_scores(embeddings):
  """(N, L) P(present) of an embedding set with prompt_embeddings (else None)."""
  if embeddings.prompt_embeddings is None:
    return None
  scale = 1.0 if embeddings.logit_scale is None else float(embeddings.logit_scale)
  return zeroshot_lib.probabilities(embeddings.image_embeddings, embeddings.prompt_embeddings,
                                    scale)


def zeroshot_metrics(embeddings, settings):
  """The "zeroshot" section, or a reason why there is none (labels or prompts missing)."""
  if embeddings.labels is None or embeddings.prompt_embeddings is None:
    missing = [f for f in ("labels", "prompt_embeddings") if getattr(embeddings, f) is None]
    return {"skipped": f"no {' or '.join(missing)} in the embedding set"}
  thresholds, source = embeddings.label_thresholds, "validation split"
  if thresholds is None:
    source = "evaluated split itself (no validation thresholds given: optimistic)"
  return zeroshot_lib.classification_metrics(
      zeroshot_scores(embeddings), embeddings.labels, list(embeddings.label_names),
      thresholds=thresholds, threshold_source=source,
      bootstrap_samples=settings.bootstrap_samples, seed=settings.seed, level=settings.level)


def embedding_metrics(embeddings, settings, mesh=None):
  """Every metric of paired embeddings: (the metrics.json dict, {direction: DirectionRanks}).

  embeddings: an interchange.EmbeddingSet (image/text embeddings, and optionally keyword queries
  with their relevance labels or the reports to derive them from: findings.relevance_matrix;
  labels, label_names and prompt_embeddings for zero-shot classification and volume->volume
  retrieval); settings: a MetricSettings. With settings.gallery "scan", the reconstructions of a
  scan are merged first (scan_gallery). Keyword P@K (keyword -> image) goes under "keywords",
  volume->volume retrieval under "volume_retrieval", zero-shot under "zeroshot".
  """
  if settings.gallery == "scan":
    embeddings = scan_gallery(embeddings)
  ranks = paired_ranks(embeddings.text_embeddings, embeddings.image_embeddings,
                       ties=settings.ties, mesh=mesh, engine=settings.engine)
  result = metrics_from_ranks(ranks, ks=settings.ks, bootstrap_samples=settings.bootstrap_samples,
                              seed=settings.seed, level=settings.level)
  result["gallery"] = {"unit": settings.gallery, "size": embeddings.n,
                       "merged": settings.gallery == "scan" and embeddings.scan_ids is not None}
  if embeddings.keywords is not None:
    relevance = embeddings.keyword_relevance
    if relevance is None:
      relevance = findings.relevance_matrix(embeddings.reports, embeddings.keywords)
    result["keywords"] = keyword_metrics(
        embeddings.keyword_embeddings, embeddings.image_embeddings, relevance,
        embeddings.keywords, ks=settings.keyword_ks, bootstrap_samples=settings.bootstrap_samples,
        seed=settings.seed, level=settings.level)
    result["keyword_relevance_from"] = ("file" if embeddings.keyword_relevance is not None
                                        else "reports")
  if embeddings.labels is not None and settings.volume_ks:
    result["volume_retrieval"] = volume_retrieval(
        embeddings.image_embeddings, embeddings.labels, settings.volume_ks,
        exclude_self=settings.volume_exclude_self, gallery=settings.volume_gallery,
        engine=settings.engine)
  if settings.zeroshot.enabled:
    result["zeroshot"] = zeroshot_metrics(embeddings, settings)
  return result, ranks


# --- Tables ---------------------------------------------------------------------------------------

def _cell(value, interval=None, digits=2):
  if value is None:
    return "n/a"
  text = f"{value:.{digits}f}"
  if interval is not None:
    text += f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"
  return text


def _render(header, rows):
  widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                     for c, (cell, w) in enumerate(zip(row, widths))) for row in [header] + rows]
  return "\n".join(lines)


def format_metrics_table(metrics, show_chance=False, digits=2):
  """A paper-style text table of a metrics dict (metrics_from_ranks / metrics.json).

  Rows t2i and i2t, columns R@K, MdR, MnR, each with its [lo, hi] CI when present; show_chance adds
  a row with a random ranking's values; keyword P@K follows as a second table when present.
  """
  names = [k for k in metrics["t2i"]]
  unit = (metrics.get("gallery") or {}).get("unit", "volume")
  header = [f"N={metrics['n']}" + (" scans" if unit == "scan" else "")] + names
  rows = []
  for d in DIRECTIONS:
    ci = metrics.get("ci", {}).get(d, {})
    rows.append([d] + [_cell(metrics[d][m], ci.get(m), digits) for m in names])
  if show_chance:
    chance = metrics.get("chance") or chance_levels(metrics["n"])
    rows.append(["chance"] + [_cell(chance.get(m), None, digits) for m in names])
  text = _render(header, rows)
  warning = tie_warning(metrics)
  if warning:
    text += "\n" + warning
  if metrics.get("keywords"):
    text += "\n\n" + format_keyword_table(metrics["keywords"], show_chance, digits)
  if metrics.get("volume_retrieval", {}).get("n_queries"):
    text += "\n\n" + format_volume_table(metrics["volume_retrieval"], digits)
  if (metrics.get("zeroshot") or {}).get("labels"):
    text += "\n\n" + zeroshot_lib.format_table(metrics["zeroshot"])
  return text


def format_volume_table(section, digits=2):
  """Volume -> volume retrieval: P@K and MAP@K (percent) and Jaccard@K per K."""
  ks = [name[2:] for name in section if name.startswith("P@")]
  header = ["volume->volume"] + [f"@{k}" for k in ks]
  rows = [[metric] + [_cell(section[f"{metric}@{k}"], None, digits if metric != "Jaccard" else 3)
                      for k in ks] for metric in ("P", "MAP", "Jaccard")]
  note = (f"volume->volume over {section['n_queries']} queries, gallery {section['gallery']} "
          f"({section['gallery_size']} volumes{', query excluded' if section['exclude_self'] else ''}"
          f"), relevant = {section['relevance']}")
  return note + "\n" + _render(header, rows)


def tie_warning(metrics):
  """A line saying how many queries tied and which rule ranked them, or "" without ties."""
  ties = metrics.get("ties") or {}
  counts = {d: ties.get(f"{d}_tied_queries", 0) for d in DIRECTIONS}
  if not any(counts.values()):
    return ""
  rule = ties.get("rule", "?")
  meaning = {"mid": "the expected result under random tie-breaking",
             "best": "the best position among the tied items, an optimistic bound",
             "worst": "the worst position among the tied items, a pessimistic bound"}.get(rule, "")
  return (f"warning: the paired item ties with other items in {counts['t2i']} t2i and "
          f"{counts['i2t']} i2t queries of {metrics['n']} (equal scores: a collapsed model?); "
          f"ranked by the {rule!r} tie rule, {meaning} (config eval.ties)")


def format_keyword_table(keyword_results, show_chance=False, digits=2):
  """Text table of keyword_metrics output: one row per keyword, P@K columns (+ chance)."""
  first = next(iter(keyword_results.values()))
  names = [k for k in first if k.startswith("P@")]
  header = ["keyword"] + names + ["relevant"] + (["chance"] if show_chance else [])
  rows = []
  for keyword, entry in keyword_results.items():
    ci = entry.get("ci") or {}
    row = [keyword] + [_cell(entry[m], ci.get(m), digits) for m in names]
    row.append(str(entry["n_relevant"]))
    if show_chance:
      row.append(_cell(entry["chance"], None, digits))
    rows.append(row)
  return _render(header, rows)
