"""Contrastive losses (clip / siglip / released) and the view-consistency MSE. Pure JAX.

Conventions shared by every function here:
- `text` and `image` are (N, D) embeddings of the *global* batch; row i of `text` is paired with
  row i of `image`. Under `jax.jit` with batch-sharded inputs, XLA inserts the gathers needed, so
  "negatives = the whole global batch" holds on any mesh.
- `mask` is an optional (N,) bool: True = a real study, False = a padding row. Padding rows
  contribute neither a positive nor a negative, and means are over real rows only.
- Logits are computed in float32 whatever the embedding dtype (bf16 logits lose the ranking).
- Each loss returns `(loss, metrics)`; metrics are scalars named for the JSONL log.
"""

import math

import jax
import jax.numpy as jnp

CONTRASTIVE_LOSSES = ("clip", "siglip", "released")
# Logit for masked-out pairs: finite (no NaN in gradients), far below any reachable logit.
_MASKED_LOGIT = -1e9


def learnable_scalars(loss_config):
  """Initial values of the scalars the model holds for the configured loss (floats), as
  {params key: value}: the model creates them as parameters (models/medfinder.py).

  clip:     {"logit_scale": log(1 / temperature_init)}   (CLIP: log(1/0.07) = 2.659)
  siglip:   {"logit_scale": log(siglip_logit_scale_init), "logit_bias": siglip_logit_bias_init}
            (SigLIP paper init: t = 10, b = -10)
  released: {} (the released code's temperature is fixed, loss.temperature_init)
  With loss.learn_temperature False the trainer freezes them at these values.
  """
  kind = _check_kind(loss_config.contrastive)
  if kind == "clip":
    return {"logit_scale": math.log(1.0 / loss_config.temperature_init)}
  if kind == "siglip":
    return {"logit_scale": math.log(loss_config.siglip_logit_scale_init),
            "logit_bias": float(loss_config.siglip_logit_bias_init)}
  return {}


def similarity_scale(params, loss_config):
  """The factor the trained loss applies to cosine similarities (its inverse temperature), as a
  float: what turns similarities into the model's logits, e.g. for zero-shot P(present).

  clip: exp(logit_scale) clipped as the loss clips it; siglip: exp(logit_scale); released: the
  fixed 1 / loss.temperature_init. `params`: the model's params (holding the loss scalars).
  """
  kind = _check_kind(loss_config.contrastive)
  if kind == "released" or "logit_scale" not in params:
    return 1.0 / float(loss_config.temperature_init)
  logit_scale = float(params["logit_scale"])
  if kind == "clip":
    logit_scale = min(max(logit_scale, 0.0), math.log(loss_config.max_logit_scale))
  return math.exp(logit_scale)


