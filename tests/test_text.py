"""Text model folder resolution, the released code's report window, and tokenization vs transformers."""

import json
import os

import numpy as np
import pytest

from medfinder_jax import text

transformers = pytest.importorskip("transformers")

REPORTS = ["Bilateral pleural effusion, larger on the RIGHT side; basal atelectasis.",
           "No focal consolidation. " * 40,  # longer than max_tokens: truncated
           ""]
CASED_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Bilateral", "bilateral", "pleural",
               "effusion", "Right", "right", "no", "No", "##s", ",", ".", ";"]


def vocab_folder(tmp_path, words, tokenizer_config=None):
  folder = tmp_path / "biobert"
  folder.mkdir()
  (folder / "vocab.txt").write_text("\n".join(words) + "\n")
  (folder / "config.json").write_text("{}")
  (folder / "pytorch_model.bin").write_bytes(b"")
  if tokenizer_config is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  return os.fspath(folder)


def test_minilm_resolves_to_the_installed_package_folder():
  folder = text.resolve_text_model_path("minilm")
  assert os.path.isfile(os.path.join(folder, "config.json"))
  assert os.path.isfile(os.path.join(folder, "model.safetensors"))


def test_empty_model_path_is_a_clear_error():
  with pytest.raises(text.TextModelError, match="text.model_path is empty"):
    text.resolve_text_model_path("")


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(text.TextModelError, match="not a directory"):
    text.resolve_text_model_path(os.fspath(tmp_path / "nowhere"))


def test_incomplete_folder_lists_every_missing_file(tmp_path):
  (tmp_path / "vocab.txt").write_text("[PAD]\n")
  with pytest.raises(text.TextModelError) as err:
    text.resolve_text_model_path(os.fspath(tmp_path))
  assert "config.json" in str(err.value)
  assert "model.safetensors or pytorch_model.bin" in str(err.value)
  assert "tokenizer.json" not in str(err.value)


def test_deterministic_window_keeps_the_text():
  report = " ".join(f"w{i}" for i in range(300))
  assert text.report_window(report, None, 100) == report


def test_random_window_is_a_contiguous_run_of_n_words():
  words = [f"w{i}" for i in range(130)]
  rng = np.random.default_rng(0)
  starts = set()
  for _ in range(400):
    window = text.report_window("  ".join(words), rng, 100).split(" ")
    start = int(window[0][1:])
    assert window == words[start:start + 100]
    starts.add(start)
  assert starts == set(range(31))  # every start 0..len-n is possible


def test_short_reports_are_not_windowed():
  report = "No  focal\nconsolidation."
  assert text.report_window(report, np.random.default_rng(0), 100) == report


def test_minilm_tokens_match_transformers():
  folder = text.resolve_text_model_path("minilm")
  ours = text.ReportTokenizer(folder, max_tokens=100)
  reference = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
  expected = reference(REPORTS, padding="max_length", truncation=True, max_length=100,
                       return_tensors="np")
  ids, mask = ours(REPORTS)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == (3, 100)
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"])
  assert mask[2].sum() == 2  # [CLS] [SEP] only


def test_vocab_only_folder_is_cased_when_its_vocabulary_is(tmp_path):
  """BioBERT v1.1 folders ship vocab.txt without tokenizer files; its vocabulary is cased."""
  folder = vocab_folder(tmp_path, CASED_VOCAB)
  ours = text.ReportTokenizer(folder, max_tokens=16)
  assert not ours.lowercase
  reference = transformers.BertTokenizer(vocab=os.path.join(folder, "vocab.txt"),
                                         do_lower_case=False)
  expected = reference(REPORTS[:1], padding="max_length", truncation=True, max_length=16,
                       return_tensors="np")
  ids, mask = ours(REPORTS[:1])
  np.testing.assert_array_equal(ids, expected["input_ids"])
  np.testing.assert_array_equal(mask, expected["attention_mask"])
  assert ids[0, 1] == CASED_VOCAB.index("Bilateral")


def test_tokenizer_config_decides_lowercasing(tmp_path):
  folder = vocab_folder(tmp_path, CASED_VOCAB, {"do_lower_case": True})
  ids, _ = text.ReportTokenizer(folder, max_tokens=4)(["Bilateral Right"])
  assert ids[0].tolist() == [2, 6, 10, 3]  # [CLS] bilateral right [SEP]


def test_lowercase_can_be_forced(tmp_path):
  folder = vocab_folder(tmp_path, CASED_VOCAB)
  assert text.ReportTokenizer(folder, 4, lowercase="true").lowercase
  with pytest.raises(text.TextModelError, match="text.lowercase"):
    text.ReportTokenizer(folder, 4, lowercase="maybe")


def test_tokenize_reports_windows_then_tokenizes():
  folder = text.resolve_text_model_path("minilm")
  tokenizer = text.ReportTokenizer(folder, max_tokens=8)
  report = " ".join(["effusion"] * 50 + ["consolidation"] * 50)
  ids, mask = text.tokenize_reports(tokenizer, [report], np.random.default_rng(3), n_words=3)
  word_ids = {int(tokenizer([w])[0][0, 1]) for w in ("effusion", "consolidation")}
  assert mask[0].sum() == 5  # [CLS] + the 3 window words + [SEP]
  assert set(ids[0, 1:4].tolist()) <= word_ids


def test_tokenizer_larger_than_the_models_vocabulary_is_a_clear_error(tmp_path):
  from medfinder_jax.models import bert  # pylint: disable=import-outside-toplevel
  tokenizer = text.ReportTokenizer(vocab_folder(tmp_path, CASED_VOCAB))
  fits = bert.BertConfig(vocab_size=len(CASED_VOCAB))
  text.check_vocab_fits(tokenizer, fits)
  with pytest.raises(text.TextModelError, match="17 tokens but config.json's vocab_size is 10"):
    text.check_vocab_fits(tokenizer, bert.BertConfig(vocab_size=10))


def test_forcing_lowercase_on_a_non_bert_normalizer_is_an_error(tmp_path):
  import tokenizers  # pylint: disable=import-outside-toplevel
  folder = vocab_folder(tmp_path, CASED_VOCAB)
  backend = tokenizers.BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"), lowercase=False)
  backend.normalizer = tokenizers.normalizers.NFC()
  backend.save(os.path.join(folder, "tokenizer.json"))
  assert not text.ReportTokenizer(folder, 4).lowercase   # auto: the cased vocabulary decides
  with pytest.raises(text.TextModelError, match="tokenizer.json: its normalizer is not BERT's"):
    text.ReportTokenizer(folder, 4, lowercase="true")
