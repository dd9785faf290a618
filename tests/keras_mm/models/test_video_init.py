"""Image-to-video initialisation (``keras_mm.models.video.initialize_video_tower``, the trainer's
``model.init_checkpoint`` for the video models): a frame-average run's ViT, text tower and logit
scale load into a TubeViT two-tower model, the 2-D patch embedding inflated into the tubes."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_mm.layers.tube_embedding import inflate_patch_kernel
from keras_mm.models.video import build_video_two_tower, initialize_video_tower
from keras_mm.training import checkpoint

pytestmark = pytest.mark.both_backends

V, L = 30, 8
# 4 x 16 x 16 clips: a 2 x 8 x 8 tube and 8 x 8 image patches on every frame (the image tube)
TUBES = [[[2, 8, 8], [2, 8, 8], [0, 0, 0]], [[1, 8, 8], [1, 8, 8], [0, 0, 0]]]
VIDEO = dict(video_size=[4, 16, 16], tubes=TUBES, width=32, depth=2, heads=2, mlp_dim=64,
             output_dim=32)
TEXT = dict(width=32, depth=1, heads=2, mlp_dim=64, output_dim=32)


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _model(encoder, seed, vocab=V, **video):
    keras.utils.set_random_seed(seed)
    model = build_video_two_tower("tiny", "softmax", encoder=encoder, vocab_size=vocab,
                                  max_len=L, video_overrides=dict(VIDEO, **video),
                                  text_overrides=TEXT)
    model({"video": ops.zeros((1, 4, 16, 16, 3)), "text": ops.ones((1, L), "int32")})
    return model


def _variables(model):
    return {v.path: _np(v) for v in model.variables}


def _frame_average_run(tmp_path, seed=0):
    """A frame-average model with non-trivial logit scale, saved as a run's checkpoint."""
    source = _model("frame_average", seed)
    source.logits.log_scale.assign(1.234)
    checkpoint.Checkpointer(str(tmp_path / "checkpoints"), write=True).save(7, source)
    return source


def test_frame_average_run_initialises_tubevit_image_to_video(tmp_path):
    source = _frame_average_run(tmp_path)
    target = _model("tubevit", seed=1, image_position_embedding=True)
    before = _variables(target)
    report = initialize_video_tower(target, checkpoint.read_model_variables(str(tmp_path)))

    # every transformer, head, text and logit variable is the source's
    src = {v.path.replace("frame_encoder/", ""): _np(v) for v in source.variables}
    for v in target.variables:
        if v.path in report["copied"]:
            np.testing.assert_array_equal(_np(v), src[v.path], err_msg=v.path)
    assert any("encoder/block_1" in p for p in report["copied"])
    assert any("text_encoder" in p for p in report["copied"])
    assert "logits/log_scale" in report["copied"]
    assert any(p.endswith("position_embedding/embeddings") for p in report["copied"])
    # the gate is the only video-tower variable left at its initialisation (0)
    assert [p for p in report["kept"] if "video_encoder" in p] == [
        p for p in before if p.endswith("position_gate")]
    assert float(_np(target.image_encoder.position_gate)) == 0.0
    # the tubes are the inflated 2-D patch embedding: kernel / frames, bias as is
    kernel_2d = _np(source.image_encoder.image_encoder.patch_embedding.kernel)
    bias_2d = _np(source.image_encoder.image_encoder.patch_embedding.bias)
    tubes = target.image_encoder.tube_embedding
    assert len(report["inflated"]) == 2 * len(TUBES)
    for (kernel, _, _), k, b in zip(tubes.tubes, tubes.kernels, tubes.biases):
        np.testing.assert_allclose(_np(k), inflate_patch_kernel(kernel_2d, kernel), atol=1e-6)
        np.testing.assert_allclose(_np(k).sum(axis=0), kernel_2d, atol=1e-5)
        np.testing.assert_array_equal(_np(b), bias_2d)


