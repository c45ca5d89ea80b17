"""NIfTI CT volume -> fixed-shape record volume (modes `ct` and `released`).

`ct` (default): scale with scl_slope/scl_inter, closest canonical RAS, crop to the body (voxels
above `body_threshold_hu`), resample to `spacing` mm (or plain resize when spacing is empty), HU
window -> [0, 1], pad to `shape`, quantize. When the body at the target spacing is larger than
`shape` it is shrunk, preserving its aspect ratio, until it fits (never cropped: findings at the
lung apices or bases must survive); `volume_spacing` then records the coarser spacing.

For speed the cheap steps run first: the body box is found on the stored integers, the resample
works on the cropped stored values (scaling is affine, so it commutes with interpolation) and the
HU scaling and window run on the small resampled array.

`released`: the released code's eval transform (ScaleIntensity min-max, CropForeground > 0,
symmetric SpatialPad to at least `shape`, Resize "area"), on the raw voxel order.

The parameters of both are a data_prep.schema.PreprocessParams, recorded in the dataset metadata.
"""

import dataclasses
import gzip
import os
import zlib

import nibabel as nib
import numpy as np

from data_prep import resample
from medfinder_jax import errors


class BadVolume(errors.UserError):
  """A volume that cannot be converted; str() is the reason shown in the conversion report."""


@dataclasses.dataclass
class SourceVolume:
  """A loaded NIfTI volume: stored values plus what maps them to HU and to patient space."""
  raw: np.ndarray        # stored values, file voxel order (X, Y, Z); HU = raw * slope + inter
  slope: float
  inter: float
  affine: np.ndarray     # 4x4 voxel -> RAS+ mm

  @property
  def spacing(self):
    """Voxel size in mm along the file's axes."""
    return nib.affines.voxel_sizes(self.affine)

  @property
  def orientation(self):
    """Axis codes of the file's axes, e.g. "LPS" (index increases towards L, P, S)."""
    return "".join(nib.aff2axcodes(self.affine))


def load_source(path):
  """Reads a NIfTI file (.nii / .nii.gz) without scaling; BadVolume says why it cannot be used."""
  try:
    image = nib.load(path)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise BadVolume(f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    raw = np.asanyarray(image.dataobj.get_unscaled())
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    affine = np.asarray(image.affine, dtype=np.float64)
  except BadVolume:
    raise
  except FileNotFoundError:
    raise BadVolume("file not found") from None
  except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error) as err:
    raise BadVolume(diagnose_unreadable(path, err)) from None
  except (ValueError, MemoryError) as err:
    raise BadVolume(f"cannot read the file: {type(err).__name__}: {_first_line(err)}") from None
  return _checked_source(raw, slope, inter, affine)


def diagnose_unreadable(path, err):
  """Why nibabel could not read `path`: gzip problems first, then the NIfTI header."""
  try:
    with open(path, "rb") as file:
      magic = file.read(2)
    if path.endswith(".gz"):
      if magic != b"\x1f\x8b":
        return "not a valid gzip file (a .nii.gz must be gzip-compressed)"
      with gzip.open(path, "rb") as stream:
        head = stream.read(348)
        while stream.read(1 << 24):
          pass
    else:
      with open(path, "rb") as file:
        head = file.read(348)
  except (EOFError, zlib.error, gzip.BadGzipFile) as gz_err:
    return f"file is truncated or corrupt (gzip: {_first_line(gz_err)})"
  except OSError as os_err:
    return f"cannot read the file: {_first_line(os_err)}"
  size = int.from_bytes(head[:4], "little") if len(head) >= 4 else 0
  if size not in (348, 540) and int.from_bytes(head[:4], "big") not in (348, 540):
    return "not a NIfTI file (no NIfTI header at the start of the data)"
  return f"file is truncated or corrupt ({_first_line(err)})"


def _first_line(err):
  text = str(err).strip().splitlines()
  return text[0] if text else type(err).__name__


