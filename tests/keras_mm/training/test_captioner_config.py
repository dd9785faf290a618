"""The trainer's checks of ``data.input.contrastive_caption`` (``trainer.build_model``)."""

import types

import pytest

from keras_mm.recipes import config as config_lib
from keras_mm.training import trainer

TOKENIZER = types.SimpleNamespace(vocab_size=64)


@pytest.mark.parametrize("recipe", ["cappa_scenes", "siglip_digits"])
def test_contrastive_caption_needs_a_captioner_with_a_contrastive_head(recipe):
    cfg = config_lib.override(config_lib.get_recipe(recipe),
                              ["data.input.contrastive_caption=random"])
    with pytest.raises(config_lib.ConfigError, match="contrastive_caption"):
        trainer.build_model(cfg, TOKENIZER)


def test_contrastive_caption_reaches_coca():
    cfg = config_lib.override(config_lib.get_recipe("coca_scenes"),
                              ["data.input.contrastive_caption=random"])
    assert cfg.data.input.contrastive_caption == "random"
    assert trainer.build_model(cfg, TOKENIZER).contrastive_weight > 0
