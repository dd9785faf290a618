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


def test_init_position_table_reaches_the_initialisation(tmp_path):
    """``model.video.init_position_table=false`` lets a plain TubeViT recipe start from a
    frame-average run (its learned table dropped); with the default the same start is a clear
    config error that names the image position variant."""
    import numpy as np

    from keras_mm.training import checkpoint

    def built(cfg):
        model = trainer._build_video(cfg, TOKENIZER)
        model({"video": np.zeros((1, 8, 32, 32, 3), "float32"),
               "text": np.ones((1, cfg.data.input.max_text_len), "int32")})
        return model

    source = built(video_recipes.frame_average_moving_digits())
    checkpoint.Checkpointer(str(tmp_path), write=True).save(1, source)
    cfg = video_recipes.tubevit_moving_digits()
    cfg.model.init_checkpoint = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match="image_position_embedding"):
        trainer._init_video_tower(cfg, built(cfg))
    cfg.model.video.init_position_table = False
    model = built(cfg)
    report = trainer._init_video_tower(cfg, model)
    assert report["dropped"] == ["video_encoder/position_embedding/embeddings"]
    np.testing.assert_array_equal(
        np.asarray(model.text_encoder.variables[0]), np.asarray(source.text_encoder.variables[0]))
