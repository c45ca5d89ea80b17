"""embeddings.npz and metrics.json: round trips, and errors that name the file and the field."""

import json

import numpy as np
import pytest

from medfinder_jax import interchange


def embedding_fields(n=12, d=6, seed=0, **extra):
  rng = np.random.default_rng(seed)
  fields = {"image_embeddings": rng.normal(size=(n, d)).astype(np.float32),
            "text_embeddings": rng.normal(size=(n, d)).astype(np.float32),
            "study_ids": np.array([f"study{i:03d}" for i in range(n)])}
  fields.update(extra)
  return fields


def write_npz(path, fields):
  np.savez(path, **fields)
  return str(path)


def test_round_trip_keeps_every_field(tmp_path):
  fields = embedding_fields(
      reports=np.array([f"report {i}" for i in range(12)]),
      source_paths=np.array([f"CT1/ct/{i}.nii.gz" for i in range(12)]),
      keywords=np.array(["atelectasis", "nodule"]),
      keyword_embeddings=np.ones((2, 6), np.float32),
      keyword_relevance=np.eye(2, 12, dtype=bool))
  path = interchange.save_embeddings(str(tmp_path / "e.npz"), fields)
  loaded = interchange.load_embeddings(path)
  assert (loaded.n, loaded.dim) == (12, 6)
  for name, value in fields.items():
    np.testing.assert_array_equal(getattr(loaded, name), value)


def test_optional_fields_may_be_absent_and_half_precision_is_accepted(tmp_path):
  fields = embedding_fields()
  fields["image_embeddings"] = fields["image_embeddings"].astype(np.float16)
  loaded = interchange.load_embeddings(write_npz(tmp_path / "e.npz", fields))
  assert loaded.reports is None and loaded.keywords is None
  assert loaded.image_embeddings.dtype == np.float32


@pytest.mark.parametrize("change,field,message", [
    (dict(text_embeddings=np.zeros((11, 6))), "text_embeddings", "has 11 rows, expected 12"),
    (dict(text_embeddings=np.zeros((12, 5))), "text_embeddings", "D=5, expected D=6"),
    (dict(image_embeddings=np.zeros(12)), "image_embeddings", "2-D"),
    (dict(image_embeddings=np.zeros((12, 6, 1))), "image_embeddings", "2-D"),
    (dict(study_ids=np.array(["a"] * 12)), "study_ids", "more than once"),
    (dict(study_ids=np.arange(12)), "study_ids", "expected strings"),
    (dict(reports=np.array(["r"] * 3)), "reports", "expected 12 strings"),
])
def test_inconsistent_fields_are_named_with_what_was_found_and_expected(tmp_path, change, field,
                                                                        message):
  path = write_npz(tmp_path / "bad.npz", embedding_fields(**change))
  with pytest.raises(interchange.InterchangeError) as err:
    interchange.load_embeddings(path)
  assert str(path) in str(err.value) and repr(field) in str(err.value)
  assert message in str(err.value)


def test_nan_and_inf_rows_are_reported_by_row(tmp_path):
  fields = embedding_fields()
  fields["image_embeddings"][3, 1] = np.nan
  fields["image_embeddings"][7, 0] = np.inf
  with pytest.raises(interchange.InterchangeError, match=r"2 row\(s\) contain NaN or Inf "
                                                         r"\(rows 3, 7\)"):
    interchange.load_embeddings(write_npz(tmp_path / "nan.npz", fields))


def test_missing_required_fields_are_listed(tmp_path):
  fields = embedding_fields()
  del fields["study_ids"]
  with pytest.raises(interchange.InterchangeError, match=r"missing required field\(s\) "
                                                         r"\['study_ids'\]"):
    interchange.load_embeddings(write_npz(tmp_path / "e.npz", fields))


def test_files_that_are_not_npz_archives_are_rejected(tmp_path):
  text = tmp_path / "notes.npz"
  text.write_text("not an archive")
  with pytest.raises(interchange.InterchangeError, match="not a readable .npz archive"):
    interchange.load_embeddings(str(text))
  single = tmp_path / "single.npy"
  np.save(single, np.zeros((3, 3)))
  with pytest.raises(interchange.InterchangeError, match="single .npy array"):
    interchange.load_embeddings(str(single))
  with pytest.raises(interchange.InterchangeError, match="no such file"):
    interchange.load_embeddings(str(tmp_path / "absent.npz"))


def test_pickled_object_arrays_are_refused(tmp_path):
  fields = embedding_fields(reports=np.array([f"r{i}" for i in range(12)], dtype=object))
  with pytest.raises(interchange.InterchangeError, match="'reports'.*unpickling"):
    interchange.load_embeddings(write_npz(tmp_path / "obj.npz", fields))


def test_keyword_queries_need_embeddings_and_relevance_labels(tmp_path):
  only_names = embedding_fields(keywords=np.array(["nodule"]))
  with pytest.raises(interchange.InterchangeError, match="keyword_embeddings"):
    interchange.validate(only_names, "x.npz")
  no_labels = embedding_fields(keywords=np.array(["nodule"]),
                               keyword_embeddings=np.ones((1, 6)))
  with pytest.raises(interchange.InterchangeError, match="'reports'.*'keyword_relevance'"):
    interchange.validate(no_labels, "x.npz")
  wrong_dim = embedding_fields(keywords=np.array(["nodule"]), keyword_embeddings=np.ones((1, 4)),
                               reports=np.array(["r"] * 12))
  with pytest.raises(interchange.InterchangeError, match="'keyword_embeddings'.*D=4"):
    interchange.validate(wrong_dim, "x.npz")


