"""A folder of DICOM files -> one CT series as a SourceVolume (data_prep/sources.py), as the
NIfTI reader gives one.

Hospitals export DICOM: one file per slice, in a folder per study (or per series). The folder
is read in two passes: the headers of every file (pixel data deferred), then the pixels of the
chosen series only, decoded straight into the volume.

- Series: the files are grouped by SeriesInstanceUID; a folder holding several series uses the
  CT series with the most slices, then the thinnest slices, then the smallest UID
  (`choose_series`), and its SeriesInstanceUID is recorded.
- Geometry: ImageOrientationPatient gives the row and column directions; slices are ordered by
  their position along the slice normal (ImagePositionPatient . normal), never by file name or
  InstanceNumber. Spacing: PixelSpacing in-plane, the slice positions across. The affine maps
  voxel (column, row, slice) to RAS+ mm (DICOM's LPS with x and y negated), so
  data_prep/preprocess.py treats the series exactly as the NIfTI file of the same scan.
- HU: RescaleSlope / RescaleIntercept (the same for every slice, as in practice; slices that
  differ are scaled to HU one by one).
- Skipped, with the reason: a non-CT modality, a pixel encoding with no available decoder,
  slices that are not parallel, uneven slice spacing (a missing slice), more voxels than
  data.max_volume_mib (checked from the headers before any pixel is decoded).

Privacy: nothing from the headers but geometry, pixels, scaling, modality and the series UID is
read into the result, and no message quotes a header value that could identify a patient.
"""

import dataclasses
import math
import sys

import numpy as np
import pydicom
import pydicom.errors
import pydicom.pixels

from data_prep import filesystem
from data_prep import sources

ORIENTATION_TOL = 1e-3        # |difference| of direction cosines: slices still parallel
SPACING_TOL = 0.01            # relative spread of slice gaps before a slice counts as missing
DEFER = "1 KB"                # the header pass leaves larger values (pixel data) on disk


class SeriesProblem(sources.BadVolume):
  """A DICOM folder that gives no usable CT series; str() is the skip reason."""


@dataclasses.dataclass
class Slice:
  """The header of one DICOM file, as far as the volume needs it."""
  path: str
  series_uid: str
  modality: str
  position: np.ndarray        # ImagePositionPatient (LPS mm)
  orientation: np.ndarray     # ImageOrientationPatient (6 direction cosines)
  pixel_spacing: tuple        # (between rows, between columns) in mm
  rows: int
  columns: int
  bits: int
  signed: bool
  slope: float
  inter: float
  transfer_syntax: str
  native_offset: int = -1     # file offset of uncompressed pixels that can be read as they are


def read_headers(folder):
  """(slices, ignored): the DICOM image headers of the regular files in `folder` (sorted by
  name, for determinism only), and how many files are not DICOM images. The folder may be on
  any file system data_prep/filesystem.py reads (each file is read from a file object)."""
  slices, ignored = [], 0
  for name, _ in filesystem.files_in(folder):
    header = _read_header(filesystem.join(folder, name))
    if header is None:
      ignored += 1
    else:
      slices.append(header)
  return slices, ignored


def _read_header(path):
  try:
    with filesystem.open_read(path) as file:
      ds = pydicom.dcmread(file, defer_size=DEFER)
  except (pydicom.errors.InvalidDicomError, EOFError, OSError, ValueError, KeyError):
    return None
  if "PixelData" not in ds or "ImagePositionPatient" not in ds:
    return None
  try:
    slice_ = Slice(
        path=path, series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")).upper(),
        position=np.asarray([float(v) for v in ds.ImagePositionPatient], np.float64),
        orientation=np.asarray([float(v) for v in ds.ImageOrientationPatient], np.float64),
        pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
        rows=int(ds.Rows), columns=int(ds.Columns), bits=int(ds.BitsAllocated),
        signed=int(ds.get("PixelRepresentation", 0)) == 1,
        slope=float(ds.get("RescaleSlope", 1.0)), inter=float(ds.get("RescaleIntercept", 0.0)),
        transfer_syntax=str(ds.file_meta.get("TransferSyntaxUID", "")))
    slice_.native_offset = _native_offset(ds, slice_)
    return slice_
  except (AttributeError, ValueError, TypeError, KeyError):
    return None


NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")   # implicit / explicit VR LE


def _native_offset(ds, item):
  """Where the pixels start in the file when they are exactly Rows x Columns little-endian
  samples that need no unpacking (all bits stored, one sample per pixel), else -1. Such
  pixels are read straight into the volume: decoding them through pydicom parses every file a
  second time and copies each slice twice."""
  element = ds.get_item("PixelData", keep_deferred=True)
  value_tell = getattr(element, "value_tell", None)
  if (item.transfer_syntax not in NATIVE_SYNTAXES or value_tell is None
      or getattr(element, "value", b"") is not None
      or int(ds.get("BitsStored", 0)) != item.bits or item.bits not in (8, 16, 32)
      or int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1
      or int(element.length) != item.rows * item.columns * item.bits // 8):
    return -1
  return int(value_tell)


def choose_series(slices):
  """(uid, slices of it): the CT series with the most slices, then the thinnest, then the
  smallest UID. SeriesProblem when there is no CT series."""
  series = {}
  for item in slices:
    series.setdefault(item.series_uid, []).append(item)
  ct = {uid: members for uid, members in series.items()
        if {m.modality for m in members} == {"CT"}}
  if not ct:
    modalities = sorted({m.modality or "none" for m in slices})
    raise SeriesProblem(f"no CT series: the DICOM files are of modality {', '.join(modalities)} "
                        f"(only CT is converted)")
  def rank(uid):
    return (-len(ct[uid]), _median_gap(ct[uid]), uid)
  uid = min(ct, key=rank)
  return uid, ct[uid]


def _median_gap(members):
  if len(members) < 2:
    return math.inf
  normal = _normal(members[0].orientation)
  positions = np.sort([m.position @ normal for m in members])
  return float(np.median(np.diff(positions)))


def _normal(orientation):
  return np.cross(orientation[:3], orientation[3:])


def order_slices(members):
  """(slices ordered along the normal, their positions along it); SeriesProblem for slices
  that are not parallel, share a position, or leave a gap (a missing slice)."""
  first = members[0]
  for item in members:
    if np.max(np.abs(item.orientation - first.orientation)) > ORIENTATION_TOL:
      raise SeriesProblem("non-parallel slices: ImageOrientationPatient differs between slices "
                          "of the series (a localizer or a tilted reconstruction mixed in?)")
    if (item.rows, item.columns, item.bits) != (first.rows, first.columns, first.bits):
      raise SeriesProblem("slices of different sizes in one series (Rows, Columns or "
                          "BitsAllocated differ)")
  if len(members) < 2:
    raise SeriesProblem("a single slice: expected a 3D series of at least 2 slices")
  normal = _normal(first.orientation)
  positions = np.asarray([m.position @ normal for m in members])
  order = np.argsort(positions, kind="stable")
  positions = positions[order]
  gaps = np.diff(positions)
  if np.min(gaps) <= 1e-6:
    raise SeriesProblem("two slices at the same position (duplicated files, or several "
                        "acquisitions in one series)")
  median = float(np.median(gaps))
  if (np.max(gaps) - np.min(gaps)) > SPACING_TOL * median:
    worst = int(np.argmax(np.abs(gaps - median)))
    raise SeriesProblem(
        f"uneven slice spacing (a missing slice?): gaps from {np.min(gaps):.3g} to "
        f"{np.max(gaps):.3g} mm, median {median:.3g} mm, the largest deviation after slice "
        f"{worst + 1} of {len(members)}")
  # Off-normal drift of positions means the slices are sheared, not stacked along the normal.
  lateral = [(m.position - members[order[0]].position) for m in members]
  off = max(float(np.linalg.norm(v - (v @ normal) * normal)) for v in lateral)
  if off > max(0.05, 0.1 * median):
    raise SeriesProblem(f"slices are not stacked along their normal (positions drift {off:.3g} mm "
                        f"sideways: a tilted gantry); not supported")
  return [members[i] for i in order], positions


def series_affine(ordered):
  """4x4 voxel (column, row, slice) -> RAS+ mm of the ordered slices."""
  first, last = ordered[0], ordered[-1]
  row_dir, col_dir = first.orientation[:3], first.orientation[3:]
  between_rows, between_columns = first.pixel_spacing
  lps = np.eye(4)
  lps[:3, 0] = row_dir * between_columns      # column index i moves along the row direction
  lps[:3, 1] = col_dir * between_rows
  lps[:3, 2] = (last.position - first.position) / (len(ordered) - 1)
  lps[:3, 3] = first.position
  return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def check_decoder(transfer_syntax):
  """SeriesProblem when no installed plugin decodes this transfer syntax."""
  try:
    decoder = pydicom.pixels.get_decoder(transfer_syntax)
  except (NotImplementedError, ValueError, KeyError):
    decoder = None
  if decoder is None or not decoder.is_available:
    name = getattr(pydicom.uid.UID(transfer_syntax), "name", transfer_syntax)
    raise SeriesProblem(f"pixel encoding {name} ({transfer_syntax}) has no available decoder "
                        f"(install a pydicom decoder plugin such as pylibjpeg or gdcm)")


def check_size(ordered, max_volume_mib):
  first = ordered[0]
  mib = first.rows * first.columns * len(ordered) * (first.bits // 8) / sources.MIB
  if max_volume_mib is not None and mib > max_volume_mib:
    raise sources.VolumeTooLarge(
        f"declares {first.columns}x{first.rows}x{len(ordered)} {first.bits}-bit voxels "
        f"({mib:.0f} MiB), over data.max_volume_mib={max_volume_mib:g}; raise "
        f"--config.data.max_volume_mib to convert it")


def read_pixels(ordered):
  """(raw (X=columns, Y=rows, Z=slices), slope, inter): the pixels decoded into one array
  (C order (Z, Y, X), viewed as X, Y, Z as the NIfTI reader gives). Slices with their own
  rescale values are scaled to float32 HU here (slope 1, intercept 0)."""
  first = ordered[0]
  scales = {(s.slope, s.inter) for s in ordered}
  uniform = len(scales) == 1
  dtype = np.dtype(("i" if first.signed else "u") + str(first.bits // 8)) if uniform else np.float32
  out = np.empty((len(ordered), first.rows, first.columns), dtype)
  for k, item in enumerate(ordered):
    if uniform and item.native_offset >= 0:
      _read_native(item, out[k])
      continue
    with filesystem.open_read(item.path) as file:
      pixels = pydicom.dcmread(file).pixel_array
    if pixels.shape != (first.rows, first.columns):
      raise SeriesProblem(f"slice {k + 1} holds {pixels.shape} pixels, not one frame of "
                          f"{first.rows}x{first.columns}")
    out[k] = pixels if uniform else pixels * np.float32(item.slope) + np.float32(item.inter)
  slope, inter = (first.slope, first.inter) if uniform else (1.0, 0.0)
  return out.transpose(2, 1, 0), slope, inter


def _read_native(item, target):
  """Reads an uncompressed little-endian slice straight into `target` (Rows x Columns)."""
  view = memoryview(target.reshape(-1).view(np.uint8))
  with filesystem.open_read(item.path) as file:
    file.seek(item.native_offset)
    if file.readinto(view) != view.nbytes:
      raise SeriesProblem("a DICOM file ends inside its pixel data (truncated)")
  if sys.byteorder == "big":
    target.byteswap(inplace=True)


def load_series(folder, max_volume_mib=None):
  """The SourceVolume of the CT series in `folder` (module docstring), or BadVolume."""
  try:
    slices, ignored = read_headers(folder)
  except OSError as err:
    if err.errno in sources.TRANSIENT_ERRNOS:
      raise
    raise SeriesProblem(f"cannot list the DICOM folder: {err.strerror or err}") from None
  if not slices:
    raise SeriesProblem(f"no DICOM image files in the folder ({ignored} other files)")
  uid, members = choose_series(slices)
  ordered, _ = order_slices(members)
  check_size(ordered, max_volume_mib)
  check_decoder(ordered[0].transfer_syntax)
  try:
    raw, slope, inter = read_pixels(ordered)
  except (ValueError, AttributeError, RuntimeError, pydicom.errors.InvalidDicomError,
          EOFError) as err:
    raise SeriesProblem(f"cannot decode the pixel data: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
  return sources.checked_source(raw, slope, inter, series_affine(ordered), series_uid=uid,
                                hu_source="dicom rescale")
