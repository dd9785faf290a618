"""FrameAverageEncoder: the mean of the image encoder's frame embeddings, tokens concatenated
frame by frame, blind to frame order, serializable."""

import numpy as np
import pytest
from keras import ops

from keras_mm.encoders.frame_average import FrameAverageEncoder
from keras_mm.encoders.vit import ViTEncoder
from tests.keras_mm.serialization import assert_serialization_round_trip

pytestmark = pytest.mark.both_backends
RNG = np.random.default_rng(0)
VIT = dict(image_size=16, patch_size=8, width=16, depth=1, heads=2, mlp_dim=32, pool="gap")
B, T = 3, 4


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _encoder(**kw):
    return FrameAverageEncoder(ViTEncoder(**{**VIT, **kw}, name="frame_encoder"))


def _video(batch=B, frames=T):
    return RNG.normal(size=(batch, frames, 16, 16, 3)).astype("float32")


@pytest.mark.parametrize("pool,output_dim", [("gap", None), ("map", 8)])
def test_embedding_is_the_mean_of_the_frame_embeddings(pool, output_dim):
    model = _encoder(pool=pool, output_dim=output_dim)
    video = _video()
    embedding, tokens = model(video, return_tokens=True)
    embedding, tokens = _np(embedding), _np(tokens)
    d = output_dim or VIT["width"]
    assert model.width == VIT["width"]
    assert embedding.shape == (B, d) and embedding.dtype == np.float32
    n = (16 // 8) ** 2
    assert tokens.shape == (B, T * n, VIT["width"])
    # Reference: the image encoder on one frame at a time, one clip at a time, mean in NumPy.
    for b in range(B):
        frame_embs = []
        for t in range(T):
            e, tok = model.image_encoder(video[b:b + 1, t], return_tokens=True)
            frame_embs.append(_np(e)[0].astype(np.float64))
            np.testing.assert_allclose(tokens[b, t * n:(t + 1) * n], _np(tok)[0], atol=1e-5)
        np.testing.assert_allclose(embedding[b], np.mean(frame_embs, axis=0), atol=1e-5)
    np.testing.assert_allclose(_np(model(video)), embedding, atol=1e-6)


def test_blind_to_frame_order_but_not_to_frame_content():
    model = _encoder()
    video = _video()
    base = _np(model(video))
    shuffled = video[:, [2, 0, 3, 1]]
    np.testing.assert_allclose(_np(model(shuffled)), base, atol=1e-5)
    reversed_ = video[:, ::-1]
    np.testing.assert_allclose(_np(model(reversed_)), base, atol=1e-5)
    changed = video.copy()
    changed[:, 1] = RNG.normal(size=changed[:, 1].shape)
    assert np.abs(_np(model(changed)) - base).max() > 1e-4


def test_an_image_is_a_one_frame_video_and_other_lengths_work():
    model = _encoder()
    video = _video(frames=1)
    np.testing.assert_allclose(_np(model(video[:, 0])), _np(model.image_encoder(video[:, 0])),
                               atol=1e-6)
    longer = _video(frames=7)
    assert _np(model(longer, return_tokens=True)[1]).shape == (B, 7 * 4, VIT["width"])
    with pytest.raises(ValueError, match="videos"):
        model.build((B, 16, 16))


def test_serialization_round_trip():
    model = _encoder(pool="map", output_dim=8)
    video = _video()
    model(video)
    loaded = assert_serialization_round_trip(model, video, atol=1e-5)
    assert isinstance(loaded.image_encoder, ViTEncoder) and loaded.width == VIT["width"]
    assert_serialization_round_trip(model, video, call_kwargs={"return_tokens": True},
                                    atol=1e-5)
