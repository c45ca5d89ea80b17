"""Building a model from settings: the text tower preamble, the model, a fresh initialisation."""

import jax
import numpy as np
import pytest

from medfinder_jax import convert_weights
from medfinder_jax import loading
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
