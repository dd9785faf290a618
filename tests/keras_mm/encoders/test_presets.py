import keras
import numpy as np
import pytest

from keras_mm.encoders import presets
from keras_mm.encoders.text import TextEncoder
from keras_mm.encoders.vit import ViTEncoder

pytestmark = pytest.mark.both_backends


def _vit_params(image, patch, width, depth, mlp, pool="cls"):
    """ViT parameter count from the architecture (big_vision layout: position embeddings for
    the patches only, [CLS] token added after them), no head."""
    patches = (image // patch) ** 2
    block = (2 * 2 * width                           # two LayerNorms
             + width * 3 * width + 3 * width         # qkv
             + width * width + width                 # attention output
             + width * mlp + mlp + mlp * width + width)
    return (patch * patch * 3 * width + width        # patch embedding
            + patches * width                        # position embedding
            + (width if pool == "cls" else 0)        # [CLS]
            + depth * block + 2 * width)             # blocks + final LayerNorm


def test_paper_sizes():
    assert presets.vit_config("s16") == dict(image_size=224, patch_size=16, width=384, depth=12,
                                             heads=6, mlp_dim=1536)
    assert presets.vit_config("b16")["width"] == 768 and presets.vit_config("b16")["heads"] == 12
    l16 = presets.vit_config("l16")
    assert (l16["width"], l16["depth"], l16["heads"], l16["mlp_dim"]) == (1024, 24, 16, 4096)
    tiny = presets.vit_config("tiny")
    assert (tiny["image_size"], tiny["patch_size"], tiny["width"], tiny["depth"], tiny["heads"],
            tiny["mlp_dim"]) == (64, 8, 192, 4, 3, 768)
    assert presets.text_config("tiny")["max_len"] == 16
    b16 = presets.text_config("b16")
    assert (b16["width"], b16["depth"], b16["heads"], b16["max_len"]) == (768, 12, 12, 64)
    assert presets.text_config("clip_b16")["max_len"] == 77
    for family in ("vit", "text", "two_tower"):
        assert {"tiny", "s16", "b16", "l16"} <= set(presets.names(family))


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="b16, l16, s16, tiny"):
        presets.vit_config("b32")
    with pytest.raises(ValueError, match="valid names"):
        presets.text_config("huge")
    with pytest.raises(ValueError, match="siglip, clip"):
        presets.two_tower_config("tiny", style="align")
    with pytest.raises(ValueError, match="family"):
        presets.names("audio")


def test_overrides_and_fresh_dicts():
    cfg = presets.vit_config("b16", pool="map", remat=True)
    assert cfg["pool"] == "map" and cfg["remat"] and cfg["width"] == 768
    cfg["width"] = 1
    assert presets.vit_config("b16")["width"] == 768


def test_two_tower_styles():
    siglip = presets.two_tower_config("tiny")
    assert siglip["image"]["pool"] == "map" and "output_dim" not in siglip["image"]
    assert siglip["text"]["pool"] == "last" and not siglip["text"]["causal"]
    assert siglip["text"]["output_dim"] == siglip["embed_dim"] == 192
    clip = presets.two_tower_config("clip_b16")
    assert clip["image"]["pool"] == "cls" and clip["image"]["output_dim"] == 512
    assert clip["text"]["causal"] and clip["text"]["pool"] == "eos"
    assert clip["text"]["width"] == 512
    custom = presets.two_tower_config("tiny", style="clip", text_overrides={"vocab_size": 77})
    assert custom["text"]["vocab_size"] == 77 and custom["text"]["causal"]


def test_tiny_two_tower_builds_and_runs():
    cfg = presets.two_tower_config("tiny")
    image, text = ViTEncoder(**cfg["image"]), TextEncoder(**cfg["text"])
    assert image(np.zeros((1, 64, 64, 3), "float32")).shape == (1, 192)
    assert text(np.array([[1, 5, 2] + [0] * 13])).shape == (1, 192)


# Parameter counts follow from the weights' shapes alone: the same on every backend, so the JAX
# rerun (which would initialise 86M / 110M random weights op by op) leaves them out.
SHAPES_ONLY = pytest.mark.skipif(keras.backend.backend() == "jax",
                                 reason="parameter counts depend on shapes only")


@SHAPES_ONLY
def test_vit_b16_parameter_count():
    model = ViTEncoder(**presets.vit_config("b16"))     # built from shapes: no batch allocated
    model.build((None, 224, 224, 3))
    count = model.count_params()
    assert count == _vit_params(224, 16, 768, 12, 3072)
    # The ViT-B/16 image encoder without head has 85.8M parameters (timm: 85,798,656, which
    # also gives the [CLS] token a position embedding: 768 more than big_vision's layout).
    assert count == 85_798_656 - 768
    assert abs(count - 85.8e6) < 0.05e6


@SHAPES_ONLY
def test_text_b16_parameter_count():
    model = TextEncoder(**presets.text_config("b16", output_dim=768))
    model.build((None, 64))
    width = 768
    expected = (32_000 * width + 64 * width
                + _vit_params(16, 16, width, 12, 3072, pool="gap")  # blocks + final LN + patch
                - (16 * 16 * 3 * width + width) - width          # minus patch emb, 1 pos row
                + width * width + width)                         # head
    assert model.count_params() == expected
    assert np.isclose(model.count_params() / 1e6, 110.3, atol=0.1)
