"""Score-matrix passes on JAX: both directions' rank counts in one pass over S = T·Iᵀ (tiles
spread over a device mesh), and each volume's nearest volumes.

The rank counts follow metrics.py's conventions ("Ties", "One pass"); score_pass_host.py holds
the same two functions with the same contracts on the host CPU without JAX. This engine is the
one for meshes and accelerators (metrics.rank_engine picks).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from medfinder_jax.score_pass_host import default_block_size, rows_per_strip


def _scores(queries, gallery):
  """One tile of the score matrix. Every score, the paired ones included, comes from this one
  function on equal-shaped blocks, so a paired score compares exactly with its row and column."""
  return jnp.matmul(queries, gallery.T, precision=jax.lax.Precision.HIGHEST)


def _diagonal(text_blocks, image_blocks):
  """(blocks, b) paired scores S_ii, read from the diagonal tiles (one tile per block row)."""
  eye = jnp.eye(text_blocks.shape[1], dtype=bool)
  return jax.lax.map(lambda x: jnp.sum(jnp.where(eye, _scores(x[0], x[1]), 0.0), axis=1),
                     (text_blocks, image_blocks))


def _tile_counts(tile, row_paired, col_paired, row_valid, col_valid):
  """Counts of one tile: for each row (t2i query) the valid columns scoring > / == its paired
  score, and for each column (i2t query) the valid rows scoring > / == its paired score."""
  rows_greater = jnp.sum((tile > row_paired[:, None]) & col_valid[None, :], axis=1, dtype=jnp.int32)
  rows_equal = jnp.sum((tile == row_paired[:, None]) & col_valid[None, :], axis=1, dtype=jnp.int32)
  cols_greater = jnp.sum((tile > col_paired[None, :]) & row_valid[:, None], axis=0, dtype=jnp.int32)
  cols_equal = jnp.sum((tile == col_paired[None, :]) & row_valid[:, None], axis=0, dtype=jnp.int32)
  return rows_greater, rows_equal, cols_greater, cols_equal


def _grid_counts(text_blocks, row_paired, row_valid, image_blocks, col_paired, col_valid):
  """Both directions' counts over the tiles (text block r) x (every image block c), one tile in
  memory at a time. Returns row counts (r, b) for these text blocks and column counts (c, b)
  summed over them."""

  def row_of_tiles(col_totals, row):
    text, paired, valid = row

    def tile_step(row_totals, col):
      image, c_paired, c_valid = col
      rg, re, cg, ce = _tile_counts(_scores(text, image), paired, c_paired, valid, c_valid)
      return (row_totals[0] + rg, row_totals[1] + re), (cg, ce)

    zeros = jnp.zeros(text.shape[0], jnp.int32)
    rows, cols = jax.lax.scan(tile_step, (zeros, zeros), (image_blocks, col_paired, col_valid))
    return (col_totals[0] + cols[0], col_totals[1] + cols[1]), rows

  zeros = jnp.zeros(col_paired.shape, jnp.int32)
  cols, rows = jax.lax.scan(row_of_tiles, (zeros, zeros), (text_blocks, row_paired, row_valid))
  return rows, cols


def _place(x, mesh, spec):
  """Lays x out as `spec` on `mesh`: a reshard on Explicit meshes, a constraint on Auto ones."""
  sharding = NamedSharding(mesh, spec)
  if all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)


def _sharded_grid_counts(mesh):
  """_grid_counts with the text blocks spread over every device of `mesh` (image blocks
  replicated); each device's column counts are summed over the mesh."""
  axes = tuple(mesh.axis_names)
  rows = P(axes)

  def local(text_blocks, row_paired, row_valid, image_blocks, col_paired, col_valid):
    row_counts, col_counts = _grid_counts(text_blocks, row_paired, row_valid, image_blocks,
                                          col_paired, col_valid)
    return row_counts, jax.tree.map(lambda x: jax.lax.psum(x, axes), col_counts)

  # check_vma=False: the scans' zero-initialized carries start replicated and become per-device.
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows, P(), P(), P()),
                       out_specs=(rows, P()), check_vma=False)


