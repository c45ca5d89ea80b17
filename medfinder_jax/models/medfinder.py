"""The MedFinder model: image tower + projection, BERT text tower + projection, view fusion.

Parameter tree (top-level keys of `variables["params"]`):
  image_encoder     ResNet3D or ViT3D (ResNet BatchNorm statistics in variables["batch_stats"])
  image_projection  Dense(num_features -> embed_dim): the released code's `visual_encoder.projection`
  text_encoder      BertModel (frozen by default: the trainer selects it by this key)
  text_projection   Dense(hidden -> embed_dim) applied to the CLS hidden state
  fusion            CrossAttentionFusion (absent when fusion is disabled)
  logit_scale       () float32: log of the contrastive loss's inverse temperature (clip, siglip)
  logit_bias        () float32: the sigmoid loss's bias (siglip)

The loss scalars are parameters of the model (as in big_vision's two towers), so one parameter
tree holds everything a step changes; the trainer decides what is frozen by top-level key.

Projection and pooling commute (both linear), so the unfused embedding
proj(mean(tokens)) equals mean(proj(tokens)) and matches the released code's `Linear(pooled)`.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from medfinder_jax.models import bert as bert_lib
from medfinder_jax.models import fusion as fusion_lib
from medfinder_jax.models import resnet3d
from medfinder_jax.models import vit3d

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BACKBONES = ("resnet50", "vit")
TEXT_TOWER = "text_encoder"                   # params key of the BERT tower
LOSS_SCALARS = ("logit_scale", "logit_bias")  # params keys of the loss scalars (when present)


class MedFinder(nn.Module):
  """Attributes:
    image_encoder: a module mapping (B, X, Y, Z, 1) -> (pooled, {"tokens": (B, N, C), ...}).
    text_config: BertConfig of the text tower.
    embed_dim: joint embedding width (512).
    use_fusion: cross-attention fusion of views (False: an unfused single view, as the released code runs).
    fusion_heads: attention heads of the fusion.
    text_pooling: "cls" (the released code: the [CLS] hidden state) or "mean" (mean of the token hidden
      states under the attention mask: how sentence-transformers models such as all-MiniLM-L6-v2
      were trained to embed a sentence).
    logit_scale_init, logit_bias_init: initial values of the loss scalars held as parameters
      (losses.learnable_scalars); None = the loss has no such scalar.
    dtype: compute dtype; params are float32; returned embeddings are float32.
  Freezing (e.g. the text tower, as the released code does) is the trainer's: dropout stays
  active in training either way, as in the released code.
  """
  image_encoder: nn.Module
  text_config: bert_lib.BertConfig
  embed_dim: int = 512
  use_fusion: bool = True
  fusion_heads: int = 8
  text_pooling: str = "cls"
  logit_scale_init: Optional[float] = None
  logit_bias_init: Optional[float] = None
  dtype: Any = jnp.float32
  remat: bool = False

  def setup(self):
    self.image_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
    self.text_encoder = bert_lib.BertModel(self.text_config, self.dtype, self.remat)
    self.text_projection = nn.Dense(self.embed_dim, dtype=self.dtype)
    if self.use_fusion:
      self.fusion = fusion_lib.CrossAttentionFusion(self.fusion_heads, dtype=self.dtype)
    inits = dict(zip(LOSS_SCALARS, (self.logit_scale_init, self.logit_bias_init)))
    self.loss_scalars = {name: self.param(name, nn.initializers.constant(value), (), jnp.float32)
                         for name, value in inits.items() if value is not None}

  def _image_features(self, volume, train):
    """-> (unfused embedding (B, D) float32, projected tokens (B, N, D) or None)."""
    pooled, out = self.image_encoder(volume, train)
    unfused = self.image_projection(pooled.astype(self.dtype)).astype(jnp.float32)
    tokens = self.image_projection(out["tokens"]) if self.use_fusion else None
    return unfused, tokens

  def _self_fused(self, unfused, tokens, train):
    """Single-view image embedding: the view attends to itself (or no fusion at all)."""
    if not self.use_fusion:
      return unfused
    return self.fusion(tokens, tokens, train=train)[0]

  def encode_image(self, volume, train=False):
    """volume (B, X, Y, Z, 1) float -> image embedding (B, embed_dim) float32 (eval form)."""
    return self._self_fused(*self._image_features(volume, train), train)

  def encode_text(self, input_ids, attention_mask, train=False):
    """input_ids, attention_mask (B, L) int (mask 1 = token) -> (B, embed_dim) float32."""
    hidden, _ = self.text_encoder(input_ids, attention_mask, train=train)
    pooled = pool_text(hidden, attention_mask, self.text_pooling)
    return self.text_projection(pooled).astype(jnp.float32)

  def __call__(self, view_a, view_b, input_ids, attention_mask, train=True):
    """Training forward. view_a, view_b: (B, X, Y, Z, 1) augmented views (view_b None = one view).

    Returns float32 (B, embed_dim) arrays:
      image_a, image_b: unfused per-view embeddings (view-consistency MSE); no image_b for one view
      image: embedding for the contrastive loss = 0.5 (fused a<-b + fused b<-a) with fusion,
        else image_a (two views) / the single-view embedding
      text: text embedding
    and the loss scalars the model holds (logit_scale, logit_bias: () float32).
    """
    result = {"text": self.encode_text(input_ids, attention_mask, train), **self.loss_scalars}
    if view_b is None:
      unfused, tokens = self._image_features(view_a, train)
      result.update(image_a=unfused, image=self._self_fused(unfused, tokens, train))
      return result
    # Interleave the views (a0, b0, a1, b1, ...): one encoder pass, and each device keeps its own
    # examples when the batch axis is sharded. BatchNorm statistics cover both views.
    both = jnp.stack([view_a, view_b], axis=1).reshape(-1, *view_a.shape[1:])
    unfused, tokens = self._image_features(both, train)
    unfused = unfused.reshape(-1, 2, unfused.shape[-1])
    result.update(image_a=unfused[:, 0], image_b=unfused[:, 1], image=unfused[:, 0])
    if self.use_fusion:
      tokens = tokens.reshape(-1, 2, *tokens.shape[1:])
      fused_a, _ = self.fusion(tokens[:, 0], tokens[:, 1], train=train)
      fused_b, _ = self.fusion(tokens[:, 1], tokens[:, 0], train=train)
      result["image"] = 0.5 * (fused_a + fused_b)
    return result


TEXT_POOLINGS = ("cls", "mean")


def pool_text(hidden, attention_mask, pooling):
  """(B, L, H) hidden states -> (B, H): the [CLS] state or the masked mean over tokens."""
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    mask = attention_mask[..., None].astype(hidden.dtype)
    return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1)
  raise ValueError(f"text.pooling: got {pooling!r}, expected one of {TEXT_POOLINGS}")


def compute_dtype(name):
  """'float32' | 'bfloat16' | 'float16' (config `model.dtype`) -> jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"model.dtype: got {name!r}, expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def build_image_encoder(model_config, activation_sharding=None):
  """The image tower named by `model_config.backbone` ('resnet50' | 'vit').

  activation_sharding: None, or where the tower's activations go on a mesh
  (sharding.SpatialSharding: volumes split over devices)."""
  dtype = compute_dtype(model_config.dtype)
  if model_config.backbone == "resnet50":
    r = model_config.resnet
    return resnet3d.ResNet3D(tuple(r.layers), tuple(r.widths), r.conv1_kernel, r.conv1_stride,
                             dtype=dtype, remat=model_config.remat,
                             conv_impl=r.get("conv_impl", "auto"),
                             activation_sharding=activation_sharding)
  if model_config.backbone == "vit":
    v = model_config.vit
    return vit3d.ViT3D(v.patch_size, v.hidden_size, v.mlp_dim, v.num_layers, v.num_heads,
                       dropout_rate=v.dropout_rate, dtype=dtype,
                       remat=model_config.remat, activation_sharding=activation_sharding)
  raise ValueError(f"model.backbone: got {model_config.backbone!r}, expected one of {BACKBONES}")


