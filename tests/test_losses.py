"""Losses against hand-written numpy references (and torch for the released code's formula)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfinder_jax import config_utils, losses

DEFAULT = os.path.join(os.path.dirname(__file__), "..", "configs", "default.py")


def _pairs(n=8, d=16, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(n, d)).astype(np.float32),
          rng.normal(size=(n, d)).astype(np.float32))


def _loss_config(kind="clip", **overrides):
  config = config_utils.load_config_file(DEFAULT).loss
  config.contrastive = kind
  for key, value in overrides.items():
    config[key] = value
  return config


# --- numpy references ---------------------------------------------------------------------------

def _np_normalize(x):
  x = x.astype(np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_ce_diagonal(logits):
  """Mean over rows of -log softmax(row)[i] (targets = arange)."""
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_softmax))


def _np_clip(text, image, scale):
  logits = scale * _np_normalize(text) @ _np_normalize(image).T
  return 0.5 * (_np_ce_diagonal(logits) + _np_ce_diagonal(logits.T))


def _np_siglip(text, image, scale, bias):
  logits = scale * _np_normalize(text) @ _np_normalize(image).T + bias
  labels = 2.0 * np.eye(len(text)) - 1.0
  log_sigmoid = -np.log1p(np.exp(-labels * logits))
  return -log_sigmoid.sum() / len(text)


# --- clip ---------------------------------------------------------------------------------------

def test_clip_matches_numpy_reference():
  text, image = _pairs()
  loss, _ = losses.clip(text, image, jnp.log(1 / 0.07))
  np.testing.assert_allclose(loss, _np_clip(text, image, 1 / 0.07), rtol=1e-5)


def test_clip_is_symmetric_in_text_and_image():
  text, image = _pairs()
  a, _ = losses.clip(text, image, jnp.log(1 / 0.07))
  b, _ = losses.clip(image, text, jnp.log(1 / 0.07))
  np.testing.assert_allclose(a, b, rtol=1e-6)


def test_clip_temperature_initialised_at_0_07():
  scalars = losses.learnable_scalars(_loss_config("clip"))
  assert set(scalars) == {"logit_scale"}
  np.testing.assert_allclose(scalars["logit_scale"], math.log(1 / 0.07), rtol=1e-6)
  _, metrics = losses.clip(*_pairs(), scalars["logit_scale"])
  np.testing.assert_allclose(metrics["temperature"], 0.07, rtol=1e-5)


def test_clip_clips_logit_scale_at_100_like_clip():
  text, image = _pairs()
  loss, metrics = losses.clip(text, image, jnp.float32(10.0))
  np.testing.assert_allclose(metrics["temperature"], 0.01, rtol=1e-5)
  np.testing.assert_allclose(loss, _np_clip(text, image, 100.0), rtol=1e-5)


def test_clip_ignores_scale_invariance_of_inputs():
  text, image = _pairs()
  a, _ = losses.clip(text, image, jnp.float32(2.0))
  b, _ = losses.clip(3.0 * text, 0.5 * image, jnp.float32(2.0))
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_clip_accuracy_is_one_for_perfectly_paired_embeddings():
  text = np.eye(6, 8, dtype=np.float32)
  _, metrics = losses.clip(text, text, jnp.log(1 / 0.07))
  assert metrics["accuracy_t2i"] == 1.0 and metrics["accuracy_i2t"] == 1.0


def test_clip_mask_equals_loss_on_real_rows_only():
  text, image = _pairs(n=8)
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  padded = image.copy()
  padded[~mask] = 1e3  # padding content must not matter
  masked, _ = losses.clip(text, padded, jnp.float32(2.0), mask=mask)
  np.testing.assert_allclose(masked, _np_clip(text[mask], image[mask], math.exp(2.0)), rtol=1e-5)


def test_clip_masked_gradient_is_finite_and_zero_on_padding_rows():
  text, image = _pairs(n=8)
  mask = np.array([1] * 6 + [0] * 2, bool)
  grads = jax.grad(lambda t: losses.clip(t, image, jnp.float32(2.0), mask=mask)[0])(text)
  assert np.all(np.isfinite(grads))
  np.testing.assert_array_equal(grads[~mask], 0.0)


# --- siglip -------------------------------------------------------------------------------------

def test_siglip_matches_numpy_reference():
  text, image = _pairs()
  loss, _ = losses.siglip(text, image, jnp.log(10.0), jnp.float32(-10.0))
  np.testing.assert_allclose(loss, _np_siglip(text, image, 10.0, -10.0), rtol=1e-5)


def test_siglip_logs_the_metrics_clip_logs_and_its_bias():
  """metrics.jsonl has the same columns whichever loss trained: the temperature is
  1 / exp(logit_scale), the accuracies are those of the pairs' logits."""
  text = np.eye(6, 8, dtype=np.float32)
  loss, metrics = losses.siglip(text, text, jnp.log(10.0), jnp.float32(-5.0))
  _, clip_metrics = losses.clip(text, text, jnp.log(10.0))
  assert set(metrics) == set(clip_metrics) | {"logit_bias"}
  assert metrics["contrastive"] == loss
  np.testing.assert_allclose(metrics["temperature"], 0.1, rtol=1e-6)
  assert metrics["logit_bias"] == -5.0
  assert metrics["accuracy_t2i"] == metrics["accuracy_i2t"] == 1.0


