"""Importing the released code's saved PyTorch MedFinder (best_model.pt / checkpoint_epoch_N.pt) and the
safety and error behaviour of state dict loading."""

import json
import os
import re

import jax
import numpy as np
import pytest

from configs import default
from medfinder_jax import convert_weights
from medfinder_jax import text as text_lib
from medfinder_jax.models import bert
from medfinder_jax.models import medfinder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
monai_resnet = pytest.importorskip("monai.networks.nets.resnet")

TINY_BERT = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=48, max_position_embeddings=40)
FULL = ((3, 4, 6, 3), (64, 128, 256, 512))
TINY = ((1, 1, 1, 1), (2, 2, 4, 4))
IMAGE, TOKENS = (32, 32, 16), 12


SMALL_VIT = dict(hidden_size=64, mlp_dim=96, num_layers=2, num_heads=4)


class VisualEncoder(torch.nn.Module):
  """The released code's `visual_encoder`: MONAI ResNet (fc removed) + Linear(2048, 512), or its ViT
  branch (MONAI ViT, tokens mean-pooled) + Linear(hidden, 512)."""

  def __init__(self, layers, widths, backbone="resnet50"):
    super().__init__()
    if backbone == "resnet50":
      self.encoder = monai_resnet.ResNet("bottleneck", list(layers), list(widths), spatial_dims=3,
                                         n_input_channels=1, feed_forward=False)
      self.projection = torch.nn.Linear(widths[-1] * 4, 512)
    else:
      from monai.networks.nets import vit  # pylint: disable=import-outside-toplevel
      self.encoder = vit.ViT(in_channels=1, img_size=IMAGE, patch_size=16, classification=False,
                             spatial_dims=3, **SMALL_VIT)
      self.projection = torch.nn.Linear(SMALL_VIT["hidden_size"], 512)
    self.backbone = backbone

  def forward(self, x):
    features = self.encoder(x)
    if self.backbone != "resnet50":
      features = features[0].mean(dim=1)
    return self.projection(features)



class ReleasedMedFinder(torch.nn.Module):
  """The released code's module structure (visual_encoder, text_encoder, text_projection)."""

  def __init__(self, layers, widths, backbone="resnet50"):
    super().__init__()
    self.visual_encoder = VisualEncoder(layers, widths, backbone)
    self.text_encoder = transformers.BertModel(transformers.BertConfig(**TINY_BERT))
    self.text_projection = torch.nn.Linear(TINY_BERT["hidden_size"], 512)

  def encode_text(self, ids, mask):
    hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    return self.text_projection(hidden[:, 0])


def released_model(layers, widths, backbone="resnet50"):
  torch.manual_seed(0)
  model = ReleasedMedFinder(layers, widths, backbone)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        module.running_mean.uniform_(-0.1, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return model.eval()


def our_model(layers, widths, fusion, backbone="resnet50"):
  config = default.get_config()
  config.model.backbone = backbone
  config.model.resnet.layers, config.model.resnet.widths = layers, widths
  config.model.vit.update(SMALL_VIT)
  config.model.fusion.enabled = fusion
  return medfinder.build_model(config.model, config.text, bert.BertConfig(**TINY_BERT))


def template(model):
  volume = jax.ShapeDtypeStruct((1, *IMAGE, 1), np.float32)
  ids = jax.ShapeDtypeStruct((1, TOKENS), np.int32)
  return jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, v, i, i, train=False),
                        volume, ids)