def _checked_source(raw, slope, inter, affine):
  """Validates shape, voxel type, finiteness and geometry of a loaded volume."""
  while raw.ndim > 3 and raw.shape[-1] == 1:    # (X, Y, Z, 1) exports are 3D volumes
    raw = raw[..., 0]
  if raw.ndim != 3 or min(raw.shape) < 2:
    raise BadVolume(f"expected a 3D volume, found a {raw.ndim}D array of shape {raw.shape}")
  if raw.dtype.kind not in "iuf":
    raise BadVolume(f"unsupported voxel type {raw.dtype} (expected integer or float voxels)")
  if not (np.isfinite(slope) and np.isfinite(inter) and slope != 0):
    raise BadVolume(f"invalid intensity scaling scl_slope={slope}, scl_inter={inter}")
  if raw.dtype.kind == "f":
    finite = np.isfinite(raw)
    if not finite.all():
      n_nan = int(np.isnan(raw).sum())
      n_inf = int(raw.size - finite.sum()) - n_nan
      raise BadVolume(f"volume has {n_nan} NaN and {n_inf} infinite voxels")
  if not np.all(np.isfinite(affine)) or np.min(nib.affines.voxel_sizes(affine)) <= 0:
    raise BadVolume(f"invalid affine (voxel-to-mm matrix) {affine.tolist()}")
  return SourceVolume(raw=raw, slope=slope, inter=inter, affine=affine)


def volume_from_file(path, params):
  """A NIfTI file -> its record volume (params.shape, params.volume_dtype), exactly as conversion
  makes it. BadVolume naming the file when it cannot be used (missing, not a 3D CT volume)."""
  if not os.path.isfile(path):
    raise BadVolume(f"{path}: no such volume file")
  try:
    return preprocess(load_source(path), params)[0]
  except BadVolume as err:
    raise BadVolume(f"{path}: {err}") from None


def preprocess(source, params):
  """(volume, volume_spacing): the record volume (params.shape, params.volume_dtype), X,Y,Z."""
  if params.mode == "ct":
    return preprocess_ct(source, params)
  return preprocess_released(source, params)


# --- ct mode ------------------------------------------------------------------------------------

def preprocess_ct(source, params):
  """The default pipeline (module docstring); volume axes are RAS+ canonical X, Y, Z."""
  box = body_box(source, params.body_threshold_hu)
  cropped = source.raw[tuple(slice(lo, hi) for lo, hi in box)]
  ornt = nib.orientations.io_orientation(source.affine)
  canonical = nib.orientations.apply_orientation(cropped, ornt)
  spacing = np.empty(3)
  spacing[ornt[:, 0].astype(int)] = source.spacing
  size = target_size(canonical.shape, spacing, params)
  zyx = np.ascontiguousarray(canonical.transpose(2, 1, 0))   # slowest axis first: cache-friendly
  stored = resample.resize(zyx, size[::-1]).transpose(2, 1, 0)
  hu = stored * np.float32(source.slope) + np.float32(source.inter)
  volume = quantize_hu(hu, params)
  volume_spacing = np.asarray(canonical.shape) * spacing / np.asarray(size)
  return pad_center(volume, params.shape, pad_value(params)), volume_spacing.astype(np.float32)


def body_box(source, threshold_hu):
  """[(lo, hi)] per file axis: the bounding box of voxels above `threshold_hu` (0-based, hi
  exclusive). Planes with fewer than 0.1% foreground voxels (noise, wires) are ignored."""
  raw_threshold = (threshold_hu - source.inter) / source.slope
  mask = source.raw > raw_threshold if source.slope > 0 else source.raw < raw_threshold
  counts_xy = mask.sum(axis=2, dtype=np.int64)
  profiles = (counts_xy.sum(axis=1), counts_xy.sum(axis=0), mask.sum(axis=(0, 1), dtype=np.int64))
  box = []
  for axis, profile in enumerate(profiles):
    plane = mask.size // mask.shape[axis]
    inside = np.flatnonzero(profile > max(1, 1e-3 * plane))
    if inside.size == 0:
      raise BadVolume(f"no body found: no voxel above {threshold_hu:g} HU "
                      f"(blank or non-CT volume?)")
    box.append((int(inside[0]), int(inside[-1]) + 1))
  return box


