"""The record schema and the preprocessing parameters a dataset is made with (plain Python:
no TensorFlow, no dataset; conversion and the input pipeline are tested on real records in
test_convert.py and test_input_pipeline.py)."""

import zlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_prep import schema

BUILT_IN = {
    "volume": ("tensor", "int16", (4, 3, 2)),
    "shape": ("tensor", "int32", (3,)),
    "spacing": ("tensor", "float32", (3,)),
    "volume_spacing": ("tensor", "float32", (3,)),
    "orientation": ("text", "string", ()),
    "report": ("text", "string", ()),
    "study_id": ("text", "string", ()),
    "source_path": ("text", "string", ()),
    "scan_id": ("text", "string", ()),
    "patient_id": ("text", "string", ()),
    "series_uid": ("text", "string", ()),
    "hu_scaling": ("tensor", "float32", (2,)),
    "hu_source": ("text", "string", ()),
}


# --- features -----------------------------------------------------------------------------------

def test_every_record_holds_the_built_in_features():
  assert schema.feature_specs((4, 3, 2), "int16") == BUILT_IN


def test_labels_and_label_columns_are_added_when_asked():
  specs = schema.feature_specs([4, 3, 2], "uint8", label_columns=("findings", "site"),
                               num_labels=18)
  assert specs["volume"] == ("tensor", "uint8", (4, 3, 2))
  assert specs["labels"] == ("tensor", "int8", (18,))
  assert specs["findings"] == specs["site"] == ("text", "string", ())
  assert len(specs) == len(BUILT_IN) + 3


def test_a_label_column_named_like_a_built_in_feature_is_refused():
  with pytest.raises(ValueError, match="label column 'report' collides with the built-in"):
    schema.feature_specs((4, 3, 2), "uint8", label_columns=("report",))


def test_an_unsupported_volume_dtype_is_refused():
  with pytest.raises(ValueError, match=r"volume dtype 'float32' is not supported; expected one "
                                       r"of \('uint8', 'int16'\)"):
    schema.feature_specs((4, 3, 2), "float32")


def test_label_columns_are_the_features_that_are_not_built_in():
  names = ["volume", "findings", "report", "labels", "site", "hu_source"]
  assert schema.label_columns_of(names) == ("findings", "site")


# --- volume encoding ----------------------------------------------------------------------------

def test_a_volume_is_stored_as_zlib_of_its_c_order_bytes():
  volume = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(4, 3, 2) - 7)
  stored = schema.encode_volume(volume, (4, 3, 2), "int16")
  assert stored == zlib.compress(np.ascontiguousarray(volume).tobytes(), 1)
  decoded = np.frombuffer(zlib.decompress(stored), np.int16).reshape(4, 3, 2)
  np.testing.assert_array_equal(decoded, volume)


@pytest.mark.parametrize("volume", [np.zeros((4, 3, 2), np.uint8), np.zeros((4, 3, 3), np.int16)])
def test_a_volume_unlike_the_schema_is_refused(volume):
  with pytest.raises(ValueError, match=rf"volume is {volume.dtype}\({volume.shape[0]}, 3, "
                                       rf"{volume.shape[2]}\), the schema expects int16\(4, 3, 2\)"):
    schema.encode_volume(volume, (4, 3, 2), "int16")


# --- intensity ----------------------------------------------------------------------------------

def test_uint8_volumes_become_unit_floats_with_a_channel_axis():
  intensity = schema.PreprocessParams().intensity
  out = intensity(np.array([[0, 51, 255]], np.uint8))
  assert out.shape == (1, 3, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], [[0.0, 0.2, 1.0]], rtol=1e-6)


def test_int16_volumes_map_the_hu_window_to_0_1():
  params = schema.PreprocessParams(volume_dtype="int16", hu_window=(-1000.0, 3000.0))
  out = params.intensity(jnp.array([-1000, 0, 1000, 3000], jnp.int16))
  np.testing.assert_allclose(np.asarray(out)[:, 0], [0.0, 0.25, 0.5, 1.0], rtol=1e-6)


