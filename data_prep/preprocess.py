"""CT source volume -> fixed-shape record volume (modes `ct` and `released`).

`load_source` picks the reader of a study's source: a folder is a DICOM series
(data_prep/dicom.py), a file a NIfTI volume (data_prep/sources.py, which also holds the
SourceVolume, BadVolume and the checks both readers share).

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

import math
import os

import nibabel as nib
import numpy as np

from data_prep import dicom
from data_prep import filesystem
from data_prep import resample
from data_prep import sources

MASK_SLAB = 1 << 24          # voxels per slab of the foreground masks


def load_source(path, max_volume_mib=None):
  """The SourceVolume of `path`: a DICOM series when it is a directory, else a NIfTI file
  (.nii / .nii.gz), without scaling; sources.BadVolume says why it cannot be used."""
  if filesystem.isdir(path):
    return dicom.load_series(path, max_volume_mib)
  return sources.load_nifti(path, max_volume_mib)


def volume_from_file(path, params, max_volume_mib=None):
  """A NIfTI file -> its record volume (params.shape, params.volume_dtype), exactly as conversion
  makes it. sources.BadVolume naming the file when it cannot be used (missing, not a 3D CT
  volume, or declaring more than `max_volume_mib` of voxels: config data.max_volume_mib)."""
  if not os.path.isfile(path):
    raise sources.BadVolume(f"{path}: no such volume file")
  try:
    return preprocess(load_source(path, max_volume_mib), params)[0]
  except sources.BadVolume as err:
    raise sources.BadVolume(f"{path}: {err}") from None


def preprocess(source, params):
  """(volume, volume_spacing): the record volume (params.shape, params.volume_dtype), X,Y,Z."""
  if params.mode == "ct":
    return preprocess_ct(source, params)
  return preprocess_released(source, params)


# --- ct mode ------------------------------------------------------------------------------------

def preprocess_ct(source, params):
  """The default pipeline (module docstring); volume axes are RAS+ canonical X, Y, Z. With
  params.body_crop False the whole field of view is kept; with params.fit "crop" a volume
  larger than the shape is centre-cropped at the target spacing instead of shrunk (CT-CLIP)."""
  box = (body_box(source, params.body_threshold_hu) if params.body_crop
         else [(0, n) for n in source.raw.shape])
  cropped = source.raw[tuple(slice(lo, hi) for lo, hi in box)]
  ornt = nib.orientations.io_orientation(source.affine)
  canonical = nib.orientations.apply_orientation(cropped, ornt)
  spacing = np.empty(3)
  spacing[ornt[:, 0].astype(int)] = source.spacing
  size = target_size(canonical.shape, spacing, params)
  zyx = canonical.transpose(2, 1, 0)   # a view (slowest axis first); a copy cost 1x the crop
  stored = resample.resize(zyx, size[::-1]).transpose(2, 1, 0)
  stored = crop_center(stored, params.shape)
  hu = stored * np.float32(source.slope) + np.float32(source.inter)
  volume = quantize_hu(hu, params)
  volume_spacing = np.asarray(canonical.shape) * spacing / np.asarray(size)
  return pad_center(volume, params.shape, pad_value(params)), volume_spacing.astype(np.float32)


def crop_center(volume, shape):
  """The middle `shape` of `volume` along every axis where it is larger (a view)."""
  starts = [max(v - s, 0) // 2 for v, s in zip(volume.shape, shape)]
  return volume[tuple(slice(b, b + min(v, s)) for b, v, s in zip(starts, volume.shape, shape))]


def body_box(source, threshold_hu):
  """[(lo, hi)] per file axis: the bounding box of voxels above `threshold_hu` (0-based, hi
  exclusive). Planes with fewer than 0.1% foreground voxels (noise, wires) are ignored."""
  raw = source.raw
  threshold = stored_threshold(raw.dtype, (threshold_hu - source.inter) / source.slope,
                               source.slope > 0)
  counts_xy = np.zeros(raw.shape[:2], np.int64)
  counts_z = np.zeros(raw.shape[2], np.int64)
  for z, mask in _masks_by_slab(raw, threshold, source.slope > 0):
    # A slab holds at most 255 slices (_masks_by_slab), so uint8 sums cannot overflow; they
    # run several times faster than sums of bools into int64.
    counts_xy += np.add.reduce(mask.view(np.uint8), axis=2, dtype=np.uint8)
    counts_z[z] = [np.count_nonzero(mask[:, :, k]) for k in range(mask.shape[2])]
  profiles = (counts_xy.sum(axis=1), counts_xy.sum(axis=0), counts_z)
  box = []
  for axis, profile in enumerate(profiles):
    plane = raw.size // raw.shape[axis]
    inside = np.flatnonzero(profile > max(1, 1e-3 * plane))
    if inside.size == 0:
      raise sources.BadVolume(f"no body found: no voxel above {threshold_hu:g} HU "
                              f"(blank or non-CT volume?)")
    box.append((int(inside[0]), int(inside[-1]) + 1))
  return box


def stored_threshold(dtype, threshold, above):
  """`threshold` (a float in stored units) as a value of the stored `dtype` that selects the
  same voxels (raw > it, or raw < it when not `above`): for integers floor (ceil) of it when
  that fits the type, so the comparison runs on the integers (twice as fast as comparing them
  as float64); otherwise the float itself."""
  if not np.issubdtype(dtype, np.integer) or not math.isfinite(threshold):
    return threshold
  whole = math.floor(threshold) if above else math.ceil(threshold)
  info = np.iinfo(dtype)
  return dtype.type(whole) if info.min <= whole <= info.max else threshold


def _masks_by_slab(raw, threshold, above):
  """(z slice, raw[:, :, z] > threshold (or <)) over slabs of about MASK_SLAB voxels and at most
  255 slices: a mask of the whole volume would cost another half of an int16 volume."""
  step = max(1, min(255, MASK_SLAB // (raw.shape[0] * raw.shape[1])))
  for start in range(0, raw.shape[2], step):
    z = slice(start, start + step)
    yield z, raw[:, :, z] > threshold if above else raw[:, :, z] < threshold


def target_size(size, spacing, params):
  """Voxel counts (X, Y, Z) of the resampled body: `params.spacing`, shrunk to fit the shape."""
  shape = np.asarray(params.shape)
  if not params.spacing:
    return tuple(int(s) for s in shape)
  natural = np.asarray(size) * spacing / np.asarray(params.spacing)
  if params.fit == "crop":
    return tuple(int(s) for s in np.maximum(np.round(natural), 1))
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
  with the stored value of the minimum) and the scaling runs on the small result. A constant
  volume is BadVolume: MONAI scales it to all zeros, a record that carries nothing.
  """
  low_raw, high_raw = (raw.min(), raw.max()) if slope > 0 else (raw.max(), raw.min())
  low, high = float(low_raw) * slope + inter, float(high_raw) * slope + inter
  if not high > low:
    raise sources.BadVolume(f"constant volume (every voxel = {low:g}): nothing to scale (the "
                            f"released preprocessing maps min..max to 0..1)")
  if (high - low) * sources.MAX_INTENSITY < 1:     # 1 / (high - low) would overflow float32
    raise sources.BadVolume(f"intensity range {low:g}..{high:g} is too narrow to scale to 0..1")
  box = _foreground_box(raw, low_raw, slope)
  cropped = raw[tuple(slice(lo, hi) for lo, hi in box)]
  zyx = _padded_zyx(cropped, shape, low_raw)
  resized = resample.resize(zyx, tuple(shape)[::-1], method="area").transpose(2, 1, 0)
  unit = (resized * np.float32(slope) + np.float32(inter - low)) * np.float32(1.0 / (high - low))
  return np.clip(unit, 0.0, 1.0), zyx.shape[::-1]