def build_model(model_config, text_config, bert_config, loss_scalars=None,
                activation_sharding=None):
  """MedFinder from the config's `model` and `text` sections, the text tower's BertConfig
  (read from the text model folder by `convert_weights.load_bert_config`), the initial values
  of the loss scalars it holds ({"logit_scale": v, ...}: losses.learnable_scalars) and the
  image tower's activation_sharding (build_image_encoder)."""
  loss_scalars = loss_scalars or {}
  return MedFinder(
      image_encoder=build_image_encoder(model_config, activation_sharding),
      text_config=bert_config,
      embed_dim=model_config.embed_dim,
      use_fusion=model_config.fusion.enabled,
      fusion_heads=model_config.fusion.num_heads,
      text_pooling=text_config.get("pooling", "cls"),
      logit_scale_init=loss_scalars.get("logit_scale"),
      logit_bias_init=loss_scalars.get("logit_bias"),
      dtype=compute_dtype(model_config.dtype),
      remat=model_config.remat)


def init_variables(model, rng, image_shape, max_tokens, text_params=None):
  """Fresh variables {"params", ["batch_stats"]} for volumes of `image_shape` (X, Y, Z) and
  texts of `max_tokens` tokens. Only the initialisers run (flax lazy_init): no forward pass, no
  volume in memory; the volume shape matters for the ViT position embedding only. Pure: jit it
  (the train state does, with output shardings) or jax.eval_shape it.

  text_params: pretrained BertModel params to put in params["text_encoder"] (their random
  initialisation is then dead code that XLA drops).
  The initialisers draw from an "rbg" key derived from `rng` (same rng -> same params on one
  backend): XLA compiles hundreds of threefry draws 2-3x slower on CPU.
  """
  volume = jax.ShapeDtypeStruct((1, *image_shape, 1), jnp.float32)
  ids = jax.ShapeDtypeStruct((1, max_tokens), jnp.int32)

  key = jax.random.wrap_key_data(jax.random.bits(rng, (4,), jnp.uint32), impl="rbg")
  variables = model.lazy_init({"params": key, "dropout": key}, volume, volume, ids, ids,
                              train=False)
  if text_params is not None:
    variables = {**variables, "params": {**variables["params"], TEXT_TOWER: text_params}}
  return variables


_compiled_init = jax.jit(init_variables, static_argnums=(0, 2, 3))


def initialize(model, rng, image_shape, max_tokens, text_params=None):
  """init_variables compiled once per model and shapes, for callers outside a jit (tools,
  tests, loading.init_model); inside a jit call init_variables itself."""
  return _compiled_init(model, rng, tuple(image_shape), int(max_tokens), text_params)
