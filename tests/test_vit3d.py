"""ViT3D: MONAI ViT equivalence after weight import, token layout, bf16 and remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_files
from medfinder_jax import convert_weights
from medfinder_jax.models import vit3d

torch = pytest.importorskip("torch")
monai_vit = pytest.importorskip("monai.networks.nets.vit")


def monai_model(img_size, num_layers=12, hidden_size=768, mlp_dim=3072, num_heads=12, patch=16):
  torch.manual_seed(0)
  model = monai_vit.ViT(in_channels=1, img_size=img_size, patch_size=patch,
                        hidden_size=hidden_size, mlp_dim=mlp_dim, num_layers=num_layers,
                        num_heads=num_heads, proj_type="conv", pos_embed_type="learnable",
                        classification=False, spatial_dims=3)
  with torch.no_grad():  # MONAI inits LayerNorms to identity; make them matter
    for module in model.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.1, 0.1)
  return model.eval()


def imported(model, ours, volume):
  return model_files.import_monai(convert_weights.import_monai_vit, model, ours, volume)


def torch_tokens(model, volume):
  """MONAI ViT(classification=False) returns (final normed tokens, per-block states)."""
  return model_files.torch_call(model, volume)[0].numpy()


def check_parity(img_size, **sizes):
  volume = np.random.default_rng(0).normal(size=(2, *img_size, 1)).astype(np.float32)
  model = monai_model(img_size, **sizes)
  ours = vit3d.ViT3D(num_layers=sizes.get("num_layers", 12))
  pooled, out = jax.jit(ours.apply)(imported(model, ours, volume), volume)
  reference = torch_tokens(model, volume)
  assert out["tokens"].shape == reference.shape
  assert np.max(np.abs(np.asarray(out["tokens"]) - reference)) <= 1e-4
  np.testing.assert_allclose(pooled, reference.mean(axis=1), atol=1e-5)


def test_vit_base_matches_monai_on_a_small_volume():
  # 48x32x32 with 16^3 patches: 3x2x2 = 12 tokens, so a wrong patch order would show.
  check_parity((48, 32, 32))


@pytest.mark.slow
def test_vit_base_matches_monai_at_full_size():
  check_parity((224, 224, 96))


def test_patch_tokens_are_numbered_x_major():
  ours = vit3d.ViT3D(patch_size=4, hidden_size=8, mlp_dim=8, num_layers=0, num_heads=2)
  volume = jnp.zeros((1, 8, 8, 8, 1)).at[0, 4:, 0:4, 4:].set(1.0)  # patch (x=1, y=0, z=1)
  variables = jax.jit(ours.init)(jax.random.key(0), volume)
  variables["params"]["position_embeddings"] = jnp.zeros_like(
      variables["params"]["position_embeddings"])
  _, out = jax.jit(ours.apply)(variables, volume)
  stem = np.asarray(out["stem"][0])
  differs = np.abs(stem - stem[0]).sum(axis=1) > 1e-6
  assert np.flatnonzero(differs).tolist() == [1 * 4 + 0 * 2 + 1]


def small_imported(volume, **options):
  """A small ViT3D with MONAI-initialised weights (faster than compiling our init on CPU)."""
  sizes = dict(hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4, patch=8)
  ours = vit3d.ViT3D(patch_size=8, hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
                     **options)
  return ours, imported(monai_model(volume.shape[1:4], **sizes), ours, volume)


def test_bfloat16_compute_stays_close_to_float32():
  volume = np.random.default_rng(1).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
  f32, variables = small_imported(volume)
  reference, _ = jax.jit(f32.apply)(variables, volume)
  low, out = jax.jit(f32.clone(dtype=jnp.bfloat16).apply)(variables, volume)
  assert out["tokens"].dtype == jnp.bfloat16 and low.dtype == jnp.float32
  # Stated tolerance: 5e-2 relative to the largest pooled feature.
  assert np.max(np.abs(np.asarray(low) - reference)) <= 5e-2 * np.max(np.abs(reference))


def test_remat_gives_the_same_gradients():
  volume = np.random.default_rng(1).normal(size=(2, 16, 16, 16, 1)).astype(np.float32)
  plain, variables = small_imported(volume)

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({"params": p}, volume, train=True)[0] ** 2)
    return jax.jit(jax.grad(loss))(variables["params"])

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(plain), grads(plain.clone(remat=True)))