def _foreground_box(raw, low_raw, slope):
  """[(lo, hi)] per axis of the voxels above the minimum (below it for a negative slope)."""
  any_x, any_y = np.zeros(raw.shape[0], bool), np.zeros(raw.shape[1], bool)
  any_z = np.zeros(raw.shape[2], bool)
  for z, mask in _masks_by_slab(raw, low_raw, slope > 0):
    any_x |= mask.any(axis=(1, 2))
    any_y |= mask.any(axis=(0, 2))
    any_z[z] = mask.any(axis=(0, 1))
  box = []
  for profile in (any_x, any_y, any_z):
    inside = np.flatnonzero(profile)
    box.append((int(inside[0]), int(inside[-1]) + 1))
  return box


def _padded_zyx(x, shape, value):
  """MONAI SpatialPad(method="symmetric") of `x` (X, Y, Z) to at least `shape` (floor(d/2)
  before), as a (Z, Y, X) array: a view when nothing is padded, else one copy."""
  pads = [(max(s - n, 0) // 2, max(s - n, 0) - max(s - n, 0) // 2) for s, n in zip(shape, x.shape)]
  size = tuple(n + b + a for n, (b, a) in zip(x.shape, pads))
  if not any(b or a for b, a in pads):
    return x.transpose(2, 1, 0)
  out = np.full(size[::-1], value, dtype=x.dtype)
  out[tuple(slice(b, b + n) for n, (b, _) in zip(x.shape, pads))[::-1]] = x.transpose(2, 1, 0)
  return out