def target_size(size, spacing, params):
  """Voxel counts (X, Y, Z) of the resampled body: `params.spacing`, shrunk to fit the shape."""
  shape = np.asarray(params.shape)
  if not params.spacing:
    return tuple(int(s) for s in shape)
  natural = np.asarray(size) * spacing / np.asarray(params.spacing)
  shrink = min(1.0, float(np.min(shape / natural)))
  fitted = np.clip(np.round(natural * shrink), 1, shape)
  return tuple(int(s) for s in fitted)


def quantize_hu(hu, params):
  """HU -> stored volume: uint8 round(255 * window-scaled) or int16 round(window-clipped HU)."""
  lo, hi = params.hu_window
  clipped = np.clip(hu, lo, hi)
  if params.volume_dtype == "int16":
    return np.rint(clipped).astype(np.int16)
  unit = (clipped - np.float32(lo)) * np.float32(1.0 / (hi - lo))
  return quantize_unit(unit)


def quantize_unit(unit):
  """[0, 1] float -> uint8 round(255 * u)."""
  return np.rint(unit * np.float32(255.0)).astype(np.uint8)


def pad_value(params):
  """The stored value of air: 0 for uint8, the window's low HU for int16."""
  return int(round(params.hu_window[0])) if params.volume_dtype == "int16" else 0


def pad_center(volume, shape, value):
  """Places `volume` (no larger than `shape`) in the middle of an array of `shape`."""
  if tuple(volume.shape) == tuple(shape):
    return np.ascontiguousarray(volume)
  out = np.full(shape, value, dtype=volume.dtype)
  before = [(s - v) // 2 for s, v in zip(shape, volume.shape)]
  out[tuple(slice(b, b + v) for b, v in zip(before, volume.shape))] = volume
  return out


# --- released mode --------------------------------------------------------------------------------

def preprocess_released(source, params):
  """The released code's transform on the raw voxel order; volume_spacing is the effective mm
  per output voxel (the padded crop stretched to `shape`)."""
  unit, padded_size = released_transform(source.raw, params.shape, source.slope, source.inter)
  volume_spacing = np.asarray(padded_size) * source.spacing / np.asarray(params.shape)
  return quantize_unit(unit), volume_spacing.astype(np.float32)


def released_transform(raw, shape, slope=1.0, inter=0.0):
  """(unit volume, padded size): ScaleIntensity -> CropForeground(> 0) -> SpatialPad -> Resize.

  Min-max scaling is affine, so the crop, pad and "area" resize run on the stored values (padded
  with the stored value of the minimum) and the scaling runs on the small result.
  """
  low_raw, high_raw = (raw.min(), raw.max()) if slope > 0 else (raw.max(), raw.min())
  low, high = float(low_raw) * slope + inter, float(high_raw) * slope + inter
  if not high > low:     # MONAI scales a constant image to zeros
    return np.zeros(shape, np.float32), tuple(int(s) for s in np.maximum(raw.shape, shape))
  mask = raw > low_raw if slope > 0 else raw < low_raw
  box = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
         for axis in range(3)]
  cropped = raw[tuple(slice(b[0], b[-1] + 1) for b in box)]
  padded = _pad_symmetric(cropped, shape, low_raw)
  zyx = np.ascontiguousarray(padded.transpose(2, 1, 0))
  resized = resample.resize(zyx, tuple(shape)[::-1], method="area").transpose(2, 1, 0)
  unit = (resized * np.float32(slope) + np.float32(inter - low)) * np.float32(1.0 / (high - low))
  return np.clip(unit, 0.0, 1.0), padded.shape


def _pad_symmetric(x, shape, value):
  """MONAI SpatialPad(method="symmetric"): pad to at least `shape`, floor(d/2) before."""
  pads = [(max(s - n, 0) // 2, max(s - n, 0) - max(s - n, 0) // 2) for s, n in zip(shape, x.shape)]
  if not any(b or a for b, a in pads):
    return x
  return np.pad(x, pads, constant_values=value)
