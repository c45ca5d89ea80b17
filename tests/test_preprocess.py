"""Volume preprocessing: orientation, HU window, spacing resample, body crop, fit, released mode."""

import gzip
import os
import subprocess
import sys
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import phantom
from data_prep import phantom_layouts
from data_prep import preprocess
from data_prep import schema
from data_prep import sources
from medfinder_jax import input_pipeline


def params(**kw):
  base = dict(mode="ct", shape=(32, 32, 32), spacing=(), hu_window=(-1000.0, 1000.0),
              volume_dtype="uint8", body_threshold_hu=-500.0)
  base.update(kw)
  return schema.PreprocessParams(**base)


def save(path, data, affine):
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return str(path)


def save_scaled(path, hu, spacing, orientation="RAS", slope=0.5, inter=-1024.0):
  """int16 NIfTI with scl_slope/scl_inter, as scanners export (via the phantom's writer)."""
  geometry = phantom.StudyGeometry(shape=hu.shape, spacing=spacing, orientation=orientation,
                                   slope=slope, inter=inter, noise_hu=0.0, body_width=0.0,
                                   body_depth=0.0)
  phantom.write_nifti(str(path), hu.astype(np.float32), geometry)
  return str(path)


def test_lps_marker_at_right_anterior_superior_ends_in_the_high_xyz_corner(tmp_path):
  # LPS storage: index 0 of axis 0 is the patient's Right, index 0 of axis 1 is Anterior.
  data = np.full((20, 24, 16), 40, np.int16)
  data[0:3, 0:3, -3:] = 1000
  affine = np.diag([-1.0, -1.0, 2.0, 1.0])
  source = preprocess.load_source(save(tmp_path / "lps.nii.gz", data, affine))
  assert source.orientation == "LPS"
  volume, _ = preprocess.preprocess(source, params(shape=(20, 24, 16)))
  marker = np.argwhere(volume == volume.max())
  assert marker.min(axis=0).tolist() == [17, 21, 13]
  assert marker.max(axis=0).tolist() == [19, 23, 15]


def test_ras_and_lps_files_of_the_same_anatomy_give_the_same_volume(tmp_path):
  rng = np.random.default_rng(0)
  canonical = rng.uniform(-900, 900, size=(30, 26, 14)).astype(np.float32)
  p = params(shape=(24, 24, 16), spacing=(1.5, 1.5, 3.0))
  ras = preprocess.load_source(save_scaled(tmp_path / "a.nii.gz", canonical, (1.0, 1.0, 2.5)))
  lps = preprocess.load_source(save_scaled(tmp_path / "b.nii.gz", canonical, (1.0, 1.0, 2.5),
                                           orientation="LPS"))
  assert lps.orientation == "LPS" and ras.orientation == "RAS"
  np.testing.assert_array_equal(preprocess.preprocess(ras, p)[0], preprocess.preprocess(lps, p)[0])


def test_hu_window_maps_scaled_values_to_uint8_and_int16(tmp_path):
  hu = np.full((12, 12, 12), 40.0, np.float32)
  probes = {(5, 5, 5): -1200, (5, 6, 5): -1000, (5, 7, 5): 0, (6, 5, 5): 500, (6, 6, 5): 1500}
  for where, value in probes.items():
    hu[where] = value
  source = preprocess.load_source(save_scaled(tmp_path / "w.nii.gz", hu, (1.0, 1.0, 1.0)))
  assert (source.slope, source.inter) == (0.5, -1024.0)
  as_uint8, _ = preprocess.preprocess(source, params(shape=(12, 12, 12)))
  as_int16, _ = preprocess.preprocess(source, params(shape=(12, 12, 12), volume_dtype="int16"))
  for where, value in probes.items():
    clipped = min(max(value, -1000), 1000)
    assert as_uint8[where] == int(np.floor((clipped + 1000) / 2000 * 255 + 0.5))
    assert as_int16[where] == clipped
  assert as_uint8[0, 0, 0] == 133 and as_int16[0, 0, 0] == 40


def test_spacing_resample_samples_a_hu_ramp_at_the_new_voxel_centers(tmp_path):
  x_index = np.arange(90, dtype=np.float32)
  hu = np.broadcast_to((5.0 * x_index)[:, None, None], (90, 20, 20)).copy()   # 10 HU per mm
  source = preprocess.load_source(save_scaled(tmp_path / "r.nii.gz", hu, (0.5, 1.5, 3.0),
                                              slope=1.0, inter=0.0))
  volume, volume_spacing = preprocess.preprocess(
      source, params(shape=(40, 20, 20), spacing=(1.5, 1.5, 3.0), volume_dtype="int16"))
  np.testing.assert_allclose(volume_spacing, (1.5, 1.5, 3.0), rtol=1e-6)
  assert (volume[:5] == -1000).all() and (volume[35:] == -1000).all()   # 45 mm -> 30 voxels
  centers = (np.arange(30) + 0.5) * 3.0 - 0.5                  # in source voxels
  np.testing.assert_allclose(volume[5:35, 10, 10][1:-1], 5.0 * centers[1:-1], atol=1.0)


