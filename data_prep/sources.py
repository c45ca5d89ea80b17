"""Source volumes: a loaded CT (a NIfTI file or a DICOM series) with the checks every reader
shares, and the NIfTI reader.

A SourceVolume is the stored values plus what maps them to HU and to patient space, whoever
read it: `load_nifti` here, data_prep/dicom.py for a DICOM folder, `with_metadata` for a
corpus's metadata (CT-RATE) that overrides a header. `checked_source` is the one gate each of
them passes, so the same problem gives the same BadVolume reason in every format;
data_prep/preprocess.py picks the reader (`load_source`) and makes the record volume.
"""

import dataclasses
import errno
import gzip
import io
import math
import zlib

import nibabel as nib
import numpy as np

from data_prep import corpus_base
from data_prep import filesystem
from medfinder_jax import errors


class BadVolume(errors.UserError):
  """A volume that cannot be converted; str() is the reason shown in the conversion report."""


@dataclasses.dataclass
class SourceVolume:
  """A loaded volume (a NIfTI file or a DICOM series): stored values plus what maps them to HU
  and to patient space."""
  raw: np.ndarray        # stored values, file voxel order (X, Y, Z); HU = raw * slope + inter
  slope: float
  inter: float
  affine: np.ndarray     # 4x4 voxel -> RAS+ mm
  series_uid: str = ""   # SeriesInstanceUID of a DICOM series
  hu_source: str = "header"   # where slope/inter came from (the NIfTI header, DICOM tags, ...)

  @property
  def spacing(self):
    """Voxel size in mm along the file's axes."""
    return nib.affines.voxel_sizes(self.affine)

  @property
  def orientation(self):
    """Axis codes of the file's axes, e.g. "LPS" (index increases towards L, P, S)."""
    return "".join(nib.aff2axcodes(self.affine))


MIB = 1 << 20
MAX_HEADER_MIB = 64          # header + extensions before the voxels; real files hold kilobytes
READ_CHUNK = 16 * MIB
MAX_INTENSITY = 1e30         # stored or scaled; float32 arithmetic stays finite below it
VOXEL_MM = (1e-3, 1e3)       # plausible voxel sizes: micro-CT to absurd; outside, a header bug
# Operating-system errors that say nothing about the file: the study is retried, not skipped.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOMEM, errno.EAGAIN, errno.EINTR, errno.ESTALE,
                              errno.ETIMEDOUT, errno.EMFILE, errno.ENFILE})


class VolumeTooLarge(BadVolume):
  """A volume whose header declares more voxel bytes than `max_volume_mib`: a skip that depends
  on a setting (rerunning with a higher data.max_volume_mib converts it)."""


def load_nifti(path, max_volume_mib=None):
  """Reads a NIfTI file (.nii / .nii.gz) without scaling; BadVolume says why it cannot be used.

  The header is checked before any voxel is decoded (its shape and voxel type, its size against
  `max_volume_mib`, a voxel size it does not have), so a 70-byte file declaring 17 GiB costs
  nothing. A remote file (gs://, ...: data_prep/filesystem.py) is fetched into memory and
  decoded from there (`StoredFile`). MemoryError and transient OS errors propagate: they are not
  the file's fault.
  """
  check_regular_file(path)
  try:
    stored = StoredFile(path)
  except FileNotFoundError:
    raise BadVolume("file not found") from None
  try:
    header = read_raw_header(stored)
    if header is not None:
      check_header(header, max_volume_mib)
    image = stored.image(header)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
      raise BadVolume(f"not a NIfTI image (nibabel read it as {type(image).__name__})")
    if header is None:
      check_header(image.header, max_volume_mib)
    raw = read_voxels(stored, image.dataobj)
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    affine = np.asarray(image.affine, dtype=np.float64)
  except (BadVolume, MemoryError):
    raise
  except FileNotFoundError:
    raise BadVolume("file not found") from None
  except OSError as err:
    if err.errno in TRANSIENT_ERRNOS:
      raise
    raise BadVolume(diagnose_unreadable(stored, err)) from None
  except (nib.filebasedimages.ImageFileError, EOFError, zlib.error) as err:
    raise BadVolume(diagnose_unreadable(stored, err)) from None
  except (ValueError, ArithmeticError, LookupError, TypeError,
          nib.spatialimages.HeaderDataError) as err:
    raise BadVolume(f"cannot read the file: {type(err).__name__}: {_first_line(err)}") from None
  return _checked_source(raw, slope, inter, affine)