def test_the_hu_over_1000_mapping_divides_stored_hu_by_1000():
  params = schema.PreprocessParams(volume_dtype="int16", intensity_mapping="hu/1000")
  out = params.intensity(np.array([-1000, 0, 500], np.int16))
  np.testing.assert_allclose(out[:, 0], [-1.0, 0.0, 0.5], rtol=1e-6)


# --- preprocessing parameters -------------------------------------------------------------------

@pytest.mark.parametrize("fields, message", [
    ({"mode": "raw"}, r"data.preprocess='raw'; expected one of \('ct', 'released'\)"),
    ({"shape": (16, 16)}, r"data.shape=\(16, 16\); expected three positive voxel counts"),
    ({"shape": (16, 0, 8)}, r"data.shape=\(16, 0, 8\)"),
    ({"spacing": (1.0, 1.0)}, r"data.spacing=\(1.0, 1.0\); expected \(\) or three positive mm"),
    ({"spacing": (1.0, 0.0, 1.0)}, r"data.spacing=\(1.0, 0.0, 1.0\)"),
    ({"hu_window": (100.0, 100.0)}, r"data.hu_window=\(100.0, 100.0\); expected \(low, high\) "
                                    r"with low < high"),
    ({"hu_window": (-1000.0,)}, r"data.hu_window=\(-1000.0,\)"),
    ({"volume_dtype": "float32"}, r"data.volume_dtype='float32'; expected one of"),
    ({"volume_dtype": "int16", "hu_window": (-32769.0, 0.0)}, "does not fit int16 volumes"),
    ({"volume_dtype": "int16", "hu_window": (0.0, 32768.0)}, "does not fit int16 volumes"),
    ({"mode": "released", "volume_dtype": "int16"}, "it needs data.volume_dtype='uint8'"),
    ({"fit": "squeeze"}, r"data.fit='squeeze'; expected one of \('shrink', 'crop'\)"),
    ({"intensity_mapping": "hu"}, r"data.intensity_mapping='hu'; expected one of"),
    ({"intensity_mapping": "hu/1000"}, "it needs data.volume_dtype='int16'"),
    ({"body_crop": "yes"}, "data.body_crop='yes'; expected true or false"),
])
def test_parameters_that_cannot_preprocess_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    schema.PreprocessParams(**fields)


@pytest.mark.parametrize("fields", [
    {"shape": (1, 1, 1), "spacing": ()},
    {"spacing": (0.5, 0.5, 0.5)},
    {"volume_dtype": "int16", "hu_window": (-32768.0, 32767.0)},
    {"mode": "released"},
    {"fit": "crop", "body_crop": False},
    {"volume_dtype": "int16", "intensity_mapping": "hu/1000"},
])
def test_valid_parameters_are_accepted(fields):
  params = schema.PreprocessParams(**fields)
  assert params.problem() is None
  for name, value in fields.items():
    assert getattr(params, name) == value


def _data_config(**fields):
  values = dict(preprocess="ct", shape=[32, 24, 16], spacing=[1, 2, 3], hu_window=[-900, 700],
                volume_dtype="int16")
  return ml_collections.ConfigDict({**values, **fields})


def test_from_config_reads_every_field_and_defaults_the_optional_ones():
  params = schema.PreprocessParams.from_config(_data_config())
  assert params == schema.PreprocessParams(
      mode="ct", shape=(32, 24, 16), spacing=(1.0, 2.0, 3.0), hu_window=(-900.0, 700.0),
      volume_dtype="int16", body_threshold_hu=-500.0, body_crop=True, fit="shrink",
      intensity_mapping="unit")
  custom = schema.PreprocessParams.from_config(_data_config(
      body_threshold_hu=-300, body_crop=False, fit="crop", intensity_mapping="hu/1000"))
  assert (custom.body_threshold_hu, custom.body_crop, custom.fit, custom.intensity_mapping) == (
      -300.0, False, "crop", "hu/1000")


