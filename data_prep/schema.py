"""The one definition of a converted study record (writer: data_prep/, reader: input_pipeline).

Pure-Python constants describe every feature; `features_dict()` builds the matching
`tfds.features.FeaturesDict` (tensorflow_datasets is imported only there). A converted dataset is
read with `tfds.builder_from_directory(dir)`; `builder.info.metadata` holds the preprocessing
parameters and the split rule (see data_prep/convert.py).

Volume layout: axis order X, Y, Z. In `ct` mode the array is RAS+ canonical: index increases
towards the patient's Right (X), Anterior (Y), Superior (Z). In `released` mode it is the source file's
raw voxel order (the released code does not reorient).
"""

import dataclasses

SCHEMA_VERSION = 2                      # 2: preprocessing mode "released" (was "seed")
DATASET_NAME = "medfinder_ct"           # files: medfinder_ct-<split>.tfrecord-<i>-of-<n>
FILE_FORMAT = "tfrecord"
SPLITS = ("train", "val", "test")

# Feature names.
VOLUME = "volume"                       # preprocessed volume, fixed shape (X, Y, Z)
REPORT = "report"                       # report text (UTF-8)
STUDY_ID = "study_id"                   # file basename without .nii(.gz); unique in a dataset
SOURCE_PATH = "source_path"             # volume file relative to data_root, '/' separators
SHAPE = "shape"                         # source voxel counts, in the source file's axis order
SPACING = "spacing"                     # source voxel size in mm, in the source file's axis order
ORIENTATION = "orientation"             # source axis codes (nibabel aff2axcodes), e.g. "LPS"
VOLUME_SPACING = "volume_spacing"       # mm per voxel of `volume` along X, Y, Z (before padding)

VOLUME_DTYPES = ("uint8", "int16")
VOLUME_ENCODING = "zlib"                # volume bytes (C order) compressed with zlib
VOLUME_ZLIB_LEVEL = 1                   # 4-5x faster than zlib's default 6, files ~15% larger


def feature_specs(shape, volume_dtype, label_columns=()):
  """{name: (kind, dtype, shape)} for every feature; kind is "tensor" or "text".

  `shape` is the stored volume's (X, Y, Z); `label_columns` are extra CSV columns kept as text.
  """
  check_volume_dtype(volume_dtype)
  specs = {
      VOLUME: ("tensor", volume_dtype, tuple(int(s) for s in shape)),
      SHAPE: ("tensor", "int32", (3,)),
      SPACING: ("tensor", "float32", (3,)),
      VOLUME_SPACING: ("tensor", "float32", (3,)),
      ORIENTATION: ("text", "string", ()),
      REPORT: ("text", "string", ()),
      STUDY_ID: ("text", "string", ()),
      SOURCE_PATH: ("text", "string", ()),
  }
  for column in label_columns:
    if column in specs:
      raise ValueError(f"label column {column!r} collides with the built-in feature of that name; "
                       f"rename the CSV column or drop it from data.label_columns")
    specs[column] = ("text", "string", ())
  return specs


def features_dict(shape, volume_dtype, label_columns=()):
  """The tfds FeaturesDict for records of this shape/dtype (the volume zlib-compressed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = {}
  for name, (kind, dtype, dims) in feature_specs(shape, volume_dtype, label_columns).items():
    if kind == "text":
      features[name] = tfds.features.Text()
    elif name == VOLUME:
      features[name] = tfds.features.Tensor(shape=dims, dtype=np.dtype(dtype),
                                            encoding=VOLUME_ENCODING)
    else:
      features[name] = tfds.features.Tensor(shape=dims, dtype=np.dtype(dtype))
  return tfds.features.FeaturesDict(features)


def encode_volume(volume, shape, volume_dtype):
  """The stored form of `volume`: zlib(C-order bytes), as tfds' Tensor(encoding="zlib") decodes.

  tfds compresses at zlib's default level; this writes the same format at VOLUME_ZLIB_LEVEL.
  """
  import zlib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if volume.dtype != np.dtype(volume_dtype) or tuple(volume.shape) != tuple(shape):
    raise ValueError(f"volume is {volume.dtype}{tuple(volume.shape)}, the schema expects "
                     f"{volume_dtype}{tuple(shape)}")
  return zlib.compress(np.ascontiguousarray(volume).tobytes(), VOLUME_ZLIB_LEVEL)


def label_columns_of(feature_names):
  """The label columns among a dataset's feature names (everything that is not built in)."""
  built_in = set(feature_specs((1, 1, 1), "uint8"))
  return tuple(name for name in feature_names if name not in built_in)


def check_volume_dtype(volume_dtype):
  if volume_dtype not in VOLUME_DTYPES:
    raise ValueError(f"volume dtype {volume_dtype!r} is not supported; expected one of "
                     f"{VOLUME_DTYPES}")


def unit_scale_offset(volume_dtype, hu_window):
  """(scale, offset) so that `volume * scale + offset` is the [0, 1] intensity of a record.

  uint8 volumes store round(255 * u); int16 volumes store the HU value clipped to `hu_window`
  (lo, hi), so u = (HU - lo) / (hi - lo). Both map air (below lo) to 0.
  """
  check_volume_dtype(volume_dtype)
  if volume_dtype == "uint8":
    return 1.0 / 255.0, 0.0
  lo, hi = (float(v) for v in hu_window)
  return 1.0 / (hi - lo), -lo / (hi - lo)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the model and the train step need to know about a converted dataset (built by
  medfinder_jax.input_pipeline.open_dataset; plain Python, so the train step and benchmarks
  need no TensorFlow)."""
  directory: str
  shape: tuple          # stored volume (X, Y, Z)
  volume_dtype: str     # "uint8" | "int16"
  unit_scale: float     # volume * unit_scale + unit_offset = [0, 1] intensity
  unit_offset: float
  split_sizes: dict     # split -> number of studies
  label_columns: tuple
