"""The score-matrix passes of both engines (score_pass on JAX, score_pass_host on the CPU's BLAS):
one pass equals two, tiles, threads, devices, byte-lane counts, volume neighbours' tie rule."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfinder_jax import metrics
from medfinder_jax import score_pass
from medfinder_jax import score_pass_host
from conftest import quantized_embeddings

ENGINES = {"host": score_pass_host, "jax": score_pass}


def jax_matmul(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


MATMULS = {"host": np.matmul, "jax": jax_matmul}   # each engine's own float32 multiply


def two_pass_counts(text, image, chunk=64, matmul=jax_matmul):
  """The earlier two-pass computation, an independent reference: each direction scores chunks of
  its queries against the whole gallery (chunk x N) and reads the paired score from the same
  output."""
  def direction(queries, gallery):
    greater, equal = [], []
    for start in range(0, len(queries), chunk):
      scores = matmul(queries[start:start + chunk], gallery.T)
      rows = np.arange(start, min(start + chunk, len(queries)))
      paired = np.asarray(scores)[np.arange(len(rows)), rows][:, None]
      greater.append(np.sum(np.asarray(scores) > paired, axis=1))
      equal.append(np.sum(np.asarray(scores) == paired, axis=1) - 1)
    return np.concatenate(greater), np.concatenate(equal)
  return {"t2i": direction(text, image), "i2t": direction(image, text)}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("n", [1, 5, 203, 333])
@pytest.mark.parametrize("block_size", [None, 8, 96])
def test_one_pass_counts_equal_two_passes_exactly(engine, n, block_size):
  """Both directions from one pass over S equal one pass per direction, count for count (random
  float embeddings: the paired score must compare bit-exactly with its row and its column)."""
  rng = np.random.default_rng(n)
  text = metrics.l2_normalize(rng.standard_normal((n, 32), dtype=np.float32))
  image = metrics.l2_normalize(np.asarray(text) + rng.standard_normal((n, 32), dtype=np.float32))
  ours = ENGINES[engine].rank_counts(text, image, block_size=block_size)
  reference = two_pass_counts(np.asarray(text), np.asarray(image), matmul=MATMULS[engine])
  for direction in metrics.DIRECTIONS:
    for got, want in zip(ours[direction], reference[direction]):
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=direction)


def unit_sign_vectors(n, d, seed):
  """Rows with four entries of ±1/2 and zeros elsewhere: unit norm exactly, and every dot product
  a multiple of 1/4, exact in float32, so scores tie often and exactly."""
  rng = np.random.default_rng(seed)
  rows = np.zeros((n, d), np.float32)
  for row in rows:
    row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
  return rows


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("ties", metrics.TIE_RULES)
def test_one_pass_metrics_equal_two_passes_under_every_tie_rule(ties, engine):
  text, image = unit_sign_vectors(150, 8, seed=3), unit_sign_vectors(150, 8, seed=4)
  text, image = np.concatenate([text, text[:50]]), np.concatenate([image, image[:50]])
  reference = two_pass_counts(text, image)
  expected = metrics.metrics_from_ranks(
      {d: metrics.DirectionRanks(greater=reference[d][0], tied=reference[d][1], rule=ties)
       for d in metrics.DIRECTIONS})
  assert expected["ties"]["t2i_tied_queries"] > 100
  assert metrics.retrieval_metrics(text, image, ties=ties, block_size=16,
                                   engine=engine) == expected


@pytest.mark.parametrize("engine", ENGINES)
def test_tiled_counts_equal_exact_ranks_for_any_tile_size(engine):
  text, image = quantized_embeddings(61, 24, seed=1)   # tiles of one row, ragged, N, beyond N
  exact = text.astype(np.float64) @ image.astype(np.float64).T
  for block_size in (1, 7, 61, 64, 1024):
    counts = ENGINES[engine].rank_counts(text, image, block_size=block_size)
    for direction, matrix in (("t2i", exact), ("i2t", exact.T)):
      expected = metrics.similarity_ranks(matrix)
      np.testing.assert_array_equal(np.asarray(counts[direction][0]), expected.greater,
                                    err_msg=f"{direction} {block_size}")
      np.testing.assert_array_equal(np.asarray(counts[direction][1]), expected.tied,
                                    err_msg=f"{direction} {block_size}")


@pytest.mark.parametrize("n", [203, 5])     # not divisible by 8; fewer rows than devices
def test_tiles_spread_over_8_devices_equal_one_device(n):
  assert jax.device_count() == 8
  text, image = quantized_embeddings(n, 24, seed=2)
  single = score_pass.rank_counts(text, image, block_size=8)
  for mesh in (jax.make_mesh((8,), ("data",)),
               jax.make_mesh((4, 2), ("data", "fsdp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)):
    sharded = score_pass.rank_counts(text, image, block_size=8, mesh=mesh)
    for direction in metrics.DIRECTIONS:
      for ours, theirs in zip(sharded[direction], single[direction]):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_retrieval_metrics_on_a_mesh_equal_one_device():
  text, image = quantized_embeddings(100, 16, seed=4)
  mesh = jax.make_mesh((8,), ("data",))
  assert (metrics.retrieval_metrics(text, image, mesh=mesh)
          == metrics.retrieval_metrics(text, image))


def test_rank_counts_composes_under_jit():
  text, image = quantized_embeddings(37, 8, seed=5)
  jitted = jax.jit(lambda q, g: score_pass.rank_counts(q, g, block_size=8)["i2t"][0] + 1)
  np.testing.assert_array_equal(np.asarray(jitted(text, image)),
                                metrics.similarity_ranks(image @ text.T, ties="best").ranks)


def test_default_tile_is_the_block_size_or_n_rounded_up_to_8():
  assert score_pass_host.default_block_size(10) == 16
  assert score_pass_host.default_block_size(17) == 24
  assert score_pass_host.default_block_size(1000) == 1000
  assert score_pass_host.default_block_size(100_000) == score_pass_host.BLOCK_SIZE


def test_a_strip_of_volume_queries_holds_at_most_strip_scores_and_8_rows_at_least():
  strip = score_pass_host.rows_per_strip
  assert strip(1000) == score_pass_host.BLOCK_SIZE
  assert strip(100_000) == score_pass_host.STRIP_SCORES // 100_000 == 167
  assert strip(10 ** 7) == 8


@pytest.mark.parametrize("workers", [2, 3])
def test_host_counts_do_not_depend_on_the_number_of_threads(workers):
  """Tiles are claimed by threads in whatever order they run; rows and columns must add up
  the same (here 26 x 26 tiles, so every thread handles many rows of tiles)."""
  rng = np.random.default_rng(11)
  text = metrics.l2_normalize(rng.standard_normal((203, 16), dtype=np.float32))
  image = metrics.l2_normalize(text + rng.standard_normal((203, 16), dtype=np.float32))
  one = score_pass_host.rank_counts(text, image, block_size=8, workers=1)
  many = score_pass_host.rank_counts(text, image, block_size=8, workers=workers)
  for direction in metrics.DIRECTIONS:
    for a, b in zip(one[direction], many[direction]):
      assert a.dtype == np.int64
      np.testing.assert_array_equal(a, b)


def test_host_counts_are_exact_when_a_tile_row_spans_more_than_255_words():
  """The byte-lane sums run over at most 255 uint64 words at a time: a 2,100-wide tile (263 words
  per row, 2,100 rows per column) must still count every entry, and no lane may overflow."""
  text, image = quantized_embeddings(2100, 4, seed=6)   # d = 4: many exact ties
  text[0], image[0] = 0.5, -2.0     # pair 0 scores below almost everything in its row and column
  exact = text.astype(np.float64) @ image.astype(np.float64).T
  counts = score_pass_host.rank_counts(text, image, block_size=2100)
  for direction, matrix in (("t2i", exact), ("i2t", exact.T)):
    expected = metrics.similarity_ranks(matrix)
    assert expected.greater[0] > 8 * 255 and expected.tied.max() > 8   # a lane must pass 255
    np.testing.assert_array_equal(counts[direction][0], expected.greater)
    np.testing.assert_array_equal(counts[direction][1], expected.tied)



# --- Volume -> volume neighbours ------------------------------------------------------------------

@pytest.mark.parametrize("engine", ENGINES)
def test_volume_neighbours_break_ties_to_the_lower_index(engine):
  """Volumes drawn from 5 distinct embeddings: every score ties with dozens of others, also at
  the k-th place, so which neighbours are kept is decided by the tie rule alone."""
  rng = np.random.default_rng(21)
  image = metrics.l2_normalize(rng.normal(size=(5, 8))[rng.integers(0, 5, 120)])
  labels = (rng.random((120, 3)) < 0.4).astype(np.float32)
  in_gallery = rng.random(120) < 0.8
  unit = image.astype(np.float64)
  for exclude_self in (True, False):
    top, relevant = (np.asarray(x) for x in ENGINES[engine].volume_neighbours(
        image, labels, in_gallery, k=17, exclude_self=exclude_self))
    assert top.shape == (120, 17) and np.issubdtype(top.dtype, np.integer)
    assert np.issubdtype(relevant.dtype, np.integer)
    for q in range(120):
      allowed = in_gallery & ~((np.arange(120) == q) & exclude_self)
      scores = np.where(allowed, unit @ unit[q], -np.inf)
      np.testing.assert_array_equal(top[q], np.argsort(-scores, kind="stable")[:17])
      assert relevant[q] == np.sum(allowed & ((labels @ labels[q]) > 0))


@pytest.mark.parametrize("rows,workers", [(7, 1), (7, 3), (64, 2)])
def test_host_volume_neighbours_do_not_depend_on_strips_or_threads(rows, workers):
  """Distinct scores (no ties): each query's k = 50 nearest are its stable argsort, in that
  order, whichever strip of queries and thread it fell in (120 queries: strips of 7 end in a
  partial one)."""
  rng = np.random.default_rng(22)
  image = metrics.l2_normalize(rng.normal(size=(120, 8)))
  labels = (rng.random((120, 3)) < 0.4).astype(np.float32)
  in_gallery = rng.random(120) < 0.9
  top, relevant = score_pass_host.volume_neighbours(image, labels, in_gallery, k=50,
                                                    exclude_self=True, rows=rows,
                                                    workers=workers)
  unit = image.astype(np.float64)
  for q in range(120):
    allowed = in_gallery & (np.arange(120) != q)
    scores = np.where(allowed, unit @ unit[q], -np.inf)
    np.testing.assert_array_equal(top[q], np.argsort(-scores, kind="stable")[:50])
    assert relevant[q] == np.sum(allowed & ((labels @ labels[q]) > 0))


# --- top_k on its own (mutation testing: the neighbour passes call it from worker threads) ---------

def reference_top_k(scores, k):
  """A full stable sort on -score: best first, ties to the lower column."""
  return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("k", [0, 1, 3, 7, 12])
def test_top_k_is_the_stable_order_of_the_k_best_with_ties_to_the_lower_column(k):
  rng = np.random.default_rng(40)
  tied = rng.integers(0, 4, size=(9, 12)).astype(np.float32)       # many ties at every cut
  distinct = rng.permutation(12 * 9).reshape(9, 12).astype(np.float32)
  with_inf = np.where(rng.random((9, 12)) < 0.3, -np.inf, tied).astype(np.float32)
  for scores in (tied, distinct, with_inf):
    got = score_pass_host.top_k(scores, k)
    assert got.shape == (9, k) and got.dtype == np.int64
    np.testing.assert_array_equal(got, reference_top_k(scores, k))
  if k:
    np.testing.assert_array_equal(score_pass_host.top_k(tied, k),
                                  np.asarray(jax.lax.top_k(jnp.asarray(tied), k)[1]))


def test_counts_compare_float64_inputs_in_float32_as_documented():
  """1 + 0.9 * 2^-24 is 1.0 in float32: text 0 then scores both images 0 (a tie), where float64
  arithmetic would score image 1 at 0.9 * 2^-24 above its pair, on either engine."""
  text = np.array([[1.0, -1.0], [0.0, 1.0]])
  image = np.array([[1.0, 1.0], [1.0 + 0.9 * 2.0 ** -24, 1.0]])
  for engine in ENGINES.values():
    for block_size in (None, 1, 2):   # a padded copy, and views of the input
      greater, tied = engine.rank_counts(text, image, block_size=block_size)["t2i"]
      assert (int(greater[0]), int(tied[0])) == (0, 1), block_size


@pytest.mark.parametrize("engine", ENGINES)
def test_a_duplicate_of_the_paired_image_ties_with_it_wherever_the_tiles_fall(engine):
  """Image 4 is image 0 again: for text 0 it must tie with the pair exactly (bit-equal scores),
  whether the two sit in one tile, in a tile of views and a padded tile, or on either side."""
  rng = np.random.default_rng(41)
  text = rng.standard_normal((5, 96)).astype(np.float32)
  image = rng.standard_normal((5, 96)).astype(np.float32)
  image[4] = image[0]
  exact = text[0].astype(np.float64) @ image.astype(np.float64).T
  for block_size in (None, 1, 2, 3, 4):
    t2i_greater, t2i_tied = ENGINES[engine].rank_counts(text, image, block_size=block_size)["t2i"]
    assert int(t2i_tied[0]) == 1, block_size
    assert int(t2i_greater[0]) == int(np.sum(np.delete(exact, [0, 4]) > exact[0])), block_size


@pytest.mark.parametrize("k", [1, 50, 999])
def test_top_k_of_wide_rows_where_the_partition_leaves_the_rest_unsorted(k):
  scores = np.random.default_rng(42).standard_normal((3, 4000)).astype(np.float32)
  scores[1, ::7] = scores[1, 3]                                 # a row tied at many columns
  np.testing.assert_array_equal(score_pass_host.top_k(scores, k), reference_top_k(scores, k))


def test_jax_engine_asks_every_backend_for_full_float32_products():
  """On GPUs and TPUs XLA's default float32 matmul may run in TF32 or bfloat16 passes, which
  would round scores and move ranks: every product of embeddings (over D = 8 here) in the
  compiled passes asks for HIGHEST precision (XLA:CPU is exact either way, so this reads the
  lowered program). The 0/1 label overlaps (over L = 3) are exact at any precision."""
  text, image = quantized_embeddings(37, 8, seed=5)
  labels = (np.arange(37)[:, None] % 3 == np.arange(3)).astype(np.float32)
  programs = [
      jax.jit(lambda q, g: score_pass.rank_counts(q, g, block_size=8)).lower(text, image),
      jax.jit(lambda x, l: score_pass.volume_neighbours(x, l, np.ones(37, bool), k=5,
                                                        exclude_self=True)).lower(image, labels)]
  for program in programs:
    dots = [d for d in re.findall(r"dot_general.*", program.as_text()) if "tensor<8x" in d]
    assert dots and all("precision = [HIGHEST, HIGHEST]" in dot for dot in dots), dots