def test_siglip_init_follows_the_paper():
  scalars = losses.learnable_scalars(_loss_config("siglip"))
  np.testing.assert_allclose(math.exp(scalars["logit_scale"]), 10.0, rtol=1e-6)
  assert scalars["logit_bias"] == -10.0


def test_the_released_loss_learns_no_scalar():
  assert losses.learnable_scalars(_loss_config("released")) == {}


def test_siglip_mask_equals_loss_on_real_rows_only():
  text, image = _pairs(n=8)
  mask = np.array([1, 0, 1, 1, 1, 1, 1, 0], bool)
  loss, _ = losses.siglip(text, image, jnp.float32(1.0), jnp.float32(-2.0), mask=mask)
  np.testing.assert_allclose(loss, _np_siglip(text[mask], image[mask], math.e, -2.0), rtol=1e-5)


# --- released (the released code's loss) ---------------------------------------------------

def _torch_released_formula(text, image, num_blocks):
  """The released main_ddp.py per GPU: CE(text @ image.T / 0.07, arange(B)); DDP averages."""
  torch = pytest.importorskip("torch")
  f = torch.nn.functional
  per_device = []
  for t, i in zip(np.split(text, num_blocks), np.split(image, num_blocks)):
    t, i = torch.from_numpy(t).double(), torch.from_numpy(i).double()
    per_device.append(f.cross_entropy(t @ i.T / 0.07, torch.arange(len(t))).item())
  return np.mean(per_device)


@pytest.mark.parametrize("num_blocks", [1, 2, 4])
def test_released_loss_equals_released_formula_per_local_block(num_blocks):
  text, image = _pairs(n=8, d=16)
  text, image = 0.3 * text, 0.3 * image  # unnormalized logits must stay in a sane range
  loss, _ = losses.released(text, image, num_blocks)
  np.testing.assert_allclose(loss, _torch_released_formula(text, image, num_blocks), rtol=1e-5)


def test_released_loss_ignores_negatives_of_other_blocks():
  text, image = _pairs(n=8)
  other = image.copy()
  other[4:] = -other[4:] * 7.0  # change block 2 only
  a, _ = losses.released(text[:4], image[:4], 1)
  b, _ = losses.released(text, other, 2)
  c, _ = losses.released(text[4:], other[4:], 1)
  np.testing.assert_allclose(b, 0.5 * (a + c), rtol=1e-5)


def test_released_loss_is_text_to_image_only_and_unnormalized():
  text, image = _pairs(n=4)
  loss, _ = losses.released(0.1 * text, 0.1 * image, 1)
  logits = (0.1 * text.astype(np.float64)) @ (0.1 * image.astype(np.float64)).T / 0.07
  np.testing.assert_allclose(loss, _np_ce_diagonal(logits), rtol=1e-5)