def test_initialised_tubevit_embeds_a_frame_as_the_frame_average_model(tmp_path):
    """With the gate at 0, a one-frame clip (only the image tube fits) goes through exactly the
    image ViT of the frame-average run: same tokens, positions, blocks, pooling and projection.
    Text embeddings are the source's too."""
    source = _frame_average_run(tmp_path)
    target = _model("tubevit", seed=1, image_position_embedding=True)
    frame = np.random.default_rng(3).normal(size=(3, 1, 16, 16, 3)).astype("float32")
    text = np.random.default_rng(4).integers(1, V, size=(3, L)).astype("int32")
    assert not np.allclose(_np(target.embed_image(frame)), _np(source.embed_image(frame)),
                           atol=1e-3)
    initialize_video_tower(target, checkpoint.read_model_variables(
        str(tmp_path / "checkpoints" / "ckpt-00000007")))
    np.testing.assert_allclose(_np(target.embed_image(frame)), _np(source.embed_image(frame)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_np(target.embed_text(text)), _np(source.embed_text(text)),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder", ["tubevit", "frame_average"])
@pytest.mark.jax_all_cases
def test_same_architecture_loads_whole(tmp_path, encoder):
    source = _model(encoder, seed=0)
    checkpoint.Checkpointer(str(tmp_path), write=True).save(3, source)
    target = _model(encoder, seed=5)
    report = initialize_video_tower(target, checkpoint.read_model_variables(str(tmp_path)))
    assert not report["inflated"] and not report["kept"]
    assert len(report["copied"]) == len(target.variables)
    clip = np.random.default_rng(0).normal(size=(2, 4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(_np(target.embed_image(clip)), _np(source.embed_image(clip)),
                               rtol=1e-5, atol=1e-6)


def test_mismatches_are_clear_errors_and_change_nothing(tmp_path):
    _frame_average_run(tmp_path)
    variables = checkpoint.read_model_variables(str(tmp_path))
    # the frame-average position table has no home in a TubeViT without the image variant
    plain = _model("tubevit", seed=1)
    before = _variables(plain)
    with pytest.raises(ValueError, match="image_position_embedding"):
        initialize_video_tower(plain, variables)
    for path, value in _variables(plain).items():
        np.testing.assert_array_equal(value, before[path], err_msg=path)
    # another tokenizer (vocabulary size)
    with pytest.raises(ValueError, match="shape"):
        initialize_video_tower(_model("tubevit", seed=1, vocab=V + 3,
                                      image_position_embedding=True), variables)
    # another depth
    with pytest.raises(ValueError, match="no such variable"):
        initialize_video_tower(_model("tubevit", seed=1, depth=3, image_position_embedding=True),
                               variables)
    with pytest.raises(ValueError, match="no video tower"):
        initialize_video_tower(plain, {"two_tower/image_encoder/x": np.zeros(3)})
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        checkpoint.read_model_variables(str(tmp_path / "nope"))


def test_dropping_the_position_table_starts_a_plain_tubevit(tmp_path):
    """``position_table=False``: the frame-average run's learned 2-D position table is dropped
    and a plain TubeViT (fixed 3-D tube positions) takes everything else; a target with its own
    learned table keeps that table's initialisation."""
    source = _frame_average_run(tmp_path)
    variables = checkpoint.read_model_variables(str(tmp_path))
    plain = _model("tubevit", seed=1)
    report = initialize_video_tower(plain, variables, position_table=False)
    assert report["dropped"] == ["video_encoder/position_embedding/embeddings"]
    assert not [p for p in report["kept"] if "video_encoder" in p]
    assert len(report["inflated"]) == 2 * len(TUBES)
    src = {v.path.replace("frame_encoder/", ""): _np(v) for v in source.variables}
    for v in plain.variables:
        if v.path in report["copied"]:
            np.testing.assert_array_equal(_np(v), src[v.path], err_msg=v.path)
    assert any("encoder/block_1" in p for p in report["copied"])
    # the clips' tokens carry time: a clip and its time reversal now embed differently
    clip = np.random.default_rng(5).normal(size=(2, 4, 16, 16, 3)).astype("float32")
    forward, backward = _np(plain.embed_image(clip)), _np(plain.embed_image(clip[:, ::-1]))
    assert not np.allclose(forward, backward, atol=1e-4)

    gated = _model("tubevit", seed=1, image_position_embedding=True)
    table = _np(gated.image_encoder.position_embedding.embeddings)
    report = initialize_video_tower(gated, variables, position_table=False)
    np.testing.assert_array_equal(_np(gated.image_encoder.position_embedding.embeddings), table)
    assert any(p.endswith("position_embedding/embeddings") for p in report["kept"])
