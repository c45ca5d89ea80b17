"""MedFinder: outputs of the two-view / single-view forward, encode_image / encode_text, fusion on
and off, the loss scalars it holds, and building from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from medfinder_jax import losses
from medfinder_jax.models import bert
from medfinder_jax.models import fusion
from medfinder_jax.models import medfinder

IMAGE = (16, 16, 8)
TOKENS = 6
TINY_BERT = bert.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=24)


def tiny_config(fusion=True, backbone="resnet50"):
  config = default.get_config()
  config.model.backbone = backbone
  config.model.embed_dim = 16
  config.model.fusion.enabled = fusion
  config.model.fusion.num_heads = 4
  config.model.resnet.layers = (1, 1, 1, 1)
  config.model.resnet.widths = (2, 2, 4, 4)
  config.model.vit.update(patch_size=8, hidden_size=8, mlp_dim=8, num_layers=1, num_heads=2)
  return config


def build(fusion=True, backbone="resnet50"):
  config = tiny_config(fusion, backbone)
  model = medfinder.build_model(config.model, config.text, TINY_BERT,
                                losses.learnable_scalars(config.loss))
  return model, medfinder.initialize(model, jax.random.key(0), IMAGE, TOKENS)


@pytest.fixture(scope="module")
def fused():
  return build(fusion=True)


@pytest.fixture(scope="module")
def unfused(fused):
  """Same weights without the fusion module (init is slow to compile on CPU: reuse it)."""
  model, variables = fused
  params = {k: v for k, v in variables["params"].items() if k != "fusion"}
  return model.clone(use_fusion=False), {**variables, "params": params}


def batch(batch_size=3):
  keys = jax.random.split(jax.random.key(7), 3)
  view_a = jax.random.normal(keys[0], (batch_size, *IMAGE, 1))
  view_b = jax.random.normal(keys[1], (batch_size, *IMAGE, 1))
  ids = jax.random.randint(keys[2], (batch_size, TOKENS), 1, 40)
  mask = jnp.ones_like(ids).at[0, 3:].set(0)
  return view_a, view_b, ids, mask


_JITTED = {}


def jitted(model, method):
  """One compiled function per (model, method) for the whole module: XLA compiles slowly on CPU."""
  if (model, method) not in _JITTED:
    if method == "forward":
      fn = lambda v, *a: model.apply(v, *a, train=False)
    else:
      fn = lambda v, *a: model.apply(v, *a, method=getattr(model, method))
    _JITTED[model, method] = jax.jit(fn)
  return _JITTED[model, method]


def forward(model, variables, *args):
  return jitted(model, "forward")(variables, *args)


def encode_image(model, variables, volume):
  return jitted(model, "encode_image")(variables, volume)


def test_param_groups(fused, unfused):
  assert set(fused[1]["params"]) == {"image_encoder", "image_projection", "text_encoder",
                                     "text_projection", "fusion", "logit_scale"}
  np.testing.assert_allclose(fused[1]["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6)
  assert set(fused[1]) == {"params", "batch_stats"}
  assert "fusion" not in unfused[1]["params"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(fused[1]))


def test_two_view_forward_returns_what_the_losses_need(fused):
  model, variables = fused
  out = forward(model, variables, *batch())
  assert set(out) == {"image_a", "image_b", "image", "text", "logit_scale"}
  assert out["logit_scale"] == variables["params"]["logit_scale"]
  assert all(out[k].shape == (3, 16) and out[k].dtype == jnp.float32
             for k in ("image_a", "image_b", "image", "text"))


def test_swapping_the_views_swaps_per_view_embeddings_and_keeps_the_fused_one(fused):
  model, variables = fused
  view_a, view_b, ids, mask = batch()
  out = forward(model, variables, view_a, view_b, ids, mask)
  swapped = forward(model, variables, view_b, view_a, ids, mask)
  np.testing.assert_allclose(swapped["image_a"], out["image_b"], atol=1e-6)
  np.testing.assert_allclose(swapped["image_b"], out["image_a"], atol=1e-6)
  np.testing.assert_allclose(swapped["image"], out["image"], atol=1e-6)


def test_fused_embedding_is_the_mean_of_both_cross_attentions(fused):
  model, variables = fused
  view_a, view_b, ids, mask = batch()
  fusion_module = fusion.CrossAttentionFusion(num_heads=4)

  def by_hand(v):
    def tokens(x):
      _, out = model.image_encoder.apply({"params": v["params"]["image_encoder"],
                                          "batch_stats": v["batch_stats"]["image_encoder"]}, x)
      return jnp.asarray(out["tokens"]) @ v["params"]["image_projection"]["kernel"] + \
          v["params"]["image_projection"]["bias"]
    ta, tb = tokens(view_a), tokens(view_b)
    fuse = lambda q, c: fusion_module.apply({"params": v["params"]["fusion"]}, q, c)[0]
    return 0.5 * (fuse(ta, tb) + fuse(tb, ta))

  expected = jax.jit(by_hand)(variables)
  np.testing.assert_allclose(forward(model, variables, view_a, view_b, ids, mask)["image"],
                             expected, atol=1e-5)


def test_per_view_embedding_is_the_projected_pooled_feature(unfused):
  model, variables = unfused
  view_a, view_b, ids, mask = batch()
  out = forward(model, variables, view_a, view_b, ids, mask)
  np.testing.assert_allclose(out["image_a"], encode_image(model, variables, view_a), atol=1e-5)
  np.testing.assert_allclose(out["image_b"], encode_image(model, variables, view_b), atol=1e-5)
  np.testing.assert_allclose(out["image"], out["image_a"])  # no fusion: the first view


def test_evaluation_view_attends_to_itself(fused):
  model, variables = fused
  view_a, _, ids, mask = batch()
  single = forward(model, variables, view_a, None, ids, mask)
  assert set(single) == {"image_a", "image", "text", "logit_scale"}
  np.testing.assert_allclose(encode_image(model, variables, view_a), single["image"], atol=1e-6)
  assert not np.allclose(single["image"], single["image_a"], atol=1e-4)


def test_encode_text_is_projected_cls_state(fused):
  model, variables = fused
  _, _, ids, mask = batch()
  text = jax.jit(lambda v: model.apply(v, ids, mask, method=model.encode_text))(variables)
  hidden, _ = bert.BertModel(TINY_BERT).apply({"params": variables["params"]["text_encoder"]},
                                              ids, mask)
  projection = variables["params"]["text_projection"]
  np.testing.assert_allclose(text, hidden[:, 0] @ projection["kernel"] + projection["bias"],
                             atol=1e-5)


def test_mean_pooling_averages_the_unmasked_token_states(fused):
  model, variables = fused
  _, _, ids, mask = batch()  # row 0 has 3 of 6 tokens
  mean_model = model.clone(text_pooling="mean")
  text = jax.jit(lambda v: mean_model.apply(v, ids, mask, method=mean_model.encode_text))(variables)
  hidden, _ = bert.BertModel(TINY_BERT).apply({"params": variables["params"]["text_encoder"]},
                                              ids, mask)
  m = np.asarray(mask, np.float32)[..., None]
  pooled = (np.asarray(hidden) * m).sum(1) / m.sum(1)
  projection = variables["params"]["text_projection"]
  np.testing.assert_allclose(text, pooled @ projection["kernel"] + projection["bias"], atol=1e-5)


def test_vit_backbone_builds_and_runs():
  model, variables = build(fusion=True, backbone="vit")
  assert "batch_stats" not in variables
  # 16x16x8 volume with 8^3 patches: 2*2*1 = 4 patches
  assert variables["params"]["image_encoder"]["position_embeddings"].shape == (1, 4, 8)
  out = forward(model, variables, *batch(2))
  assert out["image"].shape == (2, 16)


def test_bad_config_values_are_named():
  config = tiny_config()
  config.model.backbone = "resnet18"
  with pytest.raises(ValueError, match="model.backbone"):
    medfinder.build_model(config.model, config.text, TINY_BERT)
  config = tiny_config()
  config.model.dtype = "fp8"
  with pytest.raises(ValueError, match="model.dtype"):
    medfinder.build_model(config.model, config.text, TINY_BERT)
  with pytest.raises(ValueError, match="text.pooling"):
    medfinder.pool_text(jnp.zeros((1, 2, 3)), jnp.ones((1, 2)), "max")