def inputs():
  rng = np.random.default_rng(0)
  volume = rng.normal(size=(2, *IMAGE, 1)).astype(np.float32)
  ids = rng.integers(1, 60, (2, TOKENS)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  return volume, ids, mask


def torch_embeddings(model, volume, ids, mask):
  with torch.no_grad():
    image = model.visual_encoder(torch.from_numpy(np.transpose(volume, (0, 4, 1, 2, 3))))
    text = model.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
  return image.numpy(), text.numpy()


def our_embeddings(model, variables, volume, ids, mask):
  image = jax.jit(lambda v, x: model.apply(v, x, method=model.encode_image))(variables, volume)
  text = jax.jit(lambda v, i, m: model.apply(v, i, m, method=model.encode_text))(variables, ids,
                                                                                 mask)
  return np.asarray(image), np.asarray(text)


def assert_close(ours, reference, rel=1e-4):
  assert np.max(np.abs(ours - reference)) <= rel * np.max(np.abs(reference))


def test_best_model_state_dict_gives_the_released_embeddings(tmp_path):
  """Released-code reference setting (fusion off): MONAI ResNet50 + BERT + the two projections."""
  torch_model = released_model(*FULL)
  path = tmp_path / "best_model.pt"
  torch.save(torch_model.state_dict(), path)
  model = our_model(*FULL, fusion=False)
  variables, report = convert_weights.import_released_checkpoint(str(path), template(model))
  assert report["fresh"] == []
  assert report["loaded"] + len(report["ignored"]) == len(torch_model.state_dict())
  volume, ids, mask = inputs()
  image, text = our_embeddings(model, variables, volume, ids, mask)
  ref_image, ref_text = torch_embeddings(torch_model, volume, ids, mask)
  assert image.shape == (2, 512) and text.shape == (2, 512)
  assert_close(image, ref_image)
  assert_close(text, ref_text)


def test_vit_released_checkpoint_gives_the_released_embeddings(tmp_path):
  torch_model = released_model(*TINY, backbone="vit")
  path = tmp_path / "best_model.pt"
  torch.save(torch_model.state_dict(), path)
  model = our_model(*TINY, fusion=False, backbone="vit")
  variables, _ = convert_weights.import_released_checkpoint(str(path), template(model))
  volume, ids, mask = inputs()
  image, _ = our_embeddings(model, variables, volume, ids, mask)
  assert_close(image, torch_embeddings(torch_model, volume, ids, mask)[0])


def test_training_checkpoint_dict_is_read_and_fusion_starts_fresh(tmp_path):
  torch_model = released_model(*TINY)
  optimizer = torch.optim.AdamW(torch_model.parameters(), lr=1e-4, weight_decay=0.01)
  scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
  path = tmp_path / "checkpoint_epoch_3.pt"
  torch.save({"epoch": 3, "model_state_dict": torch_model.state_dict(),
              "optimizer_state_dict": optimizer.state_dict(),
              "scheduler_state_dict": scheduler.state_dict(), "best_recall": 12.5,
              "scaler": {"scale": 65536.0, "growth_factor": 2.0}}, path)
  model = our_model(*TINY, fusion=True)
  fresh = medfinder.initialize(model, jax.random.key(0), IMAGE, TOKENS)
  variables, report = convert_weights.import_released_checkpoint(str(path), fresh)
  assert report["fresh"] and all(k.startswith("params/fusion/") for k in report["fresh"])
  jax.tree.map(np.testing.assert_array_equal, variables["params"]["fusion"],
               fresh["params"]["fusion"])
  volume, ids, mask = inputs()
  _, text = our_embeddings(model, variables, volume, ids, mask)
  assert_close(text, torch_embeddings(torch_model, volume, ids, mask)[1])


def test_ddp_module_prefix_is_removed(tmp_path):
  torch_model = released_model(*TINY)
  path = tmp_path / "best_model.pt"
  torch.save({"module." + k: v for k, v in torch_model.state_dict().items()}, path)
  state = convert_weights.load_state_dict(str(path))
  assert set(state) == set(torch_model.state_dict())


class Payload:
  pass


def test_arbitrary_pickled_objects_are_refused(tmp_path):
  path = tmp_path / "evil.pt"
  torch.save({"model_state_dict": {}, "payload": Payload()}, path)
  with pytest.raises(convert_weights.WeightImportError, match="weights_only"):
    convert_weights.load_state_dict(str(path))


def test_wrong_backbone_checkpoint_lists_the_mismatch(tmp_path):
  torch_model = released_model(*TINY)
  path = tmp_path / "best_model.pt"
  state = torch_model.state_dict()
  state.pop("text_projection.bias")
  torch.save(state, path)
  model = our_model((1, 1, 1, 1), (2, 2, 4, 8), fusion=False)  # last stage wider than saved
  with pytest.raises(convert_weights.WeightImportError) as err:
    convert_weights.import_released_checkpoint(str(path), template(model))
  message = str(err.value)
  assert str(path) in message
  assert "missing keys" in message and "text_projection.bias" in message
  assert "wrongly shaped keys" in message and "visual_encoder.projection.weight" in message
  assert re.search(r"^  \d+ wrongly shaped keys:$", message, re.M)


def test_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(convert_weights.WeightImportError, match="no such file"):
    convert_weights.load_state_dict(str(tmp_path / "best_model.pt"))


def test_truncated_safetensors_is_a_clear_error(tmp_path):
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"embeddings.word")
  with pytest.raises(convert_weights.WeightImportError, match="model.safetensors: not a readable"):
    convert_weights.load_state_dict(str(path))


