"""Cross-attention fusion of two views' token sets (replaces the released code's parameter-free,
shape-broken "cross-attention" on pooled vectors).

For query tokens q (view a) and context tokens c (view b), both (B, N, D):
  fused_tokens = q + MHA(LN_q(q), LN_c(c))      (pre-norm, residual)
  fused        = masked mean of fused_tokens over the query tokens  -> (B, D)
Calling it with q = c = the tokens of one view is the single-view (evaluation) form.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medfinder_jax.models import attention


def masked_mean(x, mask=None):
  """Mean of x (B, N, D) over N where mask (B, N) is true (all tokens when mask is None)."""
  if mask is None:
    return jnp.mean(x, axis=1)
  weights = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


class MultiHeadCrossAttention(nn.Module):
  """Softmax(q k^T / sqrt(d)) v with separate q/k/v/out projections; context pads masked out."""
  num_heads: int = 8
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, context, context_mask=None, train=False):
    width = queries.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"fusion: token width {width} is not a multiple of num_heads "
                       f"{self.num_heads}")
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(y.shape[0], y.shape[1], self.num_heads, head_dim)
    q = split(dense("query")(queries))
    k, v = split(dense("key")(context)), split(dense("value")(context))
    bias = None if context_mask is None else jnp.where(context_mask[:, None, None, :], 0.0, -1e9)
    weights = attention.attention_weights(q, k, bias).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    return dense("out")(attention.attend(weights, v))


class CrossAttentionFusion(nn.Module):
  """Tokens of one view attend to the tokens of another; returns the pooled fused embedding.

  Attributes: num_heads (embedding width must be a multiple), dropout_rate on attention
  weights, dtype (compute).
  """
  num_heads: int = 8
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, context, query_mask=None, context_mask=None, train=False):
    """queries (B, Nq, D), context (B, Nc, D); masks (B, N) bool, true = real token.

    Returns (fused (B, D) float32 = masked mean of the fused query tokens, fused tokens).
    """
    norm = lambda name: nn.LayerNorm(dtype=self.dtype, name=name)
    attended = MultiHeadCrossAttention(self.num_heads, self.dropout_rate, self.dtype,
                                       name="attention")(norm("norm_query")(queries),
                                                         norm("norm_context")(context),
                                                         context_mask, train)
    tokens = queries.astype(self.dtype) + attended
    return masked_mean(tokens.astype(jnp.float32), query_mask), tokens
