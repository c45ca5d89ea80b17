"""BERT encoder in Flax (transformers >= 5 ships no Flax models), numerically equal to HF
`BertModel` with absolute position embeddings. Parameter names mirror HF's module names so that
`convert_weights.load_hf_bert` maps them one to one.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from medfinder_jax.models import attention

ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The fields of an HF BERT `config.json` that define the computation (defaults: BERT-base)."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02
  position_embedding_type: str = "absolute"

  @classmethod
  def from_dict(cls, values, source="BERT config"):
    """Builds from a parsed HF config.json; unknown keys are ignored, unsupported values raise."""
    fields = {f.name for f in dataclasses.fields(cls)}
    config = cls(**{k: v for k, v in values.items() if k in fields})
    if config.hidden_act not in ACTIVATIONS:
      raise ValueError(f"{source}: hidden_act {config.hidden_act!r} is not supported; "
                       f"expected one of {sorted(ACTIVATIONS)}")
    if config.position_embedding_type != "absolute":
      raise ValueError(f"{source}: position_embedding_type {config.position_embedding_type!r} "
                       "is not supported; expected 'absolute'")
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(f"{source}: hidden_size {config.hidden_size} is not a multiple of "
                       f"num_attention_heads {config.num_attention_heads}")
    return config


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train=False):
    c = self.config
    init = nn.initializers.normal(c.initializer_range)
    embed = lambda n, name: nn.Embed(n, c.hidden_size, embedding_init=init, dtype=self.dtype,
                                     name=name)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (embed(c.vocab_size, "word_embeddings")(input_ids)
         + embed(c.max_position_embeddings, "position_embeddings")(positions)
         + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids))
    x = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x)
    return nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(x)


class BertSelfAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, train=False):
    """attention_bias: (B, 1, 1, L) additive, 0 for real tokens and a large negative for pads."""
    c = self.config
    b, n, width = x.shape
    heads, head_dim = c.num_attention_heads, width // c.num_attention_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name,
                                  kernel_init=nn.initializers.normal(c.initializer_range))
    split = lambda y: y.reshape(b, n, heads, head_dim)
    q, k, v = (split(dense(name)(x)) for name in ("query", "key", "value"))
    weights = attention.attention_weights(q, k, attention_bias).astype(self.dtype)
    weights = nn.Dropout(c.attention_probs_dropout_prob, deterministic=not train)(weights)
    return attention.attend(weights, v)


class BertOutput(nn.Module):
  """Dense -> dropout -> LayerNorm(. + residual): HF `BertSelfOutput` and `BertOutput`."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, train=False):
    c = self.config
    x = nn.Dense(c.hidden_size, dtype=self.dtype, name="dense",
                 kernel_init=nn.initializers.normal(c.initializer_range))(x)
    x = nn.Dropout(c.hidden_dropout_prob, deterministic=not train)(x)
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x + residual)


class BertAttention(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, train=False):
    y = BertSelfAttention(self.config, self.dtype, name="self")(x, attention_bias, train)
    return BertOutput(self.config, self.dtype, name="output")(y, x, train)


class BertIntermediate(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = nn.Dense(c.intermediate_size, dtype=self.dtype, name="dense",
                 kernel_init=nn.initializers.normal(c.initializer_range))(x)
    return ACTIVATIONS[c.hidden_act](x)


class BertLayer(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_bias, train=False):
    x = BertAttention(self.config, self.dtype, name="attention")(x, attention_bias, train)
    y = BertIntermediate(self.config, self.dtype, name="intermediate")(x)
    return BertOutput(self.config, self.dtype, name="output")(y, x, train)


class BertEncoder(nn.Module):
  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x, attention_bias, train=False):
    layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.config.num_hidden_layers):
      x = layer(self.config, self.dtype, name=f"layer_{i}")(x, attention_bias, train)
    return x


class BertPooler(nn.Module):
  """tanh(Dense(hidden state of the first token, CLS))."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = self.config
    y = nn.Dense(c.hidden_size, dtype=self.dtype, name="dense",
                 kernel_init=nn.initializers.normal(c.initializer_range))(x[:, 0])
    return jnp.tanh(y)


class BertModel(nn.Module):
  """HF `BertModel` (embeddings, encoder, pooler). Dropout is active when `train` is True."""
  config: BertConfig
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, token_type_ids=None, train=False):
    """input_ids, attention_mask (1 = token, 0 = pad), token_type_ids: (B, L) ints.

    Returns (last_hidden_state (B, L, hidden), pooled (B, hidden) = tanh(Dense(CLS))).
    """
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    # HF adds finfo(dtype).min to masked logits; -1e9 in float32 gives the same softmax.
    attention_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9)
    x = BertEmbeddings(self.config, self.dtype, name="embeddings")(input_ids, token_type_ids, train)
    x = BertEncoder(self.config, self.dtype, self.remat, name="encoder")(x, attention_bias, train)
    return x, BertPooler(self.config, self.dtype, name="pooler")(x)
