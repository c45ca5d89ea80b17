"""Cross-attention fusion: shapes, a NumPy reference, permutation behaviour, masking, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfinder_jax.models import fusion

D, HEADS = 16, 4


@pytest.fixture(scope="module")
def setup():
  module = fusion.CrossAttentionFusion(num_heads=HEADS)
  tokens = jnp.zeros((1, 3, D))
  params = jax.jit(module.init)(jax.random.key(0), tokens, tokens)["params"]
  # Non-trivial LayerNorm affine parameters, so a wrong normalisation would show.
  keys = jax.random.split(jax.random.key(1), 2)
  for key, name in zip(keys, ("norm_query", "norm_context")):
    params[name] = {"scale": 1 + 0.3 * jax.random.normal(key, (D,)),
                    "bias": 0.1 * jax.random.normal(key, (D,))[::-1]}
  apply = jax.jit(lambda q, c, qm=None, cm=None: module.apply({"params": params}, q, c, qm, cm))
  return params, apply


def tokens(seed, n, batch=2):
  return jax.random.normal(jax.random.key(seed), (batch, n, D))


def numpy_reference(params, q, c):
  """Pre-norm residual multi-head cross-attention, mean-pooled, written out in NumPy."""
  p = jax.tree.map(np.asarray, params)
  norm = lambda x, n: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
                       * p[n]["scale"] + p[n]["bias"])
  dense = lambda x, n: x @ p["attention"][n]["kernel"] + p["attention"][n]["bias"]
  heads = lambda x: x.reshape(*x.shape[:2], HEADS, D // HEADS).transpose(0, 2, 1, 3)
  qn, cn = norm(np.asarray(q), "norm_query"), norm(np.asarray(c), "norm_context")
  qh, kh, vh = heads(dense(qn, "query")), heads(dense(cn, "key")), heads(dense(cn, "value"))
  logits = qh @ kh.transpose(0, 1, 3, 2) / np.sqrt(D // HEADS)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attended = (weights @ vh).transpose(0, 2, 1, 3).reshape(qn.shape)
  fused_tokens = np.asarray(q) + dense(attended, "out")
  return fused_tokens.mean(axis=1), fused_tokens


def test_shapes(setup):
  _, apply = setup
  fused, fused_tokens = apply(tokens(0, 5), tokens(1, 7))
  assert fused.shape == (2, D) and fused.dtype == jnp.float32
  assert fused_tokens.shape == (2, 5, D)


def test_matches_numpy_reference(setup):
  params, apply = setup
  q, c = tokens(0, 5), tokens(1, 7)
  fused, fused_tokens = apply(q, c)
  expected, expected_tokens = numpy_reference(params, q, c)
  np.testing.assert_allclose(fused_tokens, expected_tokens, atol=1e-5)
  np.testing.assert_allclose(fused, expected, atol=1e-5)


def test_context_order_does_not_matter_and_query_order_permutes_tokens(setup):
  _, apply = setup
  q, c = tokens(0, 5), tokens(1, 6)
  fused, fused_tokens = apply(q, c)
  order = np.array([3, 0, 4, 1, 2])
  np.testing.assert_allclose(apply(q, c[:, ::-1])[0], fused, atol=1e-5)
  permuted, permuted_tokens = apply(q[:, order], c)
  np.testing.assert_allclose(permuted_tokens, fused_tokens[:, order], atol=1e-5)
  np.testing.assert_allclose(permuted, fused, atol=1e-5)


def test_context_tokens_outside_the_mask_are_ignored(setup):
  _, apply = setup
  q, c = tokens(0, 5), tokens(1, 6)
  mask = jnp.array([[True] * 4 + [False] * 2, [True] * 6])
  garbage = c.at[0, 4:].set(100.0)
  masked = apply(q, garbage, None, mask)[0]
  np.testing.assert_allclose(masked[0], apply(q[:1], c[:1, :4])[0][0], atol=1e-5)
  np.testing.assert_allclose(masked[1], apply(q[1:], c[1:])[0][0], atol=1e-5)


def test_pooling_covers_only_masked_in_queries(setup):
  _, apply = setup
  q, c = tokens(0, 5), tokens(1, 6)
  query_mask = jnp.array([[True, True, False, False, False], [True] * 5])
  pooled = apply(q.at[0, 2:].set(100.0), c, query_mask, None)[0]
  np.testing.assert_allclose(pooled[0], apply(q[:1, :2], c[:1])[0][0], atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32(setup):
  params, apply = setup
  low = fusion.CrossAttentionFusion(num_heads=HEADS, dtype=jnp.bfloat16)
  q, c = tokens(0, 5), tokens(1, 7)
  fused_low, tokens_low = jax.jit(low.apply)({"params": params}, q, c)
  assert tokens_low.dtype == jnp.bfloat16 and fused_low.dtype == jnp.float32
  # Stated tolerance for unit-scale tokens: 0.05 absolute.
  np.testing.assert_allclose(fused_low, apply(q, c)[0], atol=5e-2)


def test_width_must_split_into_heads():
  module = fusion.CrossAttentionFusion(num_heads=5)
  with pytest.raises(ValueError, match="num_heads 5"):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 2, D)), jnp.zeros((1, 2, D)))