def test_body_crop_centers_the_body_and_drops_the_air_around_it(tmp_path):
  hu = np.full((60, 60, 30), -1000.0, np.float32)
  hu[20:40, 10:30, 5:25] = 40.0
  source = preprocess.load_source(save_scaled(tmp_path / "c.nii.gz", hu, (1.5, 1.5, 3.0)))
  volume, _ = preprocess.preprocess(source, params(spacing=(1.5, 1.5, 3.0)))
  body = np.argwhere(volume > 0)
  assert body.min(axis=0).tolist() == [6, 6, 6] and body.max(axis=0).tolist() == [25, 25, 25]


def test_a_body_larger_than_the_shape_shrinks_with_its_aspect_ratio(tmp_path):
  hu = np.full((200, 100, 50), 40.0, np.float32)
  source = preprocess.load_source(save_scaled(tmp_path / "s.nii.gz", hu, (1.5, 1.5, 3.0)))
  volume, volume_spacing = preprocess.preprocess(
      source, params(shape=(50, 50, 50), spacing=(1.5, 1.5, 3.0)))
  body = np.argwhere(volume > 0)
  extent = body.max(axis=0) - body.min(axis=0) + 1
  assert extent.tolist() == [50, 25, 12]
  assert volume_spacing[0] == pytest.approx(6.0) and volume_spacing[1] == pytest.approx(6.0)
  assert volume_spacing[2] == pytest.approx(150.0 / 12)


def test_empty_spacing_stretches_the_body_to_the_whole_shape(tmp_path):
  hu = np.full((40, 30, 10), -1000.0, np.float32)
  hu[5:35, 5:25, 2:8] = 40.0
  source = preprocess.load_source(save_scaled(tmp_path / "p.nii.gz", hu, (1.0, 1.0, 1.0)))
  volume, volume_spacing = preprocess.preprocess(source, params(shape=(16, 16, 16)))
  assert (volume > 0).all()
  np.testing.assert_allclose(volume_spacing, (30 / 16, 20 / 16, 6 / 16), rtol=1e-6)


def test_released_mode_matches_the_released_monai_transform():
  monai = pytest.importorskip("monai")
  torch = pytest.importorskip("torch")
  from monai import transforms  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  x = np.full((40, 12, 6), -1000.0, np.float32)
  x[4:33, 2:11, 1:5] = rng.uniform(-900, 1200, size=(29, 9, 4))
  shape = (16, 16, 8)
  eval_transform = transforms.Compose([    # main_ddp.get_transforms("val"), without LoadImaged
      transforms.ScaleIntensityd(keys=["volume"]),
      transforms.CropForegroundd(keys=["volume"], source_key="volume"),
      transforms.SpatialPadd(keys=["volume"], spatial_size=shape),
      transforms.Resized(keys=["volume"], spatial_size=shape)])
  expected = eval_transform({"volume": torch.from_numpy(x)[None]})["volume"][0]
  ours, _ = preprocess.released_transform(x, shape)
  assert monai.__version__ and ours.shape == shape
  np.testing.assert_allclose(ours, np.asarray(expected), atol=2e-6)


def test_released_mode_applies_the_file_scaling_before_min_max(tmp_path):
  hu = np.random.default_rng(4).uniform(-1000, 1000, size=(20, 20, 10)).astype(np.float32)
  source = preprocess.load_source(save_scaled(tmp_path / "m.nii.gz", hu, (1.0, 1.0, 2.0)))
  volume, _ = preprocess.preprocess(source, params(mode="released", shape=(20, 20, 10)))
  scaled = source.raw * source.slope + source.inter
  expected = (scaled - scaled.min()) / (scaled.max() - scaled.min())
  np.testing.assert_array_equal(volume, np.rint(expected * 255).astype(np.uint8))


