"""The trainer's video-model checks of ``model.video`` (``trainer._build_video``)."""

import types

import pytest

from keras_mm.recipes import config as config_lib
from keras_mm.recipes import video as video_recipes
from keras_mm.training import trainer

TOKENIZER = types.SimpleNamespace(vocab_size=64)


def test_position_gate_init_reaches_the_gate():
    cfg = video_recipes.tubevit_from_frames_moving_digits()
    cfg.model.video.position_gate_init = 0.75
    model = trainer._build_video(cfg, TOKENIZER)
    assert model.image_encoder.position_gate_init == 0.75         # the video tower


@pytest.mark.parametrize("recipe", ["tubevit_moving_digits", "frame_average_moving_digits"])
def test_position_gate_init_needs_the_image_position_variant(recipe):
    cfg = getattr(video_recipes, recipe)()
    cfg.model.video.position_gate_init = 1.0
    with pytest.raises(config_lib.ConfigError, match="position_gate_init"):
        trainer._build_video(cfg, TOKENIZER)