def test_saving_invalid_embeddings_writes_nothing(tmp_path):
  path = tmp_path / "e.npz"
  with pytest.raises(interchange.InterchangeError):
    interchange.save_embeddings(str(path), embedding_fields(text_embeddings=np.zeros((2, 6))))
  assert list(tmp_path.iterdir()) == []


def test_metrics_json_is_strict_json_with_null_for_metrics_that_do_not_apply(tmp_path):
  metrics = {"t2i": {"R@1": np.float64(12.5)}, "i2t": {"R@1": 10.0}, "n": np.int64(8),
             "keywords": {"nodule": {"P@100": None, "ci": {"P@20": np.array([1.0, 2.0])}}}}
  path = interchange.write_metrics_json(str(tmp_path / "m" / "metrics.json"), metrics)
  data = json.loads(open(path).read())
  assert data["t2i"]["R@1"] == 12.5 and data["n"] == 8
  assert data["keywords"]["nodule"] == {"P@100": None, "ci": {"P@20": [1.0, 2.0]}}
  assert interchange.read_metrics_json(path) == data
  with pytest.raises(ValueError):
    interchange.write_metrics_json(str(tmp_path / "nan.json"), {"t2i": {"MnR": float("nan")}})


def add_member(npz_path, name, payload):
  """Appends a raw member to an .npz (zip) archive, deflate-compressed."""
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(npz_path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
    archive.writestr(name, payload)


def npy_header(shape, dtype="<f4"):
  """The bytes of a .npy header declaring `shape` of `dtype` (no data)."""
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False,
                                                "shape": shape})
  return buffer.getvalue()


def test_members_that_are_not_fields_are_never_read(tmp_path):
  """A 200 MB deflate bomb beside the fields costs nothing: only the known fields are read."""
  import tracemalloc  # pylint: disable=import-outside-toplevel
  path = write_npz(tmp_path / "e.npz", embedding_fields())
  add_member(path, "padding.npy", npy_header((50_000_000,)) + bytes(200_000_000))
  tracemalloc.start()
  loaded = interchange.load_embeddings(path)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert loaded.n == 12 and peak < 20 * 2**20


def test_a_field_whose_header_declares_more_than_it_holds_is_refused_before_allocating(
    tmp_path):
  fields = embedding_fields()
  del fields["text_embeddings"]
  path = write_npz(tmp_path / "e.npz", fields)
  add_member(path, "text_embeddings.npy", npy_header((10**7, 10**7)) + bytes(96))
  with pytest.raises(interchange.InterchangeError, match=r"'text_embeddings': declares "
                                                         r"\(10000000, 10000000\) float32"):
    interchange.load_embeddings(path)


def test_a_field_larger_than_the_memory_budget_is_refused(tmp_path):
  path = write_npz(tmp_path / "e.npz", embedding_fields())
  with pytest.raises(interchange.InterchangeError, match="'image_embeddings'.*more than the"):
    interchange.load_embeddings(path, max_bytes=100)


def test_byte_string_ids_must_be_utf8_text(tmp_path):
  ids = np.array([f"study{i:03d}".encode() for i in range(12)])
  loaded = interchange.load_embeddings(write_npz(tmp_path / "ok.npz",
                                                 embedding_fields(study_ids=ids)))
  assert loaded.study_ids[3] == "study003" and loaded.study_ids.dtype.kind == "U"
  ids[5] = b"\xff\xfebad"
  with pytest.raises(interchange.InterchangeError, match=r"'study_ids': row 5 is not UTF-8"):
    interchange.load_embeddings(write_npz(tmp_path / "bad.npz", embedding_fields(study_ids=ids)))


def label_fields(n=12, d=6, num_labels=3):
  rng = np.random.default_rng(4)
  return embedding_fields(
      n, d, labels=(rng.random((n, num_labels)) < 0.4).astype(np.int8),
      label_names=np.array(["effusion", "nodule", "emphysema"][:num_labels]),
      prompt_embeddings=rng.normal(size=(num_labels, 2, d)).astype(np.float32),
      label_thresholds=np.array([0.4, np.nan, 0.6][:num_labels], np.float32),
      logit_scale=np.float32(14.3), scan_ids=np.array([f"scan{i // 2}" for i in range(n)]))


def test_zero_shot_fields_round_trip(tmp_path):
  fields = label_fields()
  loaded = interchange.load_embeddings(write_npz(tmp_path / "e.npz", fields))
  for name in ("labels", "label_names", "prompt_embeddings", "label_thresholds", "scan_ids"):
    np.testing.assert_array_equal(getattr(loaded, name), fields[name])
  assert float(loaded.logit_scale) == pytest.approx(14.3)


@pytest.mark.parametrize("change,field,message", [
    ({"label_names": None}, None, "no 'label_names'"),
    ({"labels": np.full((12, 3), 2, np.int8)}, "labels", r"\(12, 3\) array of 0/1"),
    ({"labels": np.zeros((12, 2), np.int8)}, "labels", r"found shape \(12, 2\)"),
    ({"prompt_embeddings": np.zeros((3, 6), np.float32)}, "prompt_embeddings",
     r"expected shape \(3, 2, 6\)"),
    ({"label_thresholds": np.zeros(2, np.float32)}, "label_thresholds", r"expected \(3,\)"),
    ({"logit_scale": np.float32(-1.0)}, "logit_scale", "one positive number"),
])
def test_zero_shot_fields_are_checked_together(tmp_path, change, field, message):
  fields = label_fields()
  fields.update(change)
  fields = {k: v for k, v in fields.items() if v is not None}
  with pytest.raises(interchange.InterchangeError, match=message) as err:
    interchange.load_embeddings(write_npz(tmp_path / "e.npz", fields))
  assert str(tmp_path / "e.npz") in str(err.value)
  if field:
    assert f"field {field!r}" in str(err.value)
