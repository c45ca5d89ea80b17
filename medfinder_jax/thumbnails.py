"""Study thumbnails: three orthogonal mid-slices of a record volume in a lung window, as a PNG.

Rendered when a study is embedded (from the volume the model saw) and stored in the index's
shard, so a server never opens a source volume. One grayscale PNG per study: the axial, coronal
and sagittal mid-slices side by side, each PANEL x PANEL pixels (nearest-neighbour resize),
anterior and superior up. A `ct`-preprocessed volume is shown in the lung window (centre -600
HU, width 1500); a `released` one (min-max scaled, no HU) as stored. The PNG is written here
(zlib + the three chunks a grayscale image needs), so no imaging library is required.
"""

import struct
import zlib

import numpy as np

PANEL = 96                      # pixels per panel side
LUNG_WINDOW_HU = (-1350.0, 150.0)


def panels(volume, params):
  """(PANEL, 3 PANEL) uint8: axial | coronal | sagittal mid-slices of a (X, Y, Z) record volume
  (RAS voxel axes) in the lung window."""
  unit = np.asarray(volume, np.float32) * params.intensity.scale + params.intensity.offset
  if params.mode == "ct":
    lo, hi = params.hu_window
    hu = lo + unit * (hi - lo)
    unit = (hu - LUNG_WINDOW_HU[0]) / (LUNG_WINDOW_HU[1] - LUNG_WINDOW_HU[0])
  gray = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)
  x, y, z = (s // 2 for s in gray.shape)
  views = (gray[:, :, z].T[::-1], gray[:, y, :].T[::-1], gray[x, :, :].T[::-1])  # rows: A/S up
  return np.concatenate([_resize(v, PANEL) for v in views], axis=1)


def _resize(image, size):
  rows = np.minimum((np.arange(size) + 0.5) * image.shape[0] / size, image.shape[0] - 1)
  cols = np.minimum((np.arange(size) + 0.5) * image.shape[1] / size, image.shape[1] - 1)
  return image[rows.astype(int)][:, cols.astype(int)]


def png(gray):
  """PNG bytes of a (H, W) uint8 grayscale image."""
  gray = np.ascontiguousarray(gray, np.uint8)
  height, width = gray.shape
  raw = b"".join(b"\0" + gray[r].tobytes() for r in range(height))   # filter type 0 per row

  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

  header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
          + chunk(b"IEND", b""))


def render(volume, params):
  """The PNG thumbnail of a record volume (see the module docstring)."""
  return png(panels(volume, params))
