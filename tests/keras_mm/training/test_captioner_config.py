"""The trainer's checks of captioner options (``data.input.contrastive_caption``,
``model.captioner.num_caption_queries``; ``trainer.build_model``)."""

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


def test_num_caption_queries_sets_cocas_captioning_pooler():
    default = trainer.build_model(config_lib.get_recipe("coca_scenes"), TOKENIZER)
    cfg = config_lib.override(config_lib.get_recipe("coca_scenes"),
                              ["model.captioner.num_caption_queries=64"])
    model = trainer.build_model(cfg, TOKENIZER)
    assert default.num_caption_queries == 16 and model.num_caption_queries == 64
    assert tuple(model.caption_pooler.queries.shape) == (64, model.decoder.width)


def test_num_caption_queries_is_cocas_option_only():
    cfg = config_lib.override(config_lib.get_recipe("mammut_scenes"),
                              ["model.captioner.num_caption_queries=64"])
    with pytest.raises(config_lib.ConfigError, match="num_caption_queries"):
        trainer.build_model(cfg, TOKENIZER)
    with pytest.raises(config_lib.ConfigError, match="num_caption_queries"):
        config_lib.override(config_lib.get_recipe("coca_scenes"),
                            ["model.captioner.num_caption_queries=0"])
