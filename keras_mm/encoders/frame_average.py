"""Frame-averaging video encoder: an image encoder run on every frame, embeddings averaged over
time (CLIP4Clip's "mean pooling", Luo et al. 2022). The baseline of the video models: it sees every
frame but not their order, so it cannot tell a digit moving left from one moving right.

    frames = reshape(video, [B * T, H, W, 3])
    e, tok = image_encoder(frames, return_tokens=True)     [B * T, D], [B * T, N, width]
    embedding = mean_t reshape(e, [B, T, D])                [B, D]
    tokens = reshape(tok, [B, T * N, width])                frame 0's N tokens, then frame 1's ...
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_mm")
class FrameAverageEncoder(keras.Model):
    """Videos ``[batch, T, H, W, 3]`` -> embeddings ``[batch, D]``, the mean over the frames of
    ``image_encoder``'s embedding of each frame (float32).

    ``call(video, pre_head=True)`` averages the frames' pooled features before the image
    encoder's projection head instead (linear-probe features).
    ``call(video, return_tokens=True)`` returns ``(embedding, tokens)``: the per-frame tokens
    concatenated over time, ``[batch, T * N, width]`` (frame-major: ``tokens[:, t*N:(t+1)*N]``
    are frame ``t``'s), with no temporal position added - a decoder cross-attending to them sees
    a set of frames, as the embedding does (N counts a class token where the image encoder
    has one). Images ``[batch, H, W, 3]`` are one-frame videos.

    Args:
        image_encoder: a ``ViTEncoder`` (or any model ``images [n, H, W, 3] -> [n, D]`` taking
            ``return_tokens``).

    Attributes:
        width: the token width (the image encoder's).
    """

    def __init__(self, image_encoder, **kwargs):
        super().__init__(**kwargs)
        self.image_encoder = image_encoder
        self.width = int(image_encoder.width)

    def build(self, input_shape):
        shape = tuple(input_shape)
        if len(shape) == 4:
            shape = (shape[0], 1) + shape[1:]
        if len(shape) != 5:
            raise ValueError(f"FrameAverageEncoder takes videos [batch, T, H, W, C] or images "
                             f"[batch, H, W, C], got {tuple(input_shape)}")
        if not self.image_encoder.built:
            self.image_encoder.build((None,) + shape[2:])

    def call(self, video, training=None, return_tokens=False, pre_head=False):
        if len(video.shape) == 4:
            video = ops.expand_dims(video, 1)                     # [b, 1, H, W, C]
        batch = ops.shape(video)[0]
        h, w, c = video.shape[2:]
        flat = ops.reshape(video, (-1, h, w, c))                  # [b * T, H, W, C]
        embedding, tokens = self.image_encoder(flat, training=training, return_tokens=True,
                                               pre_head=pre_head)
        embedding = ops.reshape(ops.cast(embedding, "float32"),
                                (batch, -1, embedding.shape[-1]))
        embedding = ops.mean(embedding, axis=1)                  # [b, D]
        if not return_tokens:
            return embedding
        tokens = ops.reshape(tokens, (batch, -1, tokens.shape[-1]))  # [b, T * N, width]
        return embedding, tokens

    def get_config(self):
        config = super().get_config()
        config["image_encoder"] = keras.saving.serialize_keras_object(self.image_encoder)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["image_encoder"] = keras.saving.deserialize_keras_object(config["image_encoder"])
        return cls(**config)