def test_released_loss_mask_drops_padding_rows_within_their_block():
  text, image = _pairs(n=8)
  mask = np.array([1, 1, 1, 0, 1, 1, 1, 1], bool)
  loss, _ = losses.released(0.2 * text, 0.2 * image, 2, mask=mask)
  block1 = _np_ce_diagonal((0.2 * text[:3]) @ (0.2 * image[:3]).T / 0.07)
  block2 = _np_ce_diagonal((0.2 * text[4:]) @ (0.2 * image[4:]).T / 0.07)
  np.testing.assert_allclose(loss, (3 * block1 + 4 * block2) / 7, rtol=1e-5)


def test_released_loss_rejects_batch_not_divisible_into_blocks():
  with pytest.raises(ValueError, match="num_blocks=3"):
    losses.released(*_pairs(n=8), 3)


# --- view MSE and total -------------------------------------------------------------------------

def test_view_mse_matches_numpy_and_masks_rows():
  a, b = _pairs(n=6)
  mask = np.array([1, 1, 1, 1, 0, 0], bool)
  np.testing.assert_allclose(losses.view_mse(a, b), np.mean((a - b) ** 2), rtol=1e-6)
  np.testing.assert_allclose(losses.view_mse(a, b, mask), np.mean((a[:4] - b[:4]) ** 2),
                             rtol=1e-6)


def test_view_mse_normalized_is_two_minus_two_cosine_over_dim():
  a, b = _pairs(n=6, d=16)
  cos = np.sum(_np_normalize(a) * _np_normalize(b), axis=1)
  np.testing.assert_allclose(losses.view_mse(a, b, normalize=True), np.mean((2 - 2 * cos) / 16),
                             rtol=1e-5)


def model_output(text, image, config, view_a=None, view_b=None):
  """What the model returns for the losses: embeddings and its loss scalars at their init."""
  out = {"text": text, "image": image, "image_a": image if view_a is None else view_a,
         **{k: jnp.float32(v) for k, v in losses.learnable_scalars(config).items()}}
  if view_b is not None:
    out["image_b"] = view_b
  return out