def test_a_fresh_leaf_needs_a_concrete_template():
  template = {"params": {"fusion": {"kernel": jax.ShapeDtypeStruct((2, 2), np.float32)}}}
  with pytest.raises(ValueError, match="params/fusion/kernel is kept fresh"):
    convert_weights.convert_tree(template, {}, lambda path: ".".join(path), "x.pt",
                                 fresh=("params/fusion",))


def test_tf_era_layer_norm_names_are_read_as_pytorch_ones():
  """What import_released_checkpoint and import_hf_bert apply to every key (test_bert.py imports
  a whole BioBERT-style checkpoint); other keys ending in gamma/beta are left alone."""
  state = {"text_encoder.embeddings.LayerNorm.gamma": 1, "text_encoder.embeddings.LayerNorm.beta": 2,
           "fusion.gamma": 3, "x.LayerNorm.gamma.extra": 4, "y.LayerNorm.weight": 5}
  assert convert_weights._rename_layer_norm(state) == {
      "text_encoder.embeddings.LayerNorm.weight": 1, "text_encoder.embeddings.LayerNorm.bias": 2,
      "fusion.gamma": 3, "x.LayerNorm.gamma.extra": 4, "y.LayerNorm.weight": 5}


def _small_template():
  return {"params": {"dense": {"kernel": np.zeros((3, 2), np.float32),
                               "bias": np.zeros((2,), np.float32)},
                     "norm": {"scale": np.zeros((2,), np.float32)}}}


def test_convert_tree_lays_out_each_leaf_in_the_template_dtype():
  weight = np.arange(6, dtype=np.float64).reshape(2, 3)          # torch Linear: (out, in)
  state = {"dense.weight": weight, "dense.bias": np.ones(2), "norm.weight": np.full(2, 3.0),
           "norm.num_batches_tracked": np.array(5)}
  variables, report = convert_weights.convert_tree(_small_template(), state,
                                                   convert_weights.rule_key_fn(()), "toy")
  kernel = variables["params"]["dense"]["kernel"]
  assert kernel.dtype == np.float32 and variables["params"]["norm"]["scale"].dtype == np.float32
  np.testing.assert_array_equal(kernel, weight.T)
  np.testing.assert_array_equal(variables["params"]["norm"]["scale"], [3.0, 3.0])
  assert report == {"loaded": 3, "fresh": [], "ignored": ["norm.num_batches_tracked"]}


def test_convert_tree_lists_every_missing_and_unexpected_key():
  state = {"dense.weight": np.zeros((2, 3)), "head.weight": np.zeros((4, 2)),
           "norm.num_batches_tracked": np.array(5)}
  with pytest.raises(convert_weights.WeightImportError) as err:
    convert_weights.convert_tree(_small_template(), state, convert_weights.rule_key_fn(()), "toy")
  lines = str(err.value).splitlines()
  assert lines[0] == "toy: state dict does not match the model: 2 missing keys, 1 unexpected keys"
  assert "    dense.bias (for params/dense/bias (2,))" in lines
  assert "    norm.weight (for params/norm/scale (2,))" in lines
  assert "    head.weight" in lines and not any("num_batches_tracked" in l for l in lines)


# --- Reading torch files (mutation testing) --------------------------------------------------------

def test_a_refused_pickle_names_the_reader_error(tmp_path):
  path = tmp_path / "evil.pt"
  torch.save({"model_state_dict": {}, "payload": Payload()}, path)
  with pytest.raises(convert_weights.WeightImportError,
                     match=r"evil.pt: not a PyTorch state dict readable with weights_only=True "
                           r"\(UnpicklingError: "):
    convert_weights.load_state_dict(str(path))


def test_torch_files_load_onto_the_cpu_with_weights_only(tmp_path, monkeypatch):
  """A checkpoint saved on a GPU must load on a host without one, and never run pickled code."""
  path = tmp_path / "best_model.pt"
  torch.save({"w": torch.ones(2)}, path)
  seen = {}
  load = torch.load
  monkeypatch.setattr(torch, "load", lambda *a, **kw: seen.update(kw) or load(*a, **kw))
  convert_weights.load_state_dict(str(path))
  assert seen == {"map_location": "cpu", "weights_only": True}


@pytest.mark.parametrize("saved, found", [({1: torch.ones(2)}, "dict"), ([torch.ones(2)], "list")])
def test_a_file_that_is_not_a_state_dict_says_what_it_holds(tmp_path, saved, found):
  path = tmp_path / "weights.pt"
  torch.save(saved, path)
  with pytest.raises(convert_weights.WeightImportError,
                     match=rf"weights.pt: expected a state dict \(names -> tensors\), found "
                           rf"{found}$"):
    convert_weights.load_state_dict(str(path))


