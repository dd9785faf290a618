"""``pre_head=True``: the encoders' pooled features before the projection head (the features of
linear probes, CLIP's protocol), for the ViT, TubeViT and the frame-average tower."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.encoders.frame_average import FrameAverageEncoder
from keras_mm.encoders.tubevit import TubeViTEncoder
from keras_mm.encoders.vit import ViTEncoder

pytestmark = pytest.mark.both_backends
TUBES = [[[2, 8, 8], [2, 8, 8], [0, 0, 0]], [[1, 8, 8], [2, 8, 8], [0, 0, 0]]]


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


@pytest.mark.parametrize("pool", ["gap", "map"])
def test_pre_head_is_the_pooled_features_the_head_projects(pool):
    keras.utils.set_random_seed(0)
    vit = ViTEncoder(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64,
                     pool=pool, output_dim=24)
    tube = TubeViTEncoder(video_size=[4, 16, 16], tubes=TUBES, width=32, depth=1, heads=2,
                          mlp_dim=64, pool=pool, output_dim=24)
    images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype("float32")
    video = np.random.default_rng(1).normal(size=(3, 4, 16, 16, 3)).astype("float32")
    for encoder, x in ((vit, images), (tube, video)):
        embedding, tokens = encoder(x, return_tokens=True)
        pooled = _np(encoder(x, pre_head=True))
        assert pooled.shape == (3, 32) and embedding.shape == (3, 24)
        np.testing.assert_allclose(_np(encoder.head(pooled)), _np(embedding), atol=1e-5)
        if pool == "gap":
            np.testing.assert_allclose(pooled, _np(tokens).mean(axis=1), atol=1e-5)


def test_frame_average_pre_head_averages_the_frames_pooled_features():
    keras.utils.set_random_seed(0)
    vit = ViTEncoder(image_size=16, patch_size=8, width=32, depth=1, heads=2, mlp_dim=64,
                     pool="gap", output_dim=24)
    tower = FrameAverageEncoder(vit)
    video = np.random.default_rng(2).normal(size=(2, 3, 16, 16, 3)).astype("float32")
    tower(video)
    pooled = _np(tower(video, pre_head=True))
    per_frame = _np(vit(video.reshape(6, 16, 16, 3), pre_head=True)).reshape(2, 3, 32)
    np.testing.assert_allclose(pooled, per_frame.mean(axis=1), atol=1e-5)
    assert _np(tower(video)).shape == (2, 24)