def test_total_loss_weights_mse_and_contrastive():
  text, image = _pairs()
  view_a, view_b = _pairs(seed=1)
  config = _loss_config("clip", alpha=0.7, mse_weight=2.5)
  loss, metrics = losses.total_loss(model_output(text, image, config, view_a, view_b), config)
  expected_mse = losses.view_mse(view_a, view_b, normalize=True)
  expected_clip = _np_clip(text, image, 1 / 0.07)
  np.testing.assert_allclose(metrics["mse"], expected_mse, rtol=1e-6)
  np.testing.assert_allclose(metrics["contrastive"], expected_clip, rtol=1e-5)
  np.testing.assert_allclose(loss, 2.5 * expected_mse + 0.7 * expected_clip, rtol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip", "released"])
def test_total_loss_passes_the_padding_mask_to_every_contrastive_kind(kind):
  """Padding rows are excluded whichever loss is configured: total_loss with a mask equals the
  loss of the real rows alone (released: one block, so dropping rows keeps the blocks)."""
  text, image = _pairs(n=8)
  mask = np.array([True] * 6 + [False] * 2)
  config = _loss_config(kind, mse_weight=0.0)
  _, metrics = losses.total_loss(model_output(text, image, config), config, mask=mask)
  _, real = losses.total_loss(model_output(text[:6], image[:6], config), config)
  np.testing.assert_allclose(metrics["contrastive"], real["contrastive"], rtol=1e-5)


def test_total_loss_clips_the_logit_scale_at_the_configured_maximum():
  text, image = _pairs()
  config = _loss_config("clip", mse_weight=0.0, max_logit_scale=20.0)
  out = {**model_output(text, image, config), "logit_scale": jnp.float32(10.0)}
  _, metrics = losses.total_loss(out, config)
  np.testing.assert_allclose(metrics["temperature"], 1 / 20.0, rtol=1e-5)
  np.testing.assert_allclose(metrics["contrastive"], _np_clip(text, image, 20.0), rtol=1e-5)


def test_contrastive_loss_is_one_block_unless_told_otherwise():
  text, image = _pairs(n=8)
  config = _loss_config("released")
  loss, _ = losses.contrastive_loss(model_output(text, image, config), config)
  np.testing.assert_allclose(loss, losses.released(text, image, 1)[0], rtol=1e-6)


def test_total_loss_without_views_has_zero_mse():
  config = _loss_config("released")
  loss, metrics = losses.total_loss(model_output(*_pairs(), config), config, num_blocks=2)
  assert metrics["mse"] == 0.0
  np.testing.assert_allclose(loss, metrics["contrastive"], rtol=1e-6)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_the_loss_scalars_get_a_gradient(kind):
  config = _loss_config(kind)
  out = model_output(*_pairs(), config)
  scalars = {k: out[k] for k in losses.learnable_scalars(config)}
  grads = jax.grad(lambda p: losses.total_loss({**out, **p}, config)[0])(scalars)
  assert all(abs(float(g)) > 0.0 for g in grads.values())


def test_unknown_contrastive_kind_is_a_clear_error():
  with pytest.raises(ValueError, match="loss.contrastive='infonce'"):
    losses.learnable_scalars(_loss_config("infonce"))


# --- on a mesh ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["clip", "siglip", "released"])
def test_loss_on_a_batch_sharded_over_8_devices_equals_the_unsharded_loss(kind):
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  rows = jax.sharding.NamedSharding(mesh, jax.P("data"))
  text, image = _pairs(n=16)
  config = _loss_config(kind)
  fn = jax.jit(lambda t, i: losses.total_loss(model_output(t, i, config), config,
                                              num_blocks=8)[0])
  sharded = fn(jax.device_put(text, rows), jax.device_put(image, rows))
  np.testing.assert_allclose(sharded, fn(text, image), rtol=1e-5)


def test_l2_normalize_keeps_an_all_zero_row_finite_and_scales_others_to_unit_length():
  """A zero embedding (e.g. a padded row) must stay 0, not turn into NaN that spreads through
  the similarity matrix; other rows get unit norm."""
  x = jnp.array([[0.0, 0.0, 0.0], [3.0, 0.0, 4.0]], jnp.bfloat16)
  out = losses.l2_normalize(x)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out[0]), [0.0, 0.0, 0.0])
  np.testing.assert_allclose(np.asarray(out[1]), [0.6, 0.0, 0.8], rtol=1e-5)


# --- the released loss's logged metrics -----------------------------------------------------------

def test_released_metrics_count_rows_whose_own_image_scores_highest_in_their_block():
  text, image = _pairs(n=12, d=8, seed=3)
  mask = np.array([True] * 10 + [False] * 2)
  _, metrics = losses.released(text, image, 3, temperature=0.1, mask=mask)
  hits = []
  for b in range(3):                                  # blocks of 4 rows: text -> image in block
    rows = slice(4 * b, 4 * b + 4)
    logits = text[rows] @ image[rows].T
    logits[:, ~mask[rows]] = -np.inf                  # padding rows are no candidates
    hits += list(np.argmax(logits, axis=1) == np.arange(4))
  expected = np.sum(np.array(hits) & mask) / mask.sum()
  assert 0 < expected < 1
  np.testing.assert_allclose(metrics["accuracy_t2i"], expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["temperature"], 0.1, rtol=1e-6)
  assert set(metrics) == {"contrastive", "temperature", "accuracy_t2i"}


@pytest.mark.parametrize("logit_scale, scale", [(-1.0, 1.0), (0.5, math.exp(0.5)), (6.0, 100.0)])
def test_clip_temperature_is_clamped_between_1_and_0_01(logit_scale, scale):
  text, image = _pairs()
  loss, _ = losses.clip(text, image, jnp.float32(logit_scale))
  np.testing.assert_allclose(loss, _np_clip(text, image, scale), rtol=1e-5)


