"""Scaled dot-product attention shared by BERT, the ViT and the fusion (heads split by caller)."""

import flax.linen as nn
import jax.numpy as jnp


def attention_weights(q, k, bias=None):
  """softmax(q k^T / sqrt(d) + bias) over the keys, (B, H, Nq, Nk) in float32.

  q (B, Nq, H, d), k (B, Nk, H, d); bias broadcasts to the logits (additive mask). The logits
  and softmax stay in float32 whatever the compute dtype: bf16 logits lose the small
  differences that softmax amplifies.
  """
  logits = jnp.einsum("bxhd,byhd->bhxy", q, k).astype(jnp.float32) * q.shape[-1]**-0.5
  if bias is not None:
    logits = logits + bias
  return nn.softmax(logits, axis=-1)


def attend(weights, v):
  """Weighted sum of values: weights (B, H, Nq, Nk), v (B, Nk, H, d) -> (B, Nq, H*d)."""
  y = jnp.einsum("bhxy,byhd->bxhd", weights.astype(v.dtype), v)
  return y.reshape(*y.shape[:2], y.shape[2] * y.shape[3])   # no -1: Nq may be 0