@pytest.mark.parametrize("make,reason", [
    ("truncated", "truncated or corrupt"),
    ("not_gzip", "not a valid gzip file"),
    ("not_nifti", "not a NIfTI file"),
    ("2d", "expected a 3D volume, found a 2D array"),
    ("4d", "expected a 3D volume, found a 4D array of shape (8, 8, 8, 3)"),
    ("nan", "volume has 3 NaN and 1 infinite voxels"),
    ("blank", "no body found"),
])
def test_bad_volumes_raise_with_a_clear_reason(tmp_path, make, reason):
  path = tmp_path / "bad.nii.gz"
  good = np.zeros((8, 8, 8), np.int16)
  if make == "truncated":
    noise = np.random.default_rng(5).integers(0, 3000, size=(8, 8, 8)).astype(np.int16)
    save(path, noise, np.eye(4))
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
  elif make == "not_gzip":
    save(tmp_path / "plain.nii", good, np.eye(4))
    path.write_bytes((tmp_path / "plain.nii").read_bytes())
  elif make == "not_nifti":
    path.write_bytes(gzip.compress(b"patient,report\n1,hello\n" * 40))
  elif make == "2d":
    save(path, np.zeros((8, 8), np.int16), np.eye(4))
  elif make == "4d":
    save(path, np.zeros((8, 8, 8, 3), np.int16), np.eye(4))
  elif make == "nan":
    data = np.zeros((8, 8, 8), np.float32)
    data[1, 1, 1:4] = np.nan
    data[2, 2, 2] = np.inf
    save(path, data, np.eye(4))
  else:
    save(path, good - 1000, np.eye(4))
  with pytest.raises(sources.BadVolume) as err:
    preprocess.preprocess(preprocess.load_source(str(path)), params())
  assert reason in str(err.value)


def test_a_trailing_singleton_fourth_axis_is_a_3d_volume(tmp_path):
  data = np.full((8, 8, 8, 1), 40, np.int16)
  source = preprocess.load_source(save(tmp_path / "t.nii.gz", data, np.eye(4)))
  assert source.raw.shape == (8, 8, 8)


def test_params_from_config_rejects_contradictions():
  from configs import default  # pylint: disable=g-import-not-at-top
  data = default.get_config().data
  assert schema.PreprocessParams.from_config(data).shape == (224, 224, 96)
  data.preprocess, data.volume_dtype = "released", "int16"
  with pytest.raises(ValueError, match="released"):
    schema.PreprocessParams.from_config(data)


# --- Volumes from files (embed --volumes, search --volume) -------------------------------------

def test_nifti_volumes_are_preprocessed_exactly_as_at_conversion(aligned):
  builder, spec = input_pipeline.open_dataset(aligned.dataset_dir)
  records = tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False))
  for source, record in zip(aligned.source_paths, records):
    volume = preprocess.volume_from_file(os.path.join(aligned.raw_dir, source), spec.preprocess)
    assert volume.dtype == record["volume"].dtype
    np.testing.assert_array_equal(volume, record["volume"])


def test_a_2d_image_or_a_missing_file_is_not_a_volume(tmp_path):
  path = tmp_path / "slice.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), str(path))
  with pytest.raises(sources.BadVolume, match=r"slice.nii.gz: expected a 3D volume"):
    preprocess.volume_from_file(str(path), schema.PreprocessParams(shape=(16, 16, 8)))
  with pytest.raises(sources.BadVolume, match=r"absent.nii.gz: no such volume file"):
    preprocess.volume_from_file(str(tmp_path / "absent.nii.gz"), schema.PreprocessParams())


# --- Reading safely: header checks before decoding, memory, special files -----------------------

def header_only_file(path, shape, dtype=np.int16, **fields):
  """A .nii.gz of a NIfTI header declaring `shape` and no voxels at all (a "header bomb")."""
  header = nib.Nifti1Header()
  header.set_data_shape(shape)
  header.set_data_dtype(dtype)
  header["vox_offset"], header["magic"] = 352, b"n+1"
  for name, value in fields.items():
    header[name] = value
  path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
  return str(path)


# Peak RSS from /proc (VmHWM, this process image's high-water mark): getrusage's ru_maxrss keeps
# the forking parent's peak across exec, so under pytest it reports pytest's own size.
BOMB_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from data_prep import preprocess, sources
start = time.time()
for path in sys.argv[1:]:
  try:
    preprocess.load_source(path, max_volume_mib=2048)
    print("loaded", path)
  except sources.BadVolume as err:
    print("skip", err)
print("seconds", time.time() - start)
with open("/proc/self/status") as status:
  peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
print("peak_mib", peak_kib / 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_a_header_bomb_is_refused_before_anything_is_decoded(tmp_path):
  # 3000x3000x1000 int16 is 17166 MiB: the old reader allocated all of it for a 57-byte file.
  # The second declares 1500 MiB (under the limit) and holds nothing: it must fail without
  # touching those 1500 MiB.
  over = header_only_file(tmp_path / "over.nii.gz", (3000, 3000, 1000))
  under = header_only_file(tmp_path / "under.nii.gz", (1000, 1000, 786))
  assert os.path.getsize(over) < 100
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", BOMB_SCRIPT.format(root=root), over, under],
                          capture_output=True, text=True, timeout=120, check=True)
  lines = result.stdout.splitlines()
  assert lines[0] == ("skip declares 3000x3000x1000 int16 voxels (17166 MiB), over "
                      "data.max_volume_mib=2048; raise --config.data.max_volume_mib to convert it")
  assert lines[1].startswith("skip file is truncated or corrupt (the header declares "
                             "1572000000 bytes")
  assert float(lines[2].split()[1]) < 10
  peak_mib = float(lines[3].split()[1])
  assert peak_mib < 400, result.stdout         # python + numpy + nibabel: about 100 MiB


