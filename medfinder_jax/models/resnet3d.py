"""3D ResNet with bottleneck blocks, equivalent to MONAI `ResNet(block="bottleneck", ...)`.

Channels-last: volumes are (B, X, Y, Z, C). MONAI/PyTorch sees the same volume as
(B, C, X, Y, Z), i.e. its (D, H, W) are our (X, Y, Z); kernels map axis for axis.
Defaults give MONAI's ResNet50 (`layers=(3, 4, 6, 3)`, widths (64, 128, 256, 512), conv1 7^3
stride 1, max-pool 3/2, shortcut type B = 1^3 conv with bias + BatchNorm, no fc).
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

EXPANSION = 4  # bottleneck output channels = 4 * width

# MONAI: kaiming_normal_(mode="fan_out", nonlinearity="relu"); BatchNorm weight 1, bias 0.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_padding(kernel, ndim=3):
  """Symmetric padding k // 2 on each side, as PyTorch's `padding=k // 2` (not XLA 'SAME')."""
  return [(kernel // 2, kernel // 2)] * ndim


class Bottleneck(nn.Module):
  """1^3 conv -> 3^3 conv (carries the stride) -> 1^3 conv (x4 channels), plus shortcut."""
  width: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=jnp.float32, kernel_init=conv_init)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, param_dtype=jnp.float32)
    strides = (self.stride,) * 3
    out_features = self.width * EXPANSION

    y = nn.relu(norm(name="bn1")(conv(self.width, (1, 1, 1), padding="VALID", name="conv1")(x)))
    y = conv(self.width, (3, 3, 3), strides=strides, padding=torch_padding(3), name="conv2")(y)
    y = nn.relu(norm(name="bn2")(y))
    y = norm(name="bn3")(conv(out_features, (1, 1, 1), padding="VALID", name="conv3")(y))

    if self.stride != 1 or x.shape[-1] != out_features:  # MONAI shortcut "B"
      x = conv(out_features, (1, 1, 1), strides=strides, padding="VALID", use_bias=True,
               name="downsample_conv")(x)
      x = norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class ResNetStage(nn.Module):
  """`num_blocks` bottlenecks; the first one carries the stride (MONAI `layerN`)."""
  num_blocks: int
  width: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train=False):
    for i in range(self.num_blocks):
      stride = self.stride if i == 0 else 1
      x = Bottleneck(self.width, stride, dtype=self.dtype, name=f"block{i}")(x, train)
    return x


class ResNet3D(nn.Module):
  """3D ResNet image tower.

  Attributes:
    layers: bottleneck blocks per stage (MONAI `layers`).
    widths: bottleneck width per stage (MONAI `block_inplanes`); stage output = 4 * width.
    conv1_kernel, conv1_stride: first convolution (MONAI `conv1_t_size`, `conv1_t_stride`).
    dtype: compute dtype (params stay float32).
    remat: rematerialize each stage in the backward pass (saves activation memory).
  """
  layers: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  conv1_kernel: int = 7
  conv1_stride: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  @property
  def num_features(self):
    return self.widths[-1] * EXPANSION

  @nn.compact
  def __call__(self, x, train=False):
    """x: (B, X, Y, Z, 1) float volume. Returns (pooled (B, 4*widths[-1]) float32, out dict).

    out: "stem" (after conv1/BN/ReLU/max-pool), "stage1".."stage4" feature maps (B, x, y, z, C),
    "tokens" = last stage flattened to (B, x*y*z, C) in X-major order, "pooled".
    """
    k, s = self.conv1_kernel, self.conv1_stride
    x = nn.Conv(self.widths[0], (k, k, k), strides=(s, s, s), padding=torch_padding(k),
                use_bias=False, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=conv_init,
                name="conv1")(x.astype(self.dtype))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                     param_dtype=jnp.float32, name="bn1")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3, 3), strides=(2, 2, 2), padding=torch_padding(3))
    out = {"stem": x}

    stage = nn.remat(ResNetStage, static_argnums=(2,)) if self.remat else ResNetStage
    for i, (num_blocks, width) in enumerate(zip(self.layers, self.widths)):
      x = stage(num_blocks, width, stride=1 if i == 0 else 2, dtype=self.dtype,
                name=f"layer{i + 1}")(x, train)
      out[f"stage{i + 1}"] = x

    out["tokens"] = x.reshape(x.shape[0], -1, x.shape[-1])
    out["pooled"] = pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
    return pooled, out
