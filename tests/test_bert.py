"""Flax BERT vs transformers' PyTorch BertModel, weight loading from HF folders, dtype, dropout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from medfinder_jax import convert_weights
from medfinder_jax import text
from medfinder_jax.models import bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=64)


def hf_model(**config):
  torch.manual_seed(0)
  return transformers.BertModel(transformers.BertConfig(**config)).eval()


def hf_forward(model, ids, mask):
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(),
                attention_mask=torch.from_numpy(mask).long())
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def ours_forward(config, params, ids, mask, dtype=jnp.float32):
  model = bert.BertModel(config, dtype=dtype)
  return jax.jit(lambda p, i, m: model.apply({"params": p}, i, m))(params, ids, mask)


def padded_batch(vocab_size, lengths, max_len, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000 if vocab_size > 2000 else 1, vocab_size, (len(lengths), max_len))
  mask = (np.arange(max_len)[None, :] < np.array(lengths)[:, None]).astype(np.int32)
  return np.where(mask > 0, ids, 0).astype(np.int32), mask


def state_of(model):
  return {k: v.numpy() for k, v in model.state_dict().items()}


def tiny_params():
  """Random tiny BERT params (imported from PyTorch: much faster than compiling our init)."""
  config = bert.BertConfig(**TINY)
  template = convert_weights.bert_template(config)
  return config, convert_weights.import_hf_bert(state_of(hf_model(**TINY)), template)["params"]


def test_minilm_matches_transformers():
  folder = text.resolve_text_model_path("minilm")
  config, params = convert_weights.load_hf_bert(folder)
  reference_model = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
  tokenizer = text.ReportTokenizer(folder, max_tokens=24)
  ids, mask = tokenizer(["Bilateral pleural effusion with basal atelectasis.",
                         "No focal consolidation.", "Mediastinal adenopathy in the right hilum."])
  assert mask.sum(axis=1).min() < 24  # the batch is padded
  hidden, pooled = ours_forward(config, params, ids, mask)
  ref_hidden, ref_pooled = hf_forward(reference_model, ids, mask)
  assert np.max(np.abs(np.asarray(hidden) - ref_hidden)) <= 1e-4
  assert np.max(np.abs(np.asarray(pooled) - ref_pooled)) <= 1e-4


def test_random_bert_base_cased_matches_transformers_with_padding():
  reference_model = hf_model(vocab_size=28996)
  config = bert.BertConfig(vocab_size=28996)
  template = convert_weights.bert_template(config)
  params = convert_weights.import_hf_bert(state_of(reference_model), template)["params"]
  ids, mask = padded_batch(28996, [40, 7, 1, 40], 40)
  hidden, _ = ours_forward(config, params, ids, mask)
  ref_hidden, _ = hf_forward(reference_model, ids, mask)
  assert np.max(np.abs(np.asarray(hidden) - ref_hidden)) <= 1e-4


def test_padding_does_not_change_real_tokens():
  config, params = tiny_params()
  ids, mask = padded_batch(99, [5], 12)
  full, _ = ours_forward(config, params, ids, mask)
  short, _ = ours_forward(config, params, ids[:, :5], mask[:, :5])
  np.testing.assert_allclose(full[:, :5], short, atol=1e-5)


def test_dropout_only_in_training():
  config, params = tiny_params()
  model = bert.BertModel(config)
  ids, mask = padded_batch(99, [8, 8], 8)
  run = jax.jit(lambda key, train: model.apply({"params": params}, ids, mask, train=train,
                                               rngs={"dropout": key})[0], static_argnums=1)
  np.testing.assert_array_equal(run(jax.random.key(1), False), run(jax.random.key(2), False))
  assert not np.allclose(run(jax.random.key(1), True), run(jax.random.key(2), True))


def test_bfloat16_compute_stays_close_to_float32():
  folder = text.resolve_text_model_path("minilm")
  config, params = convert_weights.load_hf_bert(folder)
  ids, mask = padded_batch(config.vocab_size, [20, 9], 20)
  reference, _ = ours_forward(config, params, ids, mask)
  low, _ = ours_forward(config, params, ids, mask, dtype=jnp.bfloat16)
  assert low.dtype == jnp.bfloat16
  # Stated tolerance: 0.1 max / 0.01 mean abs on hidden states of magnitude up to ~6
  # (measured 0.03 / 0.003: bf16 has 8 mantissa bits; softmax and LayerNorm run in fp32).
  assert np.max(np.abs(np.asarray(low, np.float32) - reference)) <= 0.1
  assert np.mean(np.abs(np.asarray(low, np.float32) - reference)) <= 0.01


def write_folder(folder, model, weights):
  folder.mkdir()
  with open(folder / "config.json", "w") as f:
    json.dump(model.config.to_dict(), f)
  (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a"]))
  state = model.state_dict()
  if weights == "safetensors":
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()},
              os.fspath(folder / "model.safetensors"))
  else:
    torch.save(state, folder / "pytorch_model.bin")
  return os.fspath(folder)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_loads_hf_folder_with_either_weight_file(tmp_path, weights):
  reference_model = hf_model(**TINY)
  folder = write_folder(tmp_path / "bert", reference_model, weights)
  config, params = convert_weights.load_hf_bert(folder)
  assert config.hidden_size == 32 and config.num_hidden_layers == 2
  ids, mask = padded_batch(99, [6, 3], 6)
  hidden, _ = ours_forward(config, params, ids, mask)
  np.testing.assert_allclose(hidden, hf_forward(reference_model, ids, mask)[0], atol=1e-5)


def test_pretraining_checkpoint_names_are_understood():
  """BioBERT-style: `bert.` prefix, TF-era LayerNorm gamma/beta, `cls.*` heads (ignored)."""
  reference_model = hf_model(**TINY)
  rename = lambda k: k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                            "LayerNorm.beta")
  state = {"bert." + rename(k): v for k, v in state_of(reference_model).items()}
  state["cls.predictions.bias"] = np.zeros(99, np.float32)
  config = bert.BertConfig(**TINY)
  params = convert_weights.import_hf_bert(state, convert_weights.bert_template(config))["params"]
  ids, mask = padded_batch(99, [6], 6)
  np.testing.assert_allclose(ours_forward(config, params, ids, mask)[0],
                             hf_forward(reference_model, ids, mask)[0], atol=1e-5)


def test_mismatched_state_dict_lists_every_problem():
  state = state_of(hf_model(**TINY))
  del state["pooler.dense.bias"]
  state["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
  state["embeddings.word_embeddings.weight"] = np.zeros((98, 32), np.float32)
  template = convert_weights.bert_template(bert.BertConfig(**TINY))
  with pytest.raises(convert_weights.WeightImportError) as err:
    convert_weights.import_hf_bert(state, template)
  message = str(err.value)
  assert "1 missing keys" in message and "pooler.dense.bias" in message
  assert "1 unexpected keys" in message and "encoder.layer.0.extra.weight" in message
  assert "1 wrongly shaped keys" in message and "(98, 32)" in message


def test_unsupported_config_is_refused():
  with pytest.raises(ValueError, match="position_embedding_type"):
    bert.BertConfig.from_dict({"position_embedding_type": "relative_key"})