def l2_normalize(x, eps=1e-6):
  """Rows of `x` scaled to unit L2 norm (float32); eps keeps zero rows finite."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps * eps)


def clip(text, image, logit_scale, mask=None, max_logit_scale=100.0):
  """Symmetric InfoNCE (CLIP) on L2-normalized embeddings.

  logit_scale: log of the inverse temperature; it is clipped to [0, log(max_logit_scale)] as
  CLIP clamps it (temperature never below 1/max_logit_scale = 0.01, never above 1).
  Loss = (CE(text -> image) + CE(image -> text)) / 2, negatives = every other real row.
  """
  mask = _row_mask(mask, text.shape[0])
  scale = jnp.exp(jnp.clip(logit_scale, 0.0, math.log(max_logit_scale)))
  logits = scale * l2_normalize(text) @ l2_normalize(image).T
  loss_t2i, acc_t2i = _masked_diagonal_ce(logits, mask, mask)
  loss_i2t, acc_i2t = _masked_diagonal_ce(logits.T, mask, mask)
  loss = 0.5 * (loss_t2i + loss_i2t)
  return loss, {"contrastive": loss, "temperature": 1.0 / scale,
                "accuracy_t2i": acc_t2i, "accuracy_i2t": acc_i2t}


def siglip(text, image, logit_scale, logit_bias, mask=None):
  """Sigmoid loss (SigLIP) on L2-normalized embeddings.

  logits = exp(logit_scale) * t_i . x_j + logit_bias; label +1 on the diagonal, -1 elsewhere;
  loss = -sum over real pairs of log sigmoid(label * logit) / number of real rows (as the paper).
  """
  mask = _row_mask(mask, text.shape[0])
  scale = jnp.exp(logit_scale)
  logits = scale * l2_normalize(text) @ l2_normalize(image).T + logit_bias
  n = text.shape[0]
  labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  pair_valid = mask[:, None] & mask[None, :]
  per_pair = jnp.where(pair_valid, jax.nn.log_sigmoid(labels * logits), 0.0)
  loss = -jnp.sum(per_pair) / _count(mask)
  masked = jnp.where(pair_valid, logits, _MASKED_LOGIT)
  return loss, {"contrastive": loss, "temperature": 1.0 / scale, "logit_bias": logit_bias,
                "accuracy_t2i": _diagonal_accuracy(masked, mask),
                "accuracy_i2t": _diagonal_accuracy(masked.T, mask)}


def released(text, image, num_blocks, temperature=0.07, mask=None):
  """What the released code trains: CE(text_b @ image_b.T / temperature, arange) per device.

  The global batch is laid out contiguously by device: block d = rows d*B:(d+1)*B with
  B = N // num_blocks (the per-device batch). Logits exist only within a block (negatives = the
  device's local batch), text -> image only, no normalization, fixed temperature; the result is
  the mean over all real rows (DDP averages equal-sized per-device means, which is the same).
  """
  n, dim = text.shape
  if n % num_blocks:
    raise ValueError(f"released loss: global batch {n} is not divisible into num_blocks="
                     f"{num_blocks} equal per-device blocks")
  block = n // num_blocks
  mask = _row_mask(mask, n).reshape(num_blocks, block)
  text_b = text.astype(jnp.float32).reshape(num_blocks, block, dim)
  image_b = image.astype(jnp.float32).reshape(num_blocks, block, dim)
  logits = jnp.einsum("kid,kjd->kij", text_b, image_b) / temperature
  masked = jnp.where(mask[:, None, :], logits, _MASKED_LOGIT)
  per_row = jax.nn.logsumexp(masked, axis=-1) - jnp.diagonal(masked, axis1=1, axis2=2)
  loss = jnp.sum(jnp.where(mask, per_row, 0.0)) / _count(mask)
  hits = jnp.argmax(masked, axis=-1) == jnp.arange(block)[None, :]
  accuracy = jnp.sum(hits & mask) / _count(mask)
  return loss, {"contrastive": loss, "temperature": jnp.asarray(temperature, jnp.float32),
                "accuracy_t2i": accuracy}


def view_mse(a, b, mask=None, normalize=False):
  """View-consistency MSE: mean over real rows and all D features of (a - b)^2.

  Same reduction as torch.nn.MSELoss on (N, D) embeddings. normalize=True compares the
  L2-normalized rows (the space retrieval uses), where the value is (2 - 2 cos) / D.
  """
  a, b = (l2_normalize(a), l2_normalize(b)) if normalize else (a.astype(jnp.float32),
                                                               b.astype(jnp.float32))
  mask = _row_mask(mask, a.shape[0])
  per_row = jnp.mean(jnp.square(a - b), axis=-1)
  return jnp.sum(jnp.where(mask, per_row, 0.0)) / _count(mask)


def contrastive_loss(out, loss_config, mask=None, num_blocks=1):
  """The configured contrastive loss (`loss_config.contrastive`) of a model output -> (loss,
  metrics). out: "text", "image" (N, D) and the model's loss scalars ("logit_scale", and
  "logit_bias" for siglip)."""
  kind = _check_kind(loss_config.contrastive)
  text, image = out["text"], out["image"]
  if kind == "released":
    return released(text, image, num_blocks, loss_config.temperature_init, mask)
  if kind == "clip":
    return clip(text, image, out["logit_scale"], mask, loss_config.max_logit_scale)
  return siglip(text, image, out["logit_scale"], out["logit_bias"], mask)


def total_loss(out, loss_config, *, mask=None, num_blocks=1):
  """total = mse_weight * view_mse(image_a, image_b) + alpha * contrastive(text, image).

  out: the model's training output (models/medfinder.py):
    text:   (N, D) text embeddings;
    image:  (N, D) image embeddings for the contrastive term (the fused one when fusion is on);
    image_a, image_b: (N, D) per-view image embeddings for the consistency term (no image_b:
      one view, no MSE term);
    logit_scale, logit_bias: the loss scalars (see learnable_scalars).
  num_blocks: only for released, the number of per-device blocks (see `released`).
  Returns (loss, metrics) with metrics "loss", "contrastive", "mse", "temperature",
  "accuracy_t2i" (+ "accuracy_i2t" for clip/siglip, "logit_bias" for siglip).
  """
  contrastive, metrics = contrastive_loss(out, loss_config, mask, num_blocks)
  if out.get("image_b") is None:
    mse = jnp.zeros((), jnp.float32)
  else:
    mse = view_mse(out["image_a"], out["image_b"], mask, loss_config.mse_normalize)
  loss = loss_config.mse_weight * mse + loss_config.alpha * contrastive
  return loss, {**metrics, "loss": loss, "mse": mse}


def _masked_diagonal_ce(logits, row_valid, col_valid):
  """Mean over valid rows of CE(row, its diagonal column), invalid columns excluded."""
  masked = jnp.where(col_valid[None, :], logits, _MASKED_LOGIT)
  per_row = jax.nn.logsumexp(masked, axis=-1) - jnp.diagonal(masked)
  loss = jnp.sum(jnp.where(row_valid, per_row, 0.0)) / _count(row_valid)
  return loss, _diagonal_accuracy(masked, row_valid)


def _diagonal_accuracy(masked_logits, row_valid):
  """Fraction of valid rows whose largest logit is their own pair (in-batch top-1)."""
  hits = jnp.argmax(masked_logits, axis=-1) == jnp.arange(masked_logits.shape[0])
  return jnp.sum(hits & row_valid) / _count(row_valid)


def _row_mask(mask, n):
  return jnp.ones((n,), bool) if mask is None else jnp.asarray(mask, bool)


def _count(mask):
  return jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def _check_kind(kind):
  if kind not in CONTRASTIVE_LOSSES:
    raise ValueError(f"config loss.contrastive={kind!r}; expected one of {CONTRASTIVE_LOSSES}")
  return kind