def test_the_size_limit_counts_every_declared_voxel_byte(tmp_path):
  path = save(tmp_path / "v.nii.gz", np.zeros((64, 64, 32), np.float32), np.eye(4))   # 0.5 MiB
  assert preprocess.load_source(path, max_volume_mib=0.5).raw.shape == (64, 64, 32)
  with pytest.raises(sources.VolumeTooLarge, match=r"64x64x32 float32 voxels \(0.50 MiB\), "
                     r"over data.max_volume_mib=0.4;"):
    preprocess.load_source(path, max_volume_mib=0.4)


def test_loading_and_preprocessing_allocate_a_small_multiple_of_the_volume(tmp_path, monkeypatch):
  hu = np.full((384, 384, 96), -1000, np.int16)
  hu[20:330, 30:320, 5:90] = 40
  hu[::7, ::5, ::3] = 900
  path = save(tmp_path / "big.nii.gz", hu, np.diag([-0.7, -0.7, 1.2, 1.0]))   # 27 MiB of voxels
  monkeypatch.setattr(sources, "READ_CHUNK", 1 << 20)
  for mode in ("ct", "released"):
    tracemalloc.start()
    try:
      source = preprocess.load_source(path)
      load_peak = tracemalloc.get_traced_memory()[1]
      tracemalloc.reset_peak()
      before = tracemalloc.get_traced_memory()[0]
      preprocess.preprocess(source, params(mode=mode, shape=(64, 64, 32),
                                           spacing=(1.5, 1.5, 3.0) if mode == "ct" else ()))
      extra = tracemalloc.get_traced_memory()[1] - before
    finally:
      tracemalloc.stop()
    # nibabel's read of a .nii.gz held 2x, a whole-volume mask and a copy of the crop (here the
    # whole volume) cost 1.5x more; what is left is the first resample pass (float32, reduced)
    assert load_peak < 1.25 * hu.nbytes, (mode, load_peak / hu.nbytes)
    assert extra < 0.75 * hu.nbytes, (mode, extra / hu.nbytes)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["<i2", ">i2", ">f4", "<f8", "|u1"])
def test_voxels_read_in_chunks_equal_nibabels_reading(tmp_path, monkeypatch, suffix, dtype):
  monkeypatch.setattr(sources, "READ_CHUNK", 1000)    # many chunks, some splitting a voxel
  data = np.random.default_rng(6).integers(0, 200, size=(13, 11, 7, 1)).astype(dtype)
  image = nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0]))
  image.header.set_data_dtype(dtype)
  path = str(tmp_path / f"v{suffix}")
  nib.save(image, path)
  source = preprocess.load_source(path)
  expected = np.asanyarray(nib.load(path).dataobj.get_unscaled())[..., 0]
  assert source.raw.dtype.isnative and source.raw.dtype == np.dtype(dtype).newbyteorder("=")
  np.testing.assert_array_equal(source.raw, expected)


@pytest.mark.parametrize("shape,fields,reason", [
    ((1, 1, 1), {}, "expected at least 2 voxels along each axis of a 3D volume, found shape "
                    "(1, 1, 1)"),
    ((64, 64, 1), {}, "found shape (64, 64, 1)"),
    ((8, 8, 8), {"pixdim": [1, 0, 0, 0, 1, 0, 0, 0], "qform_code": 0, "sform_code": 0},
     "voxel size unknown: header pixdim[1:4]=(0, 0, 0) is not positive and there is no "
     "sform (qform_code=0, sform_code=0)"),
    ((8, 8, 8), {"pixdim": [1, -0.7, 0.7, 2, 1, 0, 0, 0], "qform_code": 0, "sform_code": 0},
     "pixdim[1:4]=(-0.7, 0.7, 2)"),
    ((8, 8, 8), {"pixdim": [1, 0.7, 0.7, 0, 1, 0, 0, 0], "qform_code": 1, "sform_code": 0},
     "(qform_code=1, sform_code=0)"),
    ((8, 8, 8), {"vox_offset": 3e9}, "header: vox_offset=3e+09"),
])
def test_bad_headers_are_refused_with_the_fields_named(tmp_path, shape, fields, reason):
  path = header_only_file(tmp_path / "h.nii.gz", shape, **fields)   # no voxels: never read
  with pytest.raises(sources.BadVolume) as err:
    preprocess.load_source(path)
  assert reason in str(err.value)