def test_parameters_half_floats_and_plain_numbers_become_numpy(tmp_path):
  path = tmp_path / "weights.pt"
  torch.save({"w": torch.nn.Parameter(torch.ones(2, 3)), "h": torch.ones(4, dtype=torch.float16),
              "step": 3}, path)
  state = convert_weights.load_state_dict(str(path))
  assert state["w"].dtype == np.float32 and state["w"].shape == (2, 3)
  assert state["h"].dtype == np.float32
  assert state["step"] == 3 and isinstance(state["step"], np.ndarray)


# --- Single towers: HF BERT folders, MONAI networks --------------------------------------------

def hf_bert(**config):
  """A tiny transformers BertModel (seeded) and its state dict as numpy."""
  torch.manual_seed(0)
  model = transformers.BertModel(transformers.BertConfig(**{**TINY_BERT, **config}))
  return model, {k: v.detach().numpy() for k, v in model.state_dict().items()}


def test_hf_bert_weights_land_on_our_leaves_in_our_layout():
  _, state = hf_bert()
  params = convert_weights.import_hf_bert(
      state, convert_weights.bert_template(bert.BertConfig(**TINY_BERT)))["params"]
  np.testing.assert_array_equal(params["embeddings"]["word_embeddings"]["embedding"],
                                state["embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(params["embeddings"]["LayerNorm"]["scale"],
                                state["embeddings.LayerNorm.weight"])
  for layer in (0, 1):   # each HF layer to its own Flax layer; Linear weights transposed
    ours = params["encoder"][f"layer_{layer}"]
    np.testing.assert_array_equal(ours["attention"]["self"]["query"]["kernel"],
                                  state[f"encoder.layer.{layer}.attention.self.query.weight"].T)
    np.testing.assert_array_equal(ours["output"]["dense"]["bias"],
                                  state[f"encoder.layer.{layer}.output.dense.bias"])
  np.testing.assert_array_equal(params["pooler"]["dense"]["kernel"],
                                state["pooler.dense.weight"].T)
  # Every tensor of the checkpoint is used, once.
  leaves = jax.tree.leaves(params)
  assert len(leaves) == len(state)
  assert sum(leaf.size for leaf in leaves) == sum(v.size for v in state.values())


def test_pretraining_checkpoint_names_import_as_the_bert_model_ones():
  """BioBERT-style checkpoints: keys under `bert.`, TF-era LayerNorm gamma/beta, and the
  pre-training heads (`cls.`), which carry nothing the text tower uses."""
  _, state = hf_bert()
  tf_name = lambda k: re.sub(r"LayerNorm\.bias$", "LayerNorm.beta",  # noqa: E731
                             re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k))
  pretraining = {f"bert.{tf_name(k)}": v for k, v in state.items()}
  pretraining["cls.predictions.bias"] = np.zeros(TINY_BERT["vocab_size"], np.float32)
  template = convert_weights.bert_template(bert.BertConfig(**TINY_BERT))
  want = convert_weights.import_hf_bert(state, template)
  got = convert_weights.import_hf_bert(pretraining, template)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def monai_tower(backbone):
  """(the MONAI image network of a tiny released model as a numpy state dict, our image tower's
  variables template)."""
  encoder = released_model(*TINY, backbone).visual_encoder.encoder
  full = template(our_model(*TINY, fusion=False, backbone=backbone))
  return ({k: v.detach().numpy() for k, v in encoder.state_dict().items()},
          {c: tree["image_encoder"] for c, tree in full.items() if "image_encoder" in tree})


def test_a_monai_resnet_gives_our_resnet_its_weights_and_statistics():
  state, tower = monai_tower("resnet50")
  variables = convert_weights.import_monai_resnet(state, tower)
  np.testing.assert_array_equal(variables["params"]["conv1"]["kernel"],
                                np.transpose(state["conv1.weight"], (2, 3, 4, 1, 0)))
  np.testing.assert_array_equal(variables["params"]["layer1"]["block0"]["bn1"]["scale"],
                                state["layer1.0.bn1.weight"])
  np.testing.assert_array_equal(variables["batch_stats"]["layer1"]["block0"]["bn1"]["mean"],
                                state["layer1.0.bn1.running_mean"])
  used = [k for k in state if not k.endswith("num_batches_tracked")]
  assert len(jax.tree.leaves(variables)) == len(used)
  assert sum(x.size for x in jax.tree.leaves(variables)) == sum(state[k].size for k in used)