class StoredFile:
  """A NIfTI file as load_nifti reads it. A local file is opened by name, by nibabel and by the
  chunked voxel read, as always; a remote file's bytes are fetched once into memory (the
  compressed size beside the decoded volume) and every read decodes from them, through file
  objects that nibabel reads as it reads a name."""

  def __init__(self, path):
    self.path = str(path)
    self.data = filesystem.read_bytes(self.path) if filesystem.is_remote(self.path) else None

  def raw(self):
    """The file's bytes as stored (gzip-compressed for a .nii.gz)."""
    return open(self.path, "rb") if self.data is None else io.BytesIO(self.data)

  def stream(self):
    """The NIfTI data, decompressed when the name ends in .gz (as nibabel decides), in a
    context manager."""
    if self.data is None:
      return nib.openers.ImageOpener(self.path, "rb")
    return nib.openers.ImageOpener(self._decoded())

  def _decoded(self):
    raw = io.BytesIO(self.data)
    return gzip.GzipFile(fileobj=raw) if self.path.endswith(".gz") else raw

  def image(self, header):
    """The nibabel image (header, affine, voxel proxy; no voxel is read). Remotely the class is
    the one nib.load picks for a .nii(.gz) name: the NIfTI-1 or -2 header it holds."""
    if self.data is None:
      return nib.load(self.path)
    for klass in (nib.Nifti1Image, nib.Nifti2Image):
      if header is not None and klass.header_class.may_contain_header(header.binaryblock):
        return klass.from_stream(self._decoded())
    raise nib.filebasedimages.ImageFileError(f'Cannot work out file type of "{self.path}"')


def check_regular_file(path):
  """Only regular files are opened: a named pipe would block the reader forever."""
  kind = corpus_base.file_kind(path)
  if kind is not None and kind.startswith("missing"):
    raise BadVolume("file not found")
  if kind is not None:
    raise BadVolume(f"not a regular file ({kind}); only regular files are read")


def read_raw_header(stored):
  """The NIfTI header of the StoredFile as stored, or None when the data does not start with
  one (nib.load then says what the file is). nibabel's loader "fixes" some fields (pixdim 0 ->
  1, negative -> abs) and reads the header extensions before anything can be checked."""
  with stored.stream() as file:
    block = file.read(540)
  for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
    if len(block) >= size and size in (int.from_bytes(block[:4], "little"),
                                       int.from_bytes(block[:4], "big")):
      try:
        return klass(block[:size], check=False)
      except (ValueError, nib.spatialimages.HeaderDataError):
        return None
  return None


def check_header(header, max_volume_mib=None):
  """Shape, voxel type, declared size and voxel size of a NIfTI header, before decoding."""
  shape = check_shape(tuple(int(d) for d in header.get_data_shape()))
  dtype = np.dtype(header.get_data_dtype())
  check_voxel_type(dtype)
  mib = math.prod(shape) * dtype.itemsize / MIB
  if max_volume_mib is not None and mib > max_volume_mib:
    raise VolumeTooLarge(
        f"declares {'x'.join(map(str, shape))} {dtype.newbyteorder('=').name} voxels "
        f"({_mib(mib)} MiB), over data.max_volume_mib={max_volume_mib:g}; raise "
        f"--config.data.max_volume_mib to convert it")
  offset = float(header["vox_offset"])
  if not 0 <= offset <= MAX_HEADER_MIB * MIB:
    raise BadVolume(f"header: vox_offset={offset:g} places the voxels beyond the header and its "
                    f"extensions (expected 0 to {MAX_HEADER_MIB} MiB)")
  qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
  pixdim = np.asarray(header["pixdim"][1:4], np.float32)
  if sform_code <= 0 and not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
    raise BadVolume(
        f"voxel size unknown: header pixdim[1:4]=({', '.join(f'{p:g}' for p in pixdim)}) is not "
        f"positive and there is no sform (qform_code={qform_code}, sform_code={sform_code}) to "
        f"take the geometry from (nibabel would silently read 1 mm); fix the header")