def test_a_pixdim_is_not_needed_when_the_sform_gives_the_geometry(tmp_path):
  image = nib.Nifti1Image(np.full((8, 8, 8), 40, np.int16), np.diag([0.7, 0.7, 2.0, 1.0]))
  image.header["pixdim"][1:4] = 0
  nib.save(image, str(tmp_path / "s.nii.gz"))
  source = preprocess.load_source(str(tmp_path / "s.nii.gz"))
  np.testing.assert_allclose(source.spacing, (0.7, 0.7, 2.0))


def test_a_complex_volume_is_refused_from_its_header(tmp_path):
  path = header_only_file(tmp_path / "c.nii.gz", (64, 64, 64), dtype=np.complex64)
  with pytest.raises(sources.BadVolume, match="unsupported voxel type complex64"):
    preprocess.load_source(path)


def test_a_constant_volume_is_a_skip_under_the_released_preprocessing(tmp_path):
  source = preprocess.load_source(save_scaled(tmp_path / "k.nii.gz", np.full((8, 8, 8), 40.0),
                                              (1.0, 1.0, 1.0)))
  with pytest.raises(sources.BadVolume, match=r"constant volume \(every voxel = 40\): "
                                                 r"nothing to scale"):
    preprocess.preprocess(source, params(mode="released", shape=(8, 8, 8)))
  assert preprocess.preprocess(source, params(shape=(8, 8, 8)))[0].max() > 0    # ct: a body


@pytest.mark.timeout(30)
def test_a_named_pipe_is_not_opened(tmp_path):
  os.mkfifo(tmp_path / "pipe.nii.gz")
  with pytest.raises(sources.BadVolume, match=r"not a regular file \(a named pipe \(FIFO\)\)"):
    preprocess.load_source(str(tmp_path / "pipe.nii.gz"))


def test_out_of_memory_is_not_a_bad_volume(tmp_path, monkeypatch):
  path = save(tmp_path / "v.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))

  def no_memory(*args, **kwargs):
    raise MemoryError("Unable to allocate 17.6 GiB")

  monkeypatch.setattr(nib, "load", no_memory)
  with pytest.raises(MemoryError):
    preprocess.load_source(path)


def raw_nifti(path, data, **fields):
  """A .nii.gz of `data` with header `fields` exactly as given (nib.save would rewrite them)."""
  header = nib.Nifti1Header()
  header.set_data_shape(data.shape)
  header.set_data_dtype(data.dtype)
  header["vox_offset"], header["magic"] = 352, b"n+1"
  for name, value in fields.items():
    header[name] = value
  path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + data.tobytes(order="F")))
  return str(path)


@pytest.mark.parametrize("make,reason", [
    ("degenerate_sform", "its voxel axes do not point in three distinct directions"),
    ("huge_pixdim", "implausible voxel size (3e+30, 1, 1) mm; expected 0.001 to 1000 mm"),
    ("huge_values", "intensities out of range: stored values up to 9e+34"),
    ("huge_slope", "stored values up to 32768 (int16's range), with scl_slope=1e+28"),
])
def test_geometry_and_intensities_that_float32_cannot_carry_are_refused(tmp_path, make, reason):
  # found by tests/test_fuzz_readers.py: these crashed the reorientation or became NaN voxels
  data = np.full((8, 8, 8), 40, np.int16)
  data[2:6, 2:6, 2:6] = 900
  fields = {"pixdim": [1, 0.7, 0.7, 2, 1, 1, 1, 1], "qform_code": 0, "sform_code": 0}
  if make == "degenerate_sform":     # two voxel axes along the same direction
    fields.update(sform_code=1, srow_x=[1, 1, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 2, 0])
  elif make == "huge_pixdim":
    fields["pixdim"] = [1, 3e30, 1, 1, 1, 1, 1, 1]
  elif make == "huge_values":
    data = data.astype(np.float32) * np.float32(1e32)
  else:
    fields.update(scl_slope=1e28, scl_inter=0)
  path = raw_nifti(tmp_path / "v.nii.gz", data, **fields)
  with pytest.raises(sources.BadVolume) as err:
    preprocess.load_source(path)
  assert reason in str(err.value)


def test_a_range_too_narrow_to_scale_is_a_skip_under_the_released_preprocessing():
  raw = np.zeros((8, 8, 8), np.float32)
  raw[2:5, 2:5, 2:5] = 1e-35
  with pytest.raises(sources.BadVolume, match="intensity range 0..1e-35 is too narrow"):
    preprocess.released_transform(raw, (8, 8, 8))


# --- CT-CLIP's preset (configs/ctrate_ctclip.py) -----------------------------------------------

def ctclip_params(shape=(20, 20, 10), spacing=(1.5, 1.5, 3.0)):
  from medfinder_jax import config_utils  # pylint: disable=import-outside-toplevel
  data = config_utils.load_config_file(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "ctrate_ctclip.py")).data
  data.shape, data.spacing = shape, spacing
  return schema.PreprocessParams.from_config(data)


