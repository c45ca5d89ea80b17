"""A MedFinder model from its settings: the text tower's tokenizer and BertConfig, then the model.

Training, our checkpoints and the released code's files all build the model here, so the
tokenizer, the BERT architecture and the model always come from one place: `text_tower` reads
the text model folder (config.text.model_path) once and checks that the tokenizer fits the
BERT's vocabulary; `build_model` makes the Flax module from the config's model, text and loss
sections.
"""

import jax

from medfinder_jax import convert_weights
from medfinder_jax import losses
from medfinder_jax import text as text_lib
from medfinder_jax.models import medfinder as medfinder_lib


def text_tower(text_config):
  """(ReportTokenizer, BertConfig) of config `text` (model_path, max_tokens, lowercase).

  text.TextModelError (a user error) when the folder is missing, incomplete, or its tokenizer
  and weights come from different models."""
  tokenizer = text_lib.load_tokenizer(text_config)
  bert_config = convert_weights.load_bert_config(tokenizer.folder)
  text_lib.check_vocab_fits(tokenizer, bert_config)
  return tokenizer, bert_config


def build_model(config, bert_config):
  """The MedFinder module of `config` (its model, text and loss sections) with a text tower of
  `bert_config`; the loss scalars the configured loss learns are parameters of it."""
  return medfinder_lib.build_model(config.model, config.text, bert_config,
                                   losses.learnable_scalars(config.loss))


def init_model(config, image_shape, rng):
  """(model, variables): `config`'s model initialised from `rng` for volumes of `image_shape`
  (X, Y, Z), with the pretrained BERT of config.text.model_path as its text tower (numpy
  variables on the host; training creates its state sharded instead, train.create_train_state).
  """
  tokenizer, _ = text_tower(config.text)
  bert_config, bert_params = convert_weights.load_hf_bert(tokenizer.folder)
  model = build_model(config, bert_config)
  variables = medfinder_lib.initialize(model, rng, image_shape, config.text.max_tokens,
                                       bert_params)
  return model, jax.device_get(variables)