def _mib(mib):
  return f"{mib:.0f}" if mib >= 10 else f"{mib:.2f}"


def read_voxels(stored, proxy):
  """The stored voxels of `proxy` (a nibabel ArrayProxy) of the StoredFile, decompressed in
  chunks straight into the array: nibabel's own read of a .nii.gz holds the whole volume twice.
  Native byte order."""
  shape, dtype = tuple(proxy.shape), np.dtype(proxy.dtype)
  nbytes = math.prod(shape) * dtype.itemsize
  buffer = np.empty(nbytes, np.uint8)
  view, done = memoryview(buffer), 0
  with stored.stream() as file:
    file.seek(int(proxy.offset))
    while done < nbytes:
      count = file.readinto(view[done:done + READ_CHUNK])
      if not count:
        raise BadVolume(f"file is truncated or corrupt (the header declares {nbytes} bytes of "
                        f"voxels from byte {int(proxy.offset)}, the file holds {done})")
      done += count
  raw = buffer.view(dtype).reshape(shape, order="F")
  if not dtype.isnative:
    raw = raw.byteswap(inplace=True).view(dtype.newbyteorder("="))
  return raw


def diagnose_unreadable(stored, err):
  """Why nibabel could not read the StoredFile: gzip problems first, then the NIfTI header."""
  try:
    with stored.raw() as file:
      magic = file.read(2)
    if stored.path.endswith(".gz"):
      if magic != b"\x1f\x8b":
        return "not a valid gzip file (a .nii.gz must be gzip-compressed)"
      with stored.raw() as file, gzip.open(file, "rb") as stream:
        head = stream.read(348)
        while stream.read(1 << 24):
          pass
    else:
      with stored.raw() as file:
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


def check_shape(shape):
  """The 3D shape of a stored array of `shape` ((X, Y, Z, 1) exports are 3D), or BadVolume."""
  while len(shape) > 3 and shape[-1] == 1:
    shape = shape[:-1]
  if len(shape) != 3:
    raise BadVolume(f"expected a 3D volume, found a {len(shape)}D array of shape {shape}")
  if min(shape) < 2:
    raise BadVolume(f"expected at least 2 voxels along each axis of a 3D volume, found shape "
                    f"{shape}")
  return shape


def check_voxel_type(dtype):
  if dtype.kind not in "iuf":
    raise BadVolume(f"unsupported voxel type {dtype} (expected integer or float voxels)")


def check_intensities(raw, slope, inter):
  """Finite float voxels, and stored and scaled values that float32 arithmetic (the resample,
  the scaling) carries without overflowing to inf and NaN. Integer voxels are bounded by their
  type, so only float volumes cost a pass (min and max)."""
  if raw.dtype.kind == "f":
    low, high = float(raw.min()), float(raw.max())
    if not (np.isfinite(low) and np.isfinite(high)):
      finite = np.isfinite(raw)
      n_nan = int(np.isnan(raw).sum())
      n_inf = int(raw.size - finite.sum()) - n_nan
      raise BadVolume(f"volume has {n_nan} NaN and {n_inf} infinite voxels")
    stored, bound = max(abs(low), abs(high)), ""
  else:
    info = np.iinfo(raw.dtype)
    stored, bound = float(max(-int(info.min), int(info.max))), f" ({raw.dtype}'s range)"
  scaled = stored * abs(slope) + abs(inter)
  if max(stored, scaled) > MAX_INTENSITY:
    raise BadVolume(f"intensities out of range: stored values up to {stored:g}{bound}, with "
                    f"scl_slope={slope:g} and scl_inter={inter:g}, reach {scaled:g}; expected at "
                    f"most {MAX_INTENSITY:g}")


