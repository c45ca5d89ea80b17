"""CT-CLIP's preprocessing of CT-RATE, for like-for-like comparisons with CT-CLIP and the
models that report on CT-RATE with it (Merlin, fVLM, ... each say when they differ).

  HU clipped to [-1000, 1000], resampled to 0.75 x 0.75 x 1.5 mm, divided by 1000, centre
  crop/pad to 480 x 480 x 240 voxels with pad value -1 (HU -1000).

Stored as int16 HU (the window's HU; -1000 pads) with the "hu/1000" intensity mapping, so the
model sees HU / 1000 in [-1, 1]. Unlike our `ct` mode (the default, configs/default.py) nothing
is cropped to the body and a larger field of view is centre-cropped, not shrunk. Axes are our
canonical RAS (CT-CLIP keeps the files' voxel order; CT-RATE's files share one orientation).
A record holds 480*480*240 int16 voxels (105 MiB before zlib): size the disk accordingly.

  python launch.py convert --config configs/ctrate_ctclip.py --layout ctrate \\
      --data_root /data/CT-RATE --output_dir /data/ctrate_ctclip --workers 8
"""

import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.data.layout = "ctrate"
  c.data.preprocess = "ct"
  c.data.hu_window = (-1000.0, 1000.0)
  c.data.spacing = (0.75, 0.75, 1.5)
  c.data.shape = (480, 480, 240)
  c.data.volume_dtype = "int16"
  c.data.intensity_mapping = "hu/1000"
  c.data.body_crop = False
  c.data.fit = "crop"
  if arg == "tiny":
    default.shrink_to_tiny(c)
    c.data.spacing = (24.0, 24.0, 48.0)   # the tiny shape over a chest, at CT-CLIP's ratios
  return c