# --- The scale zero-shot reads, and what total_loss forwards (mutation testing) -------------------

@pytest.mark.parametrize("logit_scale,expected", [(math.log(30.0), 30.0), (-3.0, 1.0),
                                                  (10.0, 100.0)])
def test_similarity_scale_of_clip_is_the_clamped_scale_its_loss_applies(logit_scale, expected):
  """Zero-shot P(present) must scale cosines as the trained loss does: exp(logit_scale) clamped
  to [1, max_logit_scale], exactly where total_loss reports its temperature."""
  config = _loss_config("clip", mse_weight=0.0)
  params = {"logit_scale": np.float32(logit_scale)}
  assert losses.similarity_scale(params, config) == pytest.approx(expected, rel=1e-6)
  out = {**model_output(*_pairs(), config), "logit_scale": jnp.float32(logit_scale)}
  _, metrics = losses.total_loss(out, config)
  assert 1.0 / float(metrics["temperature"]) == pytest.approx(expected, rel=1e-5)


def test_similarity_scale_of_siglip_is_unclamped_and_released_is_its_fixed_temperature():
  params = {"logit_scale": np.float32(math.log(500.0))}
  assert losses.similarity_scale(params, _loss_config("siglip")) == pytest.approx(500.0, rel=1e-6)
  released = _loss_config("released", temperature_init=0.05)
  assert losses.similarity_scale(params, released) == pytest.approx(20.0)
  assert losses.similarity_scale({}, _loss_config("clip", temperature_init=0.1)) == pytest.approx(
      10.0)
  with pytest.raises(ValueError, match="loss.contrastive"):
    losses.similarity_scale(params, _loss_config("infonce"))


def test_total_loss_reports_the_loss_it_returns_and_masks_the_view_term():
  text, image = _pairs(n=8)
  view_a, view_b = _pairs(n=8, seed=1)
  mask = np.array([True] * 6 + [False] * 2)
  config = _loss_config("clip", mse_weight=1.0)
  loss, metrics = losses.total_loss(model_output(text, image, config, view_a, view_b), config,
                                    mask=mask)
  assert float(metrics["loss"]) == float(loss)
  np.testing.assert_allclose(metrics["mse"], losses.view_mse(view_a[:6], view_b[:6], normalize=True),
                             rtol=1e-6)


def test_total_loss_passes_num_blocks_to_the_released_loss():
  text, image = _pairs(n=8)
  config = _loss_config("released", mse_weight=0.0)
  _, metrics = losses.total_loss(model_output(text, image, config), config, num_blocks=2)
  np.testing.assert_allclose(metrics["contrastive"], losses.released(text, image, 2)[0], rtol=1e-6)
  assert not np.isclose(float(metrics["contrastive"]), float(losses.released(text, image, 1)[0]))


def test_logged_accuracy_is_the_share_of_real_rows_whose_pair_scores_highest():
  """accuracy_t2i against an argmax reference on imperfect pairs with padding, and with a single
  real row (a last batch of one study): its own pair is the best, accuracy 1, not 1/2."""
  text, image = _pairs(n=8, seed=5)
  image = image + 0.5 * text                         # some rows right, some wrong
  mask = np.array([True] * 6 + [False] * 2)
  config = _loss_config("clip", mse_weight=0.0)
  _, metrics = losses.total_loss(model_output(text, image, config), config, mask=mask)
  logits = _np_normalize(text[:6]) @ _np_normalize(image[:6]).T
  t2i = np.mean(np.argmax(logits, axis=1) == np.arange(6))
  i2t = np.mean(np.argmax(logits, axis=0) == np.arange(6))
  assert 0.0 < t2i < 1.0 and t2i != i2t
  assert float(metrics["accuracy_t2i"]) == pytest.approx(t2i)
  assert float(metrics["accuracy_i2t"]) == pytest.approx(i2t)
  one = np.array([True] + [False] * 7)
  _, single = losses.total_loss(model_output(text, text, config), config, mask=one)
  assert float(single["accuracy_t2i"]) == pytest.approx(1.0)
