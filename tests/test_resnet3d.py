"""ResNet3D: MONAI ResNet equivalence after weight import, shapes, dtype and remat options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_files
from medfinder_jax import convert_weights
from medfinder_jax.models import resnet3d

torch = pytest.importorskip("torch")
monai_resnet = pytest.importorskip("monai.networks.nets.resnet")


def monai_model(layers, widths, conv1_stride=1):
  """The released code's image tower: MONAI ResNet, bottleneck, 3D, one channel, fc removed."""
  torch.manual_seed(0)
  model = monai_resnet.ResNet("bottleneck", list(layers), list(widths), spatial_dims=3,
                              n_input_channels=1, conv1_t_stride=conv1_stride, feed_forward=False)
  with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode really uses them
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        module.running_mean.uniform_(-0.1, 0.1)
        module.running_var.uniform_(0.5, 1.5)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.1, 0.1)
  return model.eval()


def imported(model, ours, volume):
  return model_files.import_monai(convert_weights.import_monai_resnet, model, ours, volume)


def torch_forward(model, volume):
  return model_files.torch_call(model, volume).numpy()


def relative_error(ours, reference):
  return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def test_resnet50_matches_monai_in_eval_mode():
  volume = np.random.default_rng(0).normal(size=(2, 32, 32, 16, 1)).astype(np.float32)
  model = monai_model((3, 4, 6, 3), (64, 128, 256, 512))
  ours = resnet3d.ResNet3D()
  variables = imported(model, ours, volume)
  pooled, out = jax.jit(lambda v, x: ours.apply(v, x, train=False))(variables, volume)
  assert pooled.shape == (2, 2048)
  assert relative_error(np.asarray(pooled), torch_forward(model, volume)) <= 1e-4
  # stride-1 conv1, max-pool /2, then stages 2-4 halve: 32x32x16 -> 16x16x8 -> 2x2x1
  assert out["stage4"].shape == (2, 2, 2, 1, 2048)
  assert out["tokens"].shape == (2, 4, 2048)
  np.testing.assert_allclose(np.mean(out["tokens"], axis=1), pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv_impl", ["native", "decomposed"])
def test_tiny_resnet_with_strided_conv1_matches_monai(conv_impl):
  volume = np.random.default_rng(1).normal(size=(1, 17, 12, 9, 1)).astype(np.float32)  # odd sizes
  model = monai_model((1, 2, 1, 1), (4, 4, 8, 8), conv1_stride=2)
  ours = resnet3d.ResNet3D((1, 2, 1, 1), (4, 4, 8, 8), conv1_stride=2, conv_impl=conv_impl)
  pooled, _ = jax.jit(ours.apply)(imported(model, ours, volume), volume)
  assert relative_error(np.asarray(pooled), torch_forward(model, volume)) <= 1e-4


@pytest.mark.parametrize("kernel,stride,size", [(1, 1, (6, 5, 4)), (1, 2, (7, 6, 5)),
                                                (3, 1, (6, 5, 4)), (3, 2, (9, 8, 7)),
                                                (3, 1, (12, 11, 10)), (3, 2, (17, 16, 15)),
                                                (7, 1, (9, 8, 7)), (7, 2, (10, 9, 11)),
                                                (7, 2, (6, 5, 4))])
def test_decomposed_conv_equals_the_native_3d_convolution(kernel, stride, size):
  """Small outputs take the im2col path, larger ones the stacked-slices path (both tested)."""
  rng = np.random.default_rng(kernel * 10 + stride)
  x = jnp.asarray(rng.normal(size=(2, *size, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(kernel, kernel, kernel, 3, 5)), jnp.float32)
  pad = kernel // 2
  native = resnet3d.conv3d(x, w, stride, pad, "native")
  decomposed = resnet3d.conv3d(x, w, stride, pad, "decomposed")
  assert decomposed.shape == native.shape
  np.testing.assert_allclose(decomposed, native, rtol=1e-4, atol=1e-4)
  grad = lambda impl: jax.grad(lambda x, w: jnp.sum(resnet3d.conv3d(x, w, stride, pad, impl) ** 2),
                               argnums=(0, 1))(x, w)
  for a, b in zip(grad("decomposed"), grad("native")):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_auto_conv_impl_decomposes_on_cpu_and_rejects_unknown_names():
  assert resnet3d.resolve_conv_impl("auto") == ("decomposed" if jax.default_backend() == "cpu"
                                                else "native")
  with pytest.raises(ValueError, match="conv_impl"):
    resnet3d.resolve_conv_impl("cudnn")


def tiny_imported(volume, layers=(1, 1, 1, 1), widths=(2, 2, 4, 4), **options):
  """A tiny ResNet3D with MONAI-initialised weights (PyTorch init is fast; XLA compiling our
  random init is slow on CPU)."""
  ours = resnet3d.ResNet3D(layers, widths, **options)
  return ours, imported(monai_model(layers, widths), ours, volume)


def test_tokens_are_the_last_stage_in_x_major_order():
  volume = np.random.default_rng(2).normal(size=(1, 32, 32, 32, 1)).astype(np.float32)
  ours, variables = tiny_imported(volume)
  _, out = jax.jit(ours.apply)(variables, volume)
  stage4 = out["stage4"]
  assert out["tokens"].shape == (1, 8, 16)
  np.testing.assert_array_equal(out["tokens"][0, 1], stage4[0, 0, 0, 1])  # Z varies fastest
  np.testing.assert_array_equal(out["tokens"][0, 4], stage4[0, 1, 0, 0])


def test_training_mode_normalises_with_batch_statistics_and_updates_them():
  volume = np.random.default_rng(1).normal(3.0, 2.0, size=(2, 16, 16, 8, 1)).astype(np.float32)
  ours, variables = tiny_imported(volume)
  train_step = jax.jit(lambda v, x: ours.apply(v, x, train=True, mutable=["batch_stats"]))
  (_, out), updates = train_step(variables, volume)
  stem_stats = updates["batch_stats"]["bn1"]
  # momentum 0.9 as PyTorch's 0.1: new = 0.9 old + 0.1 batch mean
  conv1 = jax.lax.conv_general_dilated(
      volume, variables["params"]["conv1"]["kernel"], (1, 1, 1), [(3, 3)] * 3,
      dimension_numbers=("NHWDC", "HWDIO", "NHWDC"))
  batch_mean = np.mean(np.asarray(conv1), axis=(0, 1, 2, 3))
  np.testing.assert_allclose(stem_stats["mean"],
                             0.9 * variables["batch_stats"]["bn1"]["mean"] + 0.1 * batch_mean,
                             rtol=1e-4, atol=1e-5)
  assert set(updates["batch_stats"]) == set(variables["batch_stats"])


def test_bfloat16_compute_stays_close_to_float32():
  volume = np.random.default_rng(1).normal(size=(2, 16, 16, 8, 1)).astype(np.float32)
  f32, variables = tiny_imported(volume, widths=(4, 4, 8, 8))
  bf16 = f32.clone(dtype=jnp.bfloat16)
  reference, _ = jax.jit(f32.apply)(variables, volume)
  low, out = jax.jit(bf16.apply)(variables, volume)
  assert out["tokens"].dtype == jnp.bfloat16 and low.dtype == jnp.float32
  # Stated tolerance: 5e-2 relative to the largest feature (bf16 keeps 8 mantissa bits).
  assert relative_error(np.asarray(low), np.asarray(reference)) <= 5e-2


def test_params_stay_float32_under_bfloat16_compute():
  bf16 = resnet3d.ResNet3D((1, 1, 1, 1), (2, 2, 4, 4), dtype=jnp.bfloat16)
  shapes = jax.eval_shape(bf16.init, jax.random.key(0), jnp.zeros((1, 16, 16, 8, 1)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


def test_remat_gives_the_same_gradients():
  volume = np.random.default_rng(1).normal(size=(2, 16, 16, 8, 1)).astype(np.float32)
  plain, variables = tiny_imported(volume)
  remat = plain.clone(remat=True)

  def grads(model):
    loss = lambda p: jnp.sum(model.apply({**variables, "params": p}, volume, train=True,
                                         mutable=["batch_stats"])[0][0] ** 2)
    return jax.jit(jax.grad(loss))(variables["params"])

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(plain), grads(remat))