def test_parameters_survive_their_json_form():
  params = schema.PreprocessParams(shape=(32, 24, 16), spacing=(), hu_window=(-900.0, 700.0),
                                   volume_dtype="int16", body_crop=False, fit="crop")
  stored = params.to_dict()
  assert stored["shape"] == [32, 24, 16] and stored["spacing"] == []
  assert stored["hu_window"] == [-900.0, 700.0] and stored["fit"] == "crop"
  assert schema.PreprocessParams.from_dict(stored, "metadata.json") == params


@pytest.mark.parametrize("values, message", [
    (None, r"metadata.json: expected the preprocessing fields \['body_crop'"),
    ({"mode": "ct", "zoom": 2}, r"metadata.json: expected the preprocessing fields .*'zoom': 2"),
    ({"shape": [16, 16]}, r"metadata.json: recorded preprocessing \{'shape': \[16, 16\]\}: "
                          r"data.shape=\(16, 16\)"),
])
def test_bad_recorded_parameters_name_the_file(values, message):
  with pytest.raises(ValueError, match=message):
    schema.PreprocessParams.from_dict(values, "metadata.json")


def test_describe_lists_every_field_as_a_user_passes_it():
  assert schema.PreprocessParams().describe() == (
      "preprocess=ct, shape=[224, 224, 96], spacing=1.5x1.5x3 mm, hu_window=[-1000.0, 1000.0], "
      "body_threshold_hu=-500, volume_dtype=uint8, body_crop=True, fit=shrink, "
      "intensity_mapping=unit")
  assert "spacing=none," in schema.PreprocessParams(spacing=()).describe()


# --- dataset spec -------------------------------------------------------------------------------

def test_a_dataset_spec_survives_its_dict_form():
  spec = schema.DatasetSpec(
      directory="data/ds", preprocess=schema.PreprocessParams(shape=(8, 8, 4), volume_dtype="int16"),
      split_sizes={"train": 28, "test": 8}, label_columns=("findings",),
      label_names=("Emphysema", "Atelectasis"))
  stored = spec.to_dict()
  assert stored["label_columns"] == ["findings"]
  assert stored["label_names"] == ["Emphysema", "Atelectasis"]
  assert stored["split_sizes"] == {"train": 28, "test": 8}
  assert schema.DatasetSpec.from_dict(stored, "checkpoint") == spec
  assert spec.shape == (8, 8, 4) and spec.volume_dtype == "int16"
  assert spec.intensity == spec.preprocess.intensity


def test_a_dataset_spec_from_an_older_record_gets_empty_defaults():
  spec = schema.DatasetSpec.from_dict(
      {"preprocess": schema.PreprocessParams().to_dict(), "split_sizes": {"val": "4"},
       "label_columns": None}, "checkpoint")
  assert spec.directory == "" and spec.split_sizes == {"val": 4}
  assert spec.label_columns == () and spec.label_names == ()


@pytest.mark.parametrize("values", [None, {"directory": "x"}])
def test_a_dataset_spec_without_preprocessing_names_the_source(values):
  with pytest.raises(ValueError, match="checkpoint: no dataset spec with its preprocessing"):
    schema.DatasetSpec.from_dict(values, "checkpoint")


def test_from_config_reads_the_released_mode():
  data = _data_config(preprocess="released", volume_dtype="uint8")
  assert schema.PreprocessParams.from_config(data).mode == "released"


def test_a_dataset_spec_with_bad_preprocessing_names_the_source():
  with pytest.raises(ValueError, match=r"checkpoint: recorded preprocessing .*data.fit='x'"):
    schema.DatasetSpec.from_dict({"preprocess": {"fit": "x"}}, "checkpoint")
