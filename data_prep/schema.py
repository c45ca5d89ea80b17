"""The one definition of a converted study record and of a converted dataset (writer:
data_prep/convert.py, reader: medfinder_jax/input_pipeline.py), in plain Python (no
TensorFlow: the train step and the benchmarks use it on machines without it).

`feature_specs` describes every feature (convert.py turns it into the tfds FeaturesDict). A
converted dataset is read with `tfds.builder_from_directory(dir)`; its metadata.json holds the
PreprocessParams it was made with and the split rule; `DatasetSpec` is what a reader keeps of
it (directory, preprocessing, split sizes, label columns), and `Intensity` maps its stored
voxels to the model's input.

Volume layout: axis order X, Y, Z. In `ct` mode the array is RAS+ canonical: index increases
towards the patient's Right (X), Anterior (Y), Superior (Z). In `released` mode it is the source file's
raw voxel order (the released code does not reorient).
"""

import dataclasses
import zlib

import numpy as np

SCHEMA_VERSION = 3                      # 3: labels, scan/patient ids, series, HU scaling; 2: "released"
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
SCAN_ID = "scan_id"                     # groups reconstructions of one scan (CT-RATE); else study_id
PATIENT_ID = "patient_id"               # the corpus's pseudonymous patient key (CT-RATE); else ""
SERIES_UID = "series_uid"               # SeriesInstanceUID of a DICOM series; "" for NIfTI
HU_SCALING = "hu_scaling"               # (slope, intercept) applied: HU = stored * slope + intercept
HU_SOURCE = "hu_source"                 # where that scaling came from ("header", "metadata", ...)
LABELS = "labels"                       # multi-hot int8 (L,), names in DatasetSpec.label_names

VOLUME_DTYPES = ("uint8", "int16")
VOLUME_ENCODING = "zlib"                # volume bytes (C order) compressed with zlib
VOLUME_ZLIB_LEVEL = 1                   # 4-5x faster than zlib's default 6, files ~15% larger


def feature_specs(shape, volume_dtype, label_columns=(), num_labels=0):
  """{name: (kind, dtype, shape)} for every feature; kind is "tensor" or "text".

  `shape` is the stored volume's (X, Y, Z); `label_columns` are extra CSV columns kept as text;
  `num_labels` > 0 adds the multi-hot LABELS vector (a corpus with label names, e.g. CT-RATE).
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
      SCAN_ID: ("text", "string", ()),
      PATIENT_ID: ("text", "string", ()),
      SERIES_UID: ("text", "string", ()),
      HU_SCALING: ("tensor", "float32", (2,)),
      HU_SOURCE: ("text", "string", ()),
  }
  if num_labels:
    specs[LABELS] = ("tensor", "int8", (int(num_labels),))
  for column in label_columns:
    if column in specs:
      raise ValueError(f"label column {column!r} collides with the built-in feature of that name; "
                       f"rename the CSV column or drop it from data.label_columns")
    specs[column] = ("text", "string", ())
  return specs


def encode_volume(volume, shape, volume_dtype):
  """The stored form of `volume`: zlib(C-order bytes), as tfds' Tensor(encoding="zlib") decodes.

  tfds compresses at zlib's default level; this writes the same format at VOLUME_ZLIB_LEVEL.
  """
  if volume.dtype != np.dtype(volume_dtype) or tuple(volume.shape) != tuple(shape):
    raise ValueError(f"volume is {volume.dtype}{tuple(volume.shape)}, the schema expects "
                     f"{volume_dtype}{tuple(shape)}")
  return zlib.compress(np.ascontiguousarray(volume).tobytes(), VOLUME_ZLIB_LEVEL)


def label_columns_of(feature_names):
  """The label columns among a dataset's feature names (everything that is not built in)."""
  built_in = set(feature_specs((1, 1, 1), "uint8", num_labels=1))
  return tuple(name for name in feature_names if name not in built_in)


def check_volume_dtype(volume_dtype):
  if volume_dtype not in VOLUME_DTYPES:
    raise ValueError(f"volume dtype {volume_dtype!r} is not supported; expected one of "
                     f"{VOLUME_DTYPES}")