def test_ctclip_preset_centre_crops_at_the_spacing_pads_with_minus_one_and_divides_by_1000():
  """A 40x40x10-voxel HU ramp at 1.5 mm (60 mm wide) into a 20x20x10 grid at 1.5 mm: the middle
  20 voxels of x and y, exactly (no resampling, no body crop, no shrinking); z is padded."""
  params = ctclip_params(spacing=(1.5, 1.5, 1.5))
  x = np.arange(40, dtype=np.float32)
  hu = np.broadcast_to((x * 100 - 2000)[:, None, None], (40, 40, 6)).astype(np.int16)
  source = sources.SourceVolume(hu, 1.0, 0.0, np.diag([1.5, 1.5, 1.5, 1.0]))
  volume, spacing = preprocess.preprocess(source, params)
  assert volume.dtype == np.int16 and volume.shape == (20, 20, 10)
  np.testing.assert_allclose(spacing, 1.5)
  np.testing.assert_array_equal(volume[:, 0, 2], np.clip(x[10:30] * 100 - 2000, -1000, 1000))
  assert (volume[:, :, :2] == -1000).all() and (volume[:, :, 8:] == -1000).all()  # z padding
  model_input = params.intensity(volume)
  assert model_input.min() == -1.0 and model_input.max() == pytest.approx(0.9)   # HU 900
  np.testing.assert_allclose(model_input[..., 0], volume / 1000.0)


def test_ctclip_preset_needs_int16_for_its_mapping():
  with pytest.raises(ValueError, match="intensity_mapping='hu/1000'.*int16"):
    schema.PreprocessParams(volume_dtype="uint8", intensity_mapping="hu/1000")
  with pytest.raises(ValueError, match="data.fit="):
    schema.PreprocessParams(fit="squeeze")


# --- The body box: the integer threshold and the uint8 counts give the plain definition's box ---

def reference_body_box(raw, slope, inter, threshold_hu):
  """The box of planes holding more than max(1, 0.1%) voxels above the threshold, computed as
  written: every voxel compared in float64 with the threshold in stored units."""
  stored = (threshold_hu - inter) / slope
  mask = raw.astype(np.float64) > stored if slope > 0 else raw.astype(np.float64) < stored
  box = []
  for axis in range(3):
    others = tuple(a for a in range(3) if a != axis)
    inside = np.flatnonzero(mask.sum(axis=others) > max(1, 1e-3 * raw.size / raw.shape[axis]))
    box.append((int(inside[0]), int(inside[-1]) + 1))
  return box


@pytest.mark.parametrize("dtype,slope,inter", [
    (np.int16, 1.0, -1024.0),     # the threshold -500 HU is the integer 524 (strictly above)
    (np.uint16, 0.5, -1024.0),    # 1048, an integer again
    (np.int16, 0.3, -1024.0),     # 1746.67: between two integers
    (np.int16, -1.0, 100.0),      # a negative slope: body voxels are below 600
    (np.float32, 1.0, -1024.0),
])
def test_body_box_equals_the_plain_definition(dtype, slope, inter):
  """A small plane over 700 slices (several slabs, and body columns of exactly 256 voxels: one
  more than a uint8 holds), voxels exactly at the threshold, a plane under the 0.1% rule."""
  hu = np.full((12, 10, 700), -1000.0)
  hu[2:9, 3:8, 40:296] = 40.0
  hu[0, 0, 5] = 40.0                            # one voxel: a plane with too little to count
  raw = (hu - inter) / slope
  stored = (-500.0 - inter) / slope             # at (or just short of) the threshold: not body
  at_threshold = np.floor(stored) if slope > 0 else np.ceil(stored)
  raw[(np.random.default_rng(5).random(hu.shape) < 0.02) & (hu < -500)] = at_threshold
  raw = np.asfortranarray((raw if dtype == np.float32 else np.rint(raw)).astype(dtype))
  source = sources.SourceVolume(raw, slope, inter, np.eye(4))
  expected = reference_body_box(raw, slope, inter, -500.0)
  assert preprocess.body_box(source, -500.0) == expected == [(2, 9), (3, 8), (40, 296)]


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32])
@pytest.mark.parametrize("threshold", [-1e6, -3.5, -3.0, 0.0, 2.5, 200.0, 65535.5, 1e12])
@pytest.mark.parametrize("above", [True, False])
def test_a_threshold_in_stored_integers_selects_the_same_voxels(dtype, threshold, above):
  info = np.iinfo(dtype)
  raw = np.unique(np.clip(np.array([-70000, -5, -4, -3, -2, 0, 1, 2, 3, 199, 200, 201, 255,
                                    65535, 70000]), info.min, info.max)).astype(dtype)
  stored = preprocess.stored_threshold(raw.dtype, threshold, above)
  plain = raw.astype(np.float64) > threshold if above else raw.astype(np.float64) < threshold
  np.testing.assert_array_equal(raw > stored if above else raw < stored, plain)