@functools.partial(jax.jit, static_argnames=("block_size", "mesh"))
def rank_counts(text, image, block_size=None, mesh=None):
  """Both directions' counts for paired rows (text i <-> image i) in one pass over S = T·Iᵀ.

  S is visited tile by tile (block_size x block_size scores at a time, never N x N): t2i counts
  by rows, i2t by columns of the same tiles, so each score is computed once. text, image: (N, D)
  float, compared by dot product as given (normalize first for cosine).
  block_size: rows/columns per tile; None = default_block_size(N).
  mesh: optional jax.sharding.Mesh; block rows are spread over all of its devices. Any N works:
    rows are padded to whole tiles, and padding never counts.
  Returns {"t2i": (greater, equal), "i2t": (greater, equal)}, each int32 (N,): how many gallery
  items score > / == the paired item (the pair itself excluded).
  """
  n = text.shape[0]
  devices = 1 if mesh is None else mesh.size
  block = block_size or default_block_size(n)
  col_blocks = math.ceil(n / block)
  row_blocks = math.ceil(col_blocks / devices) * devices
  blocks = lambda x, count: jnp.pad(jnp.asarray(x, jnp.float32), (  # noqa: E731
      (0, count * block - n), (0, 0))).reshape(count, block, -1)
  text_blocks, image_blocks = blocks(text, row_blocks), blocks(image, col_blocks)
  valid = jnp.arange(row_blocks * block).reshape(row_blocks, block) < n
  paired = _diagonal(text_blocks[:col_blocks], image_blocks)
  row_paired = jnp.pad(paired, ((0, row_blocks - col_blocks), (0, 0)))
  count = _grid_counts
  if mesh is not None:
    text_blocks, row_paired, valid_rows = (_place(x, mesh, P(tuple(mesh.axis_names)))
                                           for x in (text_blocks, row_paired, valid))
    count = _sharded_grid_counts(mesh)
  else:
    valid_rows = valid
  (rows_greater, rows_equal), (cols_greater, cols_equal) = count(
      text_blocks, row_paired, valid_rows, image_blocks, paired, valid[:col_blocks])
  flat = lambda x: x.reshape(-1)[:n]   # noqa: E731
  if mesh is not None:   # gather the (N,) counts before dropping the padding rows
    rows_greater, rows_equal = (_place(x, mesh, P()) for x in (rows_greater, rows_equal))
  return {"t2i": (flat(rows_greater), flat(rows_equal) - 1),
          "i2t": (flat(cols_greater), flat(cols_equal) - 1)}



@functools.partial(jax.jit, static_argnames=("k", "exclude_self"))
def volume_neighbours(image, labels, in_gallery, k, exclude_self):
  """Per query volume: the k best gallery volumes (ties to the lower index) and how many gallery
  volumes share a finding with it. image: (N, D) normalized; labels: (N, L) float32 0/1."""
  n = image.shape[0]
  rows = rows_per_strip(n)
  blocks = math.ceil(n / rows)
  pad = lambda x: jnp.pad(x, ((0, blocks * rows - n),) + ((0, 0),) * (x.ndim - 1))  # noqa: E731
  queries = (pad(image).reshape(blocks, rows, -1), pad(labels).reshape(blocks, rows, -1),
             jnp.arange(blocks * rows).reshape(blocks, rows))

  def block(x):
    vectors, query_labels, index = x
    allowed = in_gallery[None, :] & ~(exclude_self & (index[:, None] == jnp.arange(n)[None, :]))
    scores = jnp.where(allowed, _scores(vectors, image), -jnp.inf)
    shares = (jnp.matmul(query_labels, labels.T) > 0) & allowed
    return jax.lax.top_k(scores, k)[1], jnp.sum(shares, axis=1)

  top, relevant = jax.lax.map(block, queries)
  return top.reshape(-1, k)[:n], relevant.reshape(-1)[:n]