# --- Preprocessing and the dataset spec -----------------------------------------------------------

PREPROCESS_MODES = ("ct", "released")
FIT_RULES = ("shrink", "crop")          # a body larger than `shape`: shrink it (ours) | centre crop
INTENSITIES = ("unit", "hu/1000")       # model input: window -> [0, 1] | HU / 1000 (CT-CLIP)


@dataclasses.dataclass(frozen=True)
class Intensity:
  """Stored voxels -> the model's input: `volume * scale + offset` as float32 ([0, 1] for the
  "unit" mapping, [-1, 1] for CT-CLIP's "hu/1000" of a [-1000, 1000] window), with a trailing
  channel axis, (B, X, Y, Z) -> (B, X, Y, Z, 1). Works on numpy and jax arrays, so the
  train step, the encoders and the tests all apply the one mapping."""
  scale: float
  offset: float

  def __call__(self, volume):
    return (volume.astype("float32") * self.scale + self.offset)[..., None]


@dataclasses.dataclass(frozen=True)
class PreprocessParams:
  """What turns a source volume into a record volume: written once by conversion into the
  dataset metadata, carried by the DatasetSpec, stored in checkpoints and indexes."""
  mode: str = "ct"                       # "ct" | "released" (see data_prep/preprocess.py)
  shape: tuple = (224, 224, 96)          # X, Y, Z voxels
  spacing: tuple = (1.5, 1.5, 3.0)       # mm per voxel (X, Y, Z); () = plain resize to `shape`
  hu_window: tuple = (-1000.0, 1000.0)   # HU mapped to [0, 1]
  volume_dtype: str = "uint8"            # "uint8" | "int16"
  body_threshold_hu: float = -500.0      # body = voxels above this HU (ct mode)
  body_crop: bool = True                 # ct mode: crop to the body before fitting (CT-CLIP: no)
  fit: str = "shrink"                    # ct mode: FIT_RULES, for a volume larger than `shape`
  intensity_mapping: str = "unit"        # INTENSITIES: what the model sees of the stored HU

  def __post_init__(self):
    problem = self.problem()
    if problem:
      raise ValueError(problem)

  def problem(self):
    """Why these values cannot preprocess a volume (naming the data.* field), or None."""
    if self.mode not in PREPROCESS_MODES:
      return f"data.preprocess={self.mode!r}; expected one of {PREPROCESS_MODES}"
    if len(self.shape) != 3 or min(self.shape) < 1:
      return f"data.shape={self.shape}; expected three positive voxel counts X,Y,Z"
    if self.spacing and (len(self.spacing) != 3 or min(self.spacing) <= 0):
      return f"data.spacing={self.spacing}; expected () or three positive mm values"
    if len(self.hu_window) != 2 or not self.hu_window[0] < self.hu_window[1]:
      return f"data.hu_window={self.hu_window}; expected (low, high) with low < high"
    if self.volume_dtype not in VOLUME_DTYPES:
      return f"data.volume_dtype={self.volume_dtype!r}; expected one of {VOLUME_DTYPES}"
    if self.volume_dtype == "int16" and (self.hu_window[0] < -32768 or self.hu_window[1] > 32767):
      return f"data.hu_window={self.hu_window} does not fit int16 volumes"
    if self.mode == "released" and self.volume_dtype != "uint8":
      return ("data.preprocess='released' scales each volume to [0, 1] (no HU); it needs "
              "data.volume_dtype='uint8'")
    if self.fit not in FIT_RULES:
      return f"data.fit={self.fit!r}; expected one of {FIT_RULES}"
    if self.intensity_mapping not in INTENSITIES:
      return f"data.intensity_mapping={self.intensity_mapping!r}; expected one of {INTENSITIES}"
    if self.intensity_mapping == "hu/1000" and self.volume_dtype != "int16":
      return ("data.intensity_mapping='hu/1000' maps stored HU to the model's input; it needs "
              "data.volume_dtype='int16'")
    if not isinstance(self.body_crop, bool):
      return f"data.body_crop={self.body_crop!r}; expected true or false"
    return None

  @classmethod
  def from_config(cls, data_config):
    """From the config's `data` section; ValueError naming the bad field."""
    return cls(mode=str(data_config.preprocess),
               shape=tuple(int(s) for s in data_config.shape),
               spacing=tuple(float(s) for s in data_config.spacing),
               hu_window=tuple(float(v) for v in data_config.hu_window),
               volume_dtype=str(data_config.volume_dtype),
               body_threshold_hu=float(data_config.get("body_threshold_hu",
                                                       cls.body_threshold_hu)),
               body_crop=data_config.get("body_crop", cls.body_crop),
               fit=str(data_config.get("fit", cls.fit)),
               intensity_mapping=str(data_config.get("intensity_mapping",
                                                     cls.intensity_mapping)))

  @classmethod
  def from_dict(cls, values, source):
    """From to_dict()'s form (JSON lists back to tuples); ValueError naming `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(values, dict) or not set(values) <= names:
      raise ValueError(f"{source}: expected the preprocessing fields {sorted(names)}, found "
                       f"{values!r}")
    try:
      return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as err:
      raise ValueError(f"{source}: recorded preprocessing {values}: {err}") from None

  def to_dict(self):
    return {k: list(v) if isinstance(v, tuple) else v
            for k, v in dataclasses.asdict(self).items()}

  @property
  def intensity(self):
    """Intensity of the stored volumes: uint8 stores round(255 u); int16 stores the HU value
    clipped to hu_window (lo, hi), so u = (HU - lo) / (hi - lo). Both map air to 0. The
    "hu/1000" mapping (CT-CLIP) gives HU / 1000 of the int16 HU instead (air -1)."""
    if self.intensity_mapping == "hu/1000":
      return Intensity(1.0 / 1000.0, 0.0)
    if self.volume_dtype == "uint8":
      return Intensity(1.0 / 255.0, 0.0)
    lo, hi = (float(v) for v in self.hu_window)
    return Intensity(1.0 / (hi - lo), -lo / (hi - lo))

  def describe(self):
    """One line for messages: every field, as a user would pass it."""
    spacing = "x".join(f"{s:g}" for s in self.spacing) + " mm" if self.spacing else "none"
    return (f"preprocess={self.mode}, shape={list(self.shape)}, spacing={spacing}, "
            f"hu_window={list(self.hu_window)}, body_threshold_hu={self.body_threshold_hu:g}, "
            f"volume_dtype={self.volume_dtype}, body_crop={self.body_crop}, fit={self.fit}, "
            f"intensity_mapping={self.intensity_mapping}")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the model, the train step and inference need to know about a converted dataset
  (read by medfinder_jax.input_pipeline.open_dataset; plain Python, so the train step and the
  benchmarks need no TensorFlow). A checkpoint stores it, so a trained model knows how its
  volumes were made."""
  directory: str
  preprocess: PreprocessParams
  split_sizes: dict = dataclasses.field(default_factory=dict)   # split -> number of studies
  label_columns: tuple = ()
  label_names: tuple = ()       # the LABELS vector's entries, in order (e.g. CT-RATE's 18)

  @property
  def shape(self):
    """Stored volume shape (X, Y, Z)."""
    return tuple(self.preprocess.shape)

  @property
  def volume_dtype(self):
    return self.preprocess.volume_dtype

  @property
  def intensity(self):
    return self.preprocess.intensity

  def to_dict(self):
    return {"directory": self.directory, "preprocess": self.preprocess.to_dict(),
            "split_sizes": dict(self.split_sizes), "label_columns": list(self.label_columns),
            "label_names": list(self.label_names)}

  @classmethod
  def from_dict(cls, values, source):
    """From to_dict()'s form; ValueError naming `source` when it is not one."""
    if not isinstance(values, dict) or "preprocess" not in values:
      raise ValueError(f"{source}: no dataset spec with its preprocessing recorded")
    return cls(directory=str(values.get("directory", "")),
               preprocess=PreprocessParams.from_dict(values["preprocess"], source),
               split_sizes={str(k): int(v) for k, v in (values.get("split_sizes") or {}).items()},
               label_columns=tuple(values.get("label_columns") or ()),
               label_names=tuple(values.get("label_names") or ()))