# --- Volumes from files and released-mode spacing, without a converted dataset -----------------

def test_a_volume_file_gives_the_record_volume_of_its_source(tmp_path):
  hu = np.full((24, 20, 12), -1000.0)
  hu[4:20, 3:17, 2:10] = np.linspace(-400, 1200, 16)[:, None, None]
  path = save_scaled(tmp_path / "v.nii.gz", hu, (1.0, 1.0, 2.0))
  wanted = params(shape=(16, 16, 8))
  volume = preprocess.volume_from_file(path, wanted)
  expected, _ = preprocess.preprocess(sources.load_nifti(path), wanted)
  assert volume.dtype == np.uint8 and volume.shape == (16, 16, 8)
  np.testing.assert_array_equal(volume, expected)


def test_a_volume_file_over_the_size_limit_is_refused_naming_it(tmp_path):
  path = save(tmp_path / "big.nii.gz", np.zeros((64, 64, 32), np.float32), np.eye(4))  # 0.5 MiB
  with pytest.raises(sources.BadVolume, match=r"big.nii.gz: declares 64x64x32 float32 voxels "
                                              r"\(0.50 MiB\), over data.max_volume_mib=0.4"):
    preprocess.volume_from_file(path, params(), max_volume_mib=0.4)


def test_released_mode_records_the_mm_per_voxel_of_the_stretched_crop():
  raw = np.full((40, 12, 6), -1000.0, np.float32)
  raw[4:33, 2:11, 1:5] = 300.0                   # crop 29 x 9 x 4, padded to 29 x 16 x 8
  source = sources.SourceVolume(raw, 1.0, 0.0, np.diag([0.5, 2.0, 3.0, 1.0]))
  volume, spacing = preprocess.preprocess(source, params(mode="released", shape=(16, 16, 8)))
  assert volume.dtype == np.uint8 and spacing.dtype == np.float32
  np.testing.assert_allclose(spacing, [29 * 0.5 / 16, 16 * 2.0 / 16, 8 * 3.0 / 8], rtol=1e-6)


def test_centre_crop_fitting_keeps_the_natural_size_down_to_one_voxel():
  wanted = params(shape=(16, 16, 8), spacing=(1.0, 1.0, 2.0), fit="crop")
  size = preprocess.target_size((30, 10, 3), np.array([1.0, 0.5, 0.25]), wanted)
  assert size == (30, 5, 1)        # natural (30, 5, 0.375): rounded, at least one voxel


def test_a_thin_body_keeps_one_voxel_when_shrunk_to_the_shape():
  wanted = params(shape=(16, 16, 8), spacing=(1.0, 1.0, 2.0))
  assert preprocess.target_size((30, 10, 1), np.array([0.5, 1.0, 0.25]), wanted) == (15, 10, 1)


def test_a_whole_field_of_view_keeps_its_edge_planes():
  """body_crop False and a shape equal to the source: every voxel windowed where it was."""
  hu = np.linspace(-1000, 1000, 16 * 16 * 8).reshape(16, 16, 8)
  source = sources.SourceVolume(hu.astype(np.float32), 1.0, 0.0, np.eye(4))
  volume, spacing = preprocess.preprocess(source, params(shape=(16, 16, 8), body_crop=False))
  np.testing.assert_array_equal(volume, np.rint((hu + 1000) / 2000 * 255).astype(np.uint8))
  assert spacing.dtype == np.float32
  np.testing.assert_allclose(spacing, [1.0, 1.0, 1.0])


def test_body_voxels_just_above_a_fractional_threshold_count():
  """slope 0.3: -500 HU is 1746.67 stored; 1747 (-499.9 HU) is body, its planes the box."""
  raw = np.zeros((6, 5, 4), np.int16)
  raw[1:4, 2:4, 1:3] = 1747
  source = sources.SourceVolume(raw, 0.3, -1024.0, np.eye(4))
  assert preprocess.body_box(source, -500.0) == [(1, 4), (2, 4), (1, 3)]


def test_planes_under_a_thousandth_of_body_voxels_are_ignored():
  """Planes of 100 x 100: 10 body voxels are 0.1% (ignored), 11 count; on small planes two."""
  raw = np.full((100, 100, 12), -1000, np.int16)
  raw[:, :, 4:8] = 40                          # the body: slices 4..7
  raw[:10, 0, 2] = 40                          # 10 voxels of slice 2: ignored
  raw[:11, 0, 9] = 40                          # 11 voxels of slice 9: counted
  source = sources.SourceVolume(raw, 1.0, 0.0, np.eye(4))
  assert preprocess.body_box(source, -500.0)[2] == (4, 10)
  small = np.full((4, 3, 5), -1000, np.int16)
  small[1:3, :, 1:3] = 40
  small[0, :2, 4] = 40                         # two voxels in a 12-voxel plane: counted
  assert preprocess.body_box(sources.SourceVolume(small, 1.0, 0.0, np.eye(4)), -500.0)[2] == (1, 5)


