"""3D Vision Transformer, equivalent to MONAI `ViT(proj_type="conv", pos_embed_type="learnable",
classification=False, qkv_bias=False)`: pre-LayerNorm blocks, exact (erf) GELU, final LayerNorm.

Channels-last volumes (B, X, Y, Z, C); patches are numbered X-major (then Y, then Z), which is
MONAI's order for the same volume given to PyTorch as (B, C, X, Y, Z).
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from medfinder_jax.models import attention
from medfinder_jax.models.resnet3d import constrain

# MONAI initialises Linear weights and the position embedding with trunc_normal(std=0.02).
dense_init = nn.initializers.truncated_normal(0.02)


class SelfAttention(nn.Module):
  """MONAI `SABlock`: one fused qkv Dense whose outputs are ordered (q|k|v, head, head_dim)."""
  num_heads: int
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    b, n, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"ViT3D: hidden_size {width} is not a multiple of num_heads "
                       f"{self.num_heads}")
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, use_bias=self.qkv_bias, dtype=self.dtype, kernel_init=dense_init,
                   name="qkv")(x)
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, head_dim), 2, 0)
    weights = attention.attention_weights(q, k).astype(self.dtype)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    y = attention.attend(weights, v)
    y = nn.Dense(width, dtype=self.dtype, kernel_init=dense_init, name="out_proj")(y)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(y)


class Mlp(nn.Module):
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    drop = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init, name="linear1")(x)
    y = drop(nn.gelu(y, approximate=False))
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init, name="linear2")(y)
    return drop(y)


class TransformerBlock(nn.Module):
  """x + attn(LN(x)); x + mlp(LN(x)) (MONAI `TransformerBlock`, LayerNorm eps 1e-5)."""
  num_heads: int
  mlp_dim: int
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    x = x + SelfAttention(self.num_heads, self.qkv_bias, self.dropout_rate, self.dtype,
                          name="attn")(norm("norm1")(x), train)
    return x + Mlp(self.mlp_dim, self.dropout_rate, self.dtype, name="mlp")(norm("norm2")(x), train)


class ViT3D(nn.Module):
  """3D ViT image tower. The position embedding has one row per patch, so its size is fixed by
  the volume shape seen at init (224x224x96 with 16^3 patches -> 14*14*6 = 1176 patches).

  Attributes:
    patch_size: cubic patch edge (voxels); a remainder of the volume that does not fill a patch
      is dropped, as MONAI's strided conv does.
    hidden_size, mlp_dim, num_layers, num_heads: transformer size (MONAI defaults 768/3072/12/12).
    dtype: compute dtype (params stay float32). remat: rematerialize each block.
    activation_sharding: None, or a function placing activations on a mesh
      (sharding.SpatialSharding): the input volume split along X, the patch tokens along the
      sequence between blocks (attention gathers the keys and values it needs).
  """
  patch_size: int = 16
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  qkv_bias: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  activation_sharding: Optional[Callable] = None

  @nn.compact
  def __call__(self, x, train=False):
    """x: (B, X, Y, Z, 1) float volume. Returns (pooled (B, hidden) float32, out dict).

    out: "stem" = patch embeddings + position (B, N, hidden) before the blocks, "tokens" = the
    final LayerNorm'd patch tokens (B, N, hidden); pooled = their mean over patches.
    """
    p = self.patch_size
    shard = lambda y: constrain(y, self.activation_sharding)  # noqa: E731
    x = nn.Conv(self.hidden_size, (p, p, p), strides=(p, p, p), padding="VALID",
                dtype=self.dtype, name="patch_embedding")(shard(x.astype(self.dtype)))
    x = shard(x.reshape(x.shape[0], -1, self.hidden_size))
    pos = self.param("position_embeddings", dense_init, (1, x.shape[1], self.hidden_size))
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    out = {"stem": x}

    block = nn.remat(TransformerBlock, static_argnums=(2,)) if self.remat else TransformerBlock
    for i in range(self.num_layers):
      x = shard(block(self.num_heads, self.mlp_dim, self.qkv_bias, self.dropout_rate, self.dtype,
                      name=f"block{i}")(x, train))

    x = shard(nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x))
    out["tokens"] = x
    return jnp.mean(x.astype(jnp.float32), axis=1), out
