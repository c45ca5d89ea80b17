"""3D ResNet with bottleneck blocks, equivalent to MONAI `ResNet(block="bottleneck", ...)`.

Channels-last: volumes are (B, X, Y, Z, C). MONAI/PyTorch sees the same volume as
(B, C, X, Y, Z), i.e. its (D, H, W) are our (X, Y, Z); kernels map axis for axis.
Defaults give MONAI's ResNet50 (`layers=(3, 4, 6, 3)`, widths (64, 128, 256, 512), conv1 7^3
stride 1, max-pool 3/2, shortcut type B = 1^3 conv with bias + BatchNorm, no fc).
"""

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

EXPANSION = 4  # bottleneck output channels = 4 * width

# MONAI: kaiming_normal_(mode="fan_out", nonlinearity="relu"); BatchNorm weight 1, bias 0.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


CONV_IMPLS = ("auto", "native", "decomposed")
# Output voxels per example below which the decomposed form uses one im2col matmul instead of
# 2D convolutions (small maps with many channels: ResNet stages 3-4; benchmarks/conv3d.py).
IM2COL_MAX_VOXELS = 128


def torch_padding(kernel, ndim=3):
  """Symmetric padding k // 2 on each side, as PyTorch's `padding=k // 2` (not XLA 'SAME')."""
  return [(kernel // 2, kernel // 2)] * ndim


def resolve_conv_impl(impl):
  """"auto" -> "decomposed" on CPU (XLA:CPU runs 3D convolutions several times slower than 2D
  convolutions and matmuls: benchmarks/conv3d.py), "native" elsewhere (cuDNN / TPU 3D
  convolutions are fast)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.resnet.conv_impl: got {impl!r}, expected one of {CONV_IMPLS}")
  if impl == "auto":
    return "decomposed" if jax.default_backend() == "cpu" else "native"
  return impl


def conv3d(x, kernel, stride, padding, impl):
  """Cubic 3D convolution, channels-last: x (B, X, Y, Z, Cin), kernel (k, k, k, Cin, Cout),
  the same `stride` and symmetric `padding` on every axis (PyTorch semantics).

  impl "native": one XLA 3D convolution. impl "decomposed": the same sum as operations XLA:CPU
  runs fast, chosen by shape (identical up to float rounding): 1^3 kernels as a matmul; small
  output maps as one im2col matmul; otherwise one 2D convolution over (X, Y) whose input
  channels are the k depth-shifted Z slices stacked (kernel reshaped to (k, k, k*Cin, Cout)).
  """
  if impl == "native":
    return jax.lax.conv_general_dilated(
        x, kernel, (stride,) * 3, [(padding, padding)] * 3,
        dimension_numbers=("NXYZC", "XYZIO", "NXYZC"))
  k = kernel.shape[0]
  if k == 1:
    x = x[:, ::stride, ::stride, ::stride] if stride > 1 else x
    return jnp.einsum("bxyzc,cd->bxyzd", x, kernel[0, 0, 0])
  out = [(n + 2 * padding - k) // stride + 1 for n in x.shape[1:4]]
  if out[0] * out[1] * out[2] <= IM2COL_MAX_VOXELS:
    return _conv3d_im2col(x, kernel, stride, padding, out)
  return _conv3d_stacked_slices(x, kernel, stride, padding, out[2])


def _shifted(x, axis, offset, stride, size):
  """x[..., offset : offset + stride * (size - 1) + 1 : stride, ...] along `axis`."""
  return jax.lax.slice_in_dim(x, offset, offset + stride * (size - 1) + 1, stride, axis=axis)


def _conv3d_im2col(x, kernel, stride, padding, out):
  """All k^3 shifted windows concatenated on channels, then one matmul (kernel order x, y, z)."""
  k = kernel.shape[0]
  xp = jnp.pad(x, ((0, 0),) + ((padding, padding),) * 3 + ((0, 0),))
  columns = [_shifted(_shifted(_shifted(xp, 1, dx, stride, out[0]), 2, dy, stride, out[1]),
                      3, dz, stride, out[2])
             for dx in range(k) for dy in range(k) for dz in range(k)]
  return jnp.einsum("bxyzc,cd->bxyzd", jnp.concatenate(columns, axis=-1),
                    kernel.reshape(-1, kernel.shape[-1]))


def _conv3d_stacked_slices(x, kernel, stride, padding, out_depth):
  """One 2D convolution of (B * out_depth) images whose channels are the k shifted Z slices."""
  k, batch, channels = kernel.shape[0], x.shape[0], x.shape[-1]
  xp = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (padding, padding), (0, 0)))
  stacked = jnp.concatenate([_shifted(xp, 3, dz, stride, out_depth) for dz in range(k)], -1)
  images = jnp.moveaxis(stacked, 3, 1).reshape(batch * out_depth, *x.shape[1:3], k * channels)
  y = jax.lax.conv_general_dilated(images, kernel.reshape(k, k, k * channels, -1),
                                   (stride, stride), [(padding, padding)] * 2,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.moveaxis(y.reshape(batch, out_depth, *y.shape[1:]), 1, 3)


class Conv3D(nn.Module):
  """nn.Conv's parameters ("kernel" (k, k, k, Cin, Cout), optional "bias"), cubic kernel,
  PyTorch padding k // 2, computed by `conv3d` with the chosen implementation."""
  features: int
  kernel_size: int
  stride: int = 1
  use_bias: bool = False
  impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", conv_init, (k, k, k, x.shape[-1], self.features), jnp.float32)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = conv3d(x, kernel, self.stride, k // 2, resolve_conv_impl(self.impl))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
          self.dtype)
    return y


class Bottleneck(nn.Module):
  """1^3 conv -> 3^3 conv (carries the stride) -> 1^3 conv (x4 channels), plus shortcut."""
  width: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train=False):
    conv = functools.partial(Conv3D, dtype=self.dtype, impl=self.conv_impl)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)
    out_features = self.width * EXPANSION

    y = nn.relu(norm(name="bn1")(conv(self.width, 1, name="conv1")(x)))
    y = nn.relu(norm(name="bn2")(conv(self.width, 3, self.stride, name="conv2")(y)))
    y = norm(name="bn3")(conv(out_features, 1, name="conv3")(y))

    if self.stride != 1 or x.shape[-1] != out_features:  # MONAI shortcut "B"
      x = conv(out_features, 1, self.stride, use_bias=True, name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


def constrain(x, activation_sharding):
  """x placed by `activation_sharding` (e.g. sharding.SpatialSharding: a volume split over
  devices), or x itself when it is None (no mesh: the model is unchanged)."""
  return x if activation_sharding is None else activation_sharding(x)


class ResNetStage(nn.Module):
  """`num_blocks` bottlenecks; the first one carries the stride (MONAI `layerN`). Each block's
  output keeps `activation_sharding` (a spatial split survives every block boundary)."""
  num_blocks: int
  width: int
  stride: int = 1
  dtype: Any = jnp.float32
  conv_impl: str = "auto"
  activation_sharding: Optional[Callable] = None

  @nn.compact
  def __call__(self, x, train=False):
    for i in range(self.num_blocks):
      stride = self.stride if i == 0 else 1
      x = Bottleneck(self.width, stride, dtype=self.dtype, conv_impl=self.conv_impl,
                     name=f"block{i}")(x, train)
      x = constrain(x, self.activation_sharding)
    return x


class ResNet3D(nn.Module):
  """3D ResNet image tower.

  Attributes:
    layers: bottleneck blocks per stage (MONAI `layers`).
    widths: bottleneck width per stage (MONAI `block_inplanes`); stage output = 4 * width.
    conv1_kernel, conv1_stride: first convolution (MONAI `conv1_t_size`, `conv1_t_stride`).
    dtype: compute dtype (params stay float32).
    remat: rematerialize each stage in the backward pass (saves activation memory).
    conv_impl: "auto" | "native" | "decomposed" (see `conv3d`; same parameters and results).
    activation_sharding: None, or a function placing activations on a mesh
      (sharding.SpatialSharding: the volume's X split over devices); applied to the input, the
      stem and every block and stage output. It changes placement only, never values.
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  conv1_kernel: int = 7
  conv1_stride: int = 1
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "auto"
  activation_sharding: Optional[Callable] = None

  @nn.compact
  def __call__(self, x, train=False):
    """x: (B, X, Y, Z, 1) float volume. Returns (pooled (B, 4*widths[-1]) float32, out dict).

    out: "stem" (after conv1/BN/ReLU/max-pool), "stage1".."stage4" feature maps (B, x, y, z, C),
    "tokens" = last stage flattened to (B, x*y*z, C) in X-major order.
    """
    k, s = self.conv1_kernel, self.conv1_stride
    shard = functools.partial(constrain, activation_sharding=self.activation_sharding)
    x = Conv3D(self.widths[0], k, s, dtype=self.dtype, impl=self.conv_impl,
               name="conv1")(shard(x.astype(self.dtype)))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                     param_dtype=jnp.float32, name="bn1")(shard(x))
    x = shard(nn.relu(x))
    x = shard(nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=torch_padding(3)))
    out = {"stem": x}

    stage = nn.remat(ResNetStage, static_argnums=(2,)) if self.remat else ResNetStage
    for i, (num_blocks, width) in enumerate(zip(self.layers, self.widths)):
      x = stage(num_blocks, width, stride=1 if i == 0 else 2, dtype=self.dtype,
                conv_impl=self.conv_impl, activation_sharding=self.activation_sharding,
                name=f"layer{i + 1}")(x, train)
      x = shard(x)
      out[f"stage{i + 1}"] = x

    out["tokens"] = shard(x.reshape(x.shape[0], -1, x.shape[-1]))
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3)), out