def test_a_monai_vit_gives_our_vit_its_weights():
  state, tower = monai_tower("vit")
  params = convert_weights.import_monai_vit(state, tower)["params"]
  np.testing.assert_array_equal(params["position_embeddings"],
                                state["patch_embedding.position_embeddings"])
  np.testing.assert_array_equal(params["block1"]["attn"]["qkv"]["kernel"],
                                state["blocks.1.attn.qkv.weight"].T)
  used = [k for k in state if ".norm_cross_attn." not in k]   # created by MONAI, never used
  assert len(jax.tree.leaves(params)) == len(used)
  assert sum(x.size for x in jax.tree.leaves(params)) == sum(state[k].size for k in used)


@pytest.mark.parametrize("importer,source", [(convert_weights.import_monai_resnet, "MONAI ResNet"),
                                             (convert_weights.import_monai_vit, "MONAI ViT"),
                                             (convert_weights.import_hf_bert, "HF BERT")])
def test_a_tower_mismatch_names_the_kind_of_checkpoint(importer, source):
  template = {"params": {"dense": {"kernel": np.zeros((3, 2), np.float32)}}}
  with pytest.raises(convert_weights.WeightImportError,
                     match=rf"^{source}: state dict does not match the model: 1 missing keys"):
    importer({}, template)


def write_bert_folder(folder, weights="model.safetensors", **config):
  """A local HF BERT folder: config.json as transformers writes it, and one weights file
  (safetensors, or a torch-saved state dict as older HF releases ship)."""
  model, _ = hf_bert(**config)
  if weights.endswith(".safetensors"):
    model.save_pretrained(folder)
  else:
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, weights))
  assert os.listdir(folder) and os.path.isfile(os.path.join(folder, weights))
  return model


def test_a_local_bert_folder_gives_its_config_and_weights(tmp_path):
  for weights in text_lib.WEIGHT_FILES:
    folder = str(tmp_path / weights.replace(".", "_"))
    model = write_bert_folder(folder, weights)
    config, params = convert_weights.load_hf_bert(folder)
    assert config == bert.BertConfig(**TINY_BERT)
    np.testing.assert_array_equal(params["embeddings"]["position_embeddings"]["embedding"],
                                  model.embeddings.position_embeddings.weight.detach().numpy())
    assert jax.tree.map(np.shape, params) == jax.tree.map(
        np.shape, convert_weights.bert_template(config)["params"])


def test_the_safetensors_file_is_preferred_and_a_folder_without_weights_is_named(tmp_path):
  folder = str(tmp_path)
  for name in ("pytorch_model.bin", "model.safetensors"):
    (tmp_path / name).write_bytes(b"")
    assert convert_weights.bert_weights_file(folder) == os.path.join(folder, name)
  os.remove(tmp_path / "model.safetensors")
  os.remove(tmp_path / "pytorch_model.bin")
  with pytest.raises(text_lib.TextModelError,
                     match=rf"^{re.escape(folder)}: no model.safetensors or pytorch_model.bin$"):
    convert_weights.bert_weights_file(folder)


def test_a_weights_file_that_does_not_fit_the_config_is_named(tmp_path):
  folder = str(tmp_path)
  write_bert_folder(folder)
  with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
    values = json.load(f)
  with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
    json.dump({**values, "num_hidden_layers": 3}, f)
  with pytest.raises(convert_weights.WeightImportError,
                     match=rf"^{re.escape(os.path.join(folder, 'model.safetensors'))}: state dict "
                           r"does not match the model: \d+ missing keys"):
    convert_weights.load_hf_bert(folder)


@pytest.mark.parametrize("content,error", [
    (None, r"config.json: cannot read a BERT config \(.*No such file"),
    ("{not json", r"config.json: cannot read a BERT config \(Expecting property name"),
    (json.dumps({**TINY_BERT, "model_type": "roberta"}),
     r"config.json: model_type 'roberta', expected 'bert'$"),
])
def test_a_bert_config_that_is_missing_unreadable_or_not_bert_is_named(tmp_path, content, error):
  if content is not None:
    (tmp_path / "config.json").write_text(content)
  with pytest.raises(text_lib.TextModelError,
                     match=rf"^{re.escape(str(tmp_path))}/{error}"):
    convert_weights.load_bert_config(str(tmp_path))


def test_a_bert_config_without_model_type_is_read_as_bert(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({**TINY_BERT, "unknown_key": 1}))
  assert convert_weights.load_bert_config(str(tmp_path)) == bert.BertConfig(**TINY_BERT)
  (tmp_path / "config.json").write_text(json.dumps({**TINY_BERT, "hidden_act": "swish"}))
  with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/config.json: hidden_act"):
    convert_weights.load_bert_config(str(tmp_path))