def _checked_source(raw, slope, inter, affine, **details):
  """Validates shape, voxel type, finiteness and geometry of a loaded volume."""
  check_shape(tuple(raw.shape))
  raw = raw[(Ellipsis,) + (0,) * (raw.ndim - 3)]     # drop trailing singleton axes (a view)
  check_voxel_type(raw.dtype)
  if not (np.isfinite(slope) and np.isfinite(inter) and slope != 0):
    raise BadVolume(f"invalid intensity scaling scl_slope={slope}, scl_inter={inter}")
  check_intensities(raw, slope, inter)
  if not np.all(np.isfinite(affine)) or np.min(nib.affines.voxel_sizes(affine)) <= 0:
    raise BadVolume(f"invalid affine (voxel-to-mm matrix) {affine.tolist()}")
  sizes = nib.affines.voxel_sizes(affine)
  if not np.all((sizes >= VOXEL_MM[0]) & (sizes <= VOXEL_MM[1])):
    raise BadVolume(f"implausible voxel size ({', '.join(f'{v:g}' for v in sizes)}) mm; expected "
                    f"{VOXEL_MM[0]:g} to {VOXEL_MM[1]:g} mm (a header in other units, or broken)")
  if np.isnan(nib.orientations.io_orientation(affine)).any():
    raise BadVolume(f"invalid affine (voxel-to-mm matrix) {affine.tolist()}: its voxel axes do "
                    f"not point in three distinct directions (a degenerate sform or qform)")
  return SourceVolume(raw=raw, slope=slope, inter=inter, affine=affine, **details)


def checked_source(raw, slope, inter, affine, **details):
  """A SourceVolume from another reader (DICOM, CT-RATE's metadata), with the checks of the
  NIfTI path: the same BadVolume reasons for the same problems."""
  return _checked_source(raw, float(slope), float(inter), np.asarray(affine, np.float64),
                         **details)


# --- Scaling and spacing from a corpus's metadata (CT-RATE) --------------------------------------

AIR_BAND_HU = (-1100.0, -900.0)    # air outside the body and in the airways
IMPLAUSIBLE_HU = -1100.0           # below it: only a padding value (the most common stored one)
SCALING_SAMPLE = 4                 # every 4th voxel along each axis decides the scaling


def with_metadata(source, meta):
  """`source` with a corpus's metadata applied: its spacing replaces the header's (the
  directions of the header's axes are kept), and its RescaleSlope/Intercept are applied when
  the stored values are raw, not when they are HU already (a later CT-RATE release stores HU:
  applying the intercept again would shift every voxel by it). `hu_source` says which."""
  directions = source.affine[:3, :3] / np.linalg.norm(source.affine[:3, :3], axis=0)
  affine = source.affine.copy()
  affine[:3, :3] = directions * np.asarray(meta["spacing"], np.float64)
  slope, inter, why = choose_scaling(source, meta["slope"], meta["intercept"])
  return checked_source(source.raw, slope, inter, affine, series_uid=source.series_uid,
                        hu_source=why)


def choose_scaling(source, meta_slope, meta_inter):
  """(slope, intercept, why): of the candidate mappings (the metadata's; none, i.e. stored
  values are HU; the header's when it has one), the one under which the volume looks most like
  CT: the largest fraction of voxels in the air band minus the fraction below -1100 HU (apart
  from the padding value). Raw values read as HU put the air near 0 HU; HU values shifted by
  the intercept again put air, lungs and fat below -1100 HU."""
  candidates = [(float(meta_slope), float(meta_inter), "metadata RescaleSlope/RescaleIntercept "
                 "(stored values are raw)"),
                (1.0, 0.0, "none: stored values are HU already (metadata intercept not applied)")]
  if (source.slope, source.inter) != (1.0, 0.0):
    candidates.append((source.slope, source.inter, "the header's scl_slope/scl_inter"))
  step = SCALING_SAMPLE
  sample = source.raw[::step, ::step, ::step].ravel()
  values, counts = np.unique(sample, return_counts=True)
  padding = values[np.argmax(counts)]
  unpadded = sample[sample != padding].astype(np.float32)
  def score(candidate):
    slope, inter, _ = candidate
    hu = unpadded * np.float32(slope) + np.float32(inter)
    air = np.count_nonzero((hu >= AIR_BAND_HU[0]) & (hu <= AIR_BAND_HU[1]))
    low = np.count_nonzero(hu < IMPLAUSIBLE_HU)
    return (air - low) / max(sample.size, 1)
  return max(candidates, key=score)