def test_a_dicom_folder_is_read_as_a_series_under_the_size_limit(tmp_path):
  raw = np.full((8, 6, 4), -1000, np.int16)
  raw[2:6, 1:5, 1:3] = 40
  folder = tmp_path / "series"
  phantom_layouts.write_dicom_series(str(folder), raw + 1024, np.diag([0.8, 0.8, 2.0, 1.0]),
                                     1.0, -1024.0)
  source = preprocess.load_source(str(folder))
  np.testing.assert_array_equal(source.raw * source.slope + source.inter, raw)
  with pytest.raises(sources.VolumeTooLarge, match="over data.max_volume_mib=1e-05"):
    preprocess.load_source(str(folder), max_volume_mib=1e-5)


@pytest.mark.parametrize("slab_slices", [None, 1, 3])
def test_released_mode_crops_to_the_foreground_whatever_the_slab_size(monkeypatch, slab_slices):
  """A foreground box exactly the shape (nothing padded or resized): min-max of the crop; the
  masks' slabs (one slice, three, or the whole volume) change nothing."""
  raw = np.full((9, 8, 10), -1000.0, np.float32)
  raw[1:4, 2:7, 2] = 100.0                       # x 1..3 in slice 2
  raw[4:7, 3:5, 5] = 700.0                       # x 4..6 in slice 5: the box x 1..6, z 2..5
  raw[2, 2, 3] = 300.0
  if slab_slices:
    monkeypatch.setattr(preprocess, "MASK_SLAB", 9 * 8 * slab_slices)
  unit, padded = preprocess.released_transform(raw, (6, 5, 4))
  crop = raw[1:7, 2:7, 2:6]
  assert padded == (6, 5, 4)
  np.testing.assert_allclose(unit, (crop + 1000) / 1700, rtol=1e-6, atol=1e-7)


def test_released_mode_pads_an_odd_shortfall_after_the_crop():
  """SpatialPad "symmetric": floor(d / 2) before, the rest after (here 0 and 1 along Y)."""
  raw = np.full((9, 8, 10), -1000.0, np.float32)
  raw[1:7, 2:7, 2:6] = np.linspace(-900, 900, 6 * 5 * 4).reshape(6, 5, 4)
  unit, padded = preprocess.released_transform(raw, (6, 6, 4))
  crop = np.pad(raw[1:7, 2:7, 2:6], ((0, 0), (0, 1), (0, 0)), constant_values=-1000.0)
  assert padded == (6, 6, 4)
  np.testing.assert_allclose(unit, (crop + 1000) / 1900, rtol=1e-6, atol=1e-7)


def test_a_negative_slope_gives_the_released_volume_of_its_hu():
  hu = np.full((8, 6, 5), -1000.0, np.float32)
  hu[1:7, 1:5, 1:4] = np.linspace(-800, 1200, 6 * 4 * 3).reshape(6, 4, 3)
  flipped = sources.SourceVolume(-hu, -1.0, 0.0, np.eye(4))     # HU = -raw
  plain = sources.SourceVolume(hu, 1.0, 0.0, np.eye(4))
  wanted = params(mode="released", shape=(6, 4, 3))
  np.testing.assert_array_equal(preprocess.preprocess(flipped, wanted)[0],
                                preprocess.preprocess(plain, wanted)[0])


def test_a_body_column_of_256_voxels_in_the_first_slab_counts():
  """A small plane gives slabs of 255 slices: a column of 256 body voxels from slice 0 would
  wrap a uint8 count to 0 in a slab one slice longer."""
  hu = np.full((4, 4, 300), -1000, np.int16)
  hu[1:3, :, :256] = 40
  source = sources.SourceVolume(hu, 1.0, 0.0, np.eye(4))
  assert preprocess.body_box(source, -500.0) == [(1, 3), (0, 4), (0, 256)]


def test_each_slice_is_counted_once_whatever_the_slab_size(monkeypatch):
  """Slabs of one slice: a lone voxel (at the first or the last slice) stays under the count a
  plane needs, however many slabs there are."""
  hu = np.full((10, 10, 40), -1000, np.int16)
  hu[2:8, 2:8, :] = 40
  hu[0, 0, 0] = hu[9, 9, 39] = 40                # planes x=0 and x=9 hold one voxel each
  monkeypatch.setattr(preprocess, "MASK_SLAB", 10 * 10)
  source = sources.SourceVolume(hu, 1.0, 0.0, np.eye(4))
  assert preprocess.body_box(source, -500.0) == reference_body_box(hu, 1.0, 0.0, -500.0) == [
      (2, 8), (2, 8), (0, 40)]
