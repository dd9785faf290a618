"""CLIPPO: one ViT for images and for text rendered as images (Tschannen et al. 2023).

    model = build_clippo("tiny", "softmax")
    model.compile(optimizer=...)
    model.fit(dataset)   # batches {"image": [B, S, S, 3], "text_images": [B, S, S, 3], ...}

CLIPPO is CLIP with its two towers replaced by ONE image encoder: captions are rendered to images
(``keras_mm.pipelines.ops.render_text``; the datasets' ``InputConfig.render_text``) and embedded by
the same ViT, with the same weights, as the images; there is no text tower, token embedding or
tokenizer. The loss is CLIP's softmax contrastive loss over the global batch (the paper's choice);
the SigLIP sigmoid loss works too. Everything else - global-batch loss, logged ``loss`` /
``pair_accuracy`` / ``t`` (/ ``b``), ``embed_image`` / ``embed_text`` / ``similarity`` for the
evaluators and exports - is :class:`~keras_mm.models.two_tower.TwoTowerModel`'s: ``CLIPPOModel``
is a two-tower model whose towers are one and the same encoder.

Encoder (``build_clippo``): the ViT preset's sizes, MAP pooling and a linear head to the
embedding width, and a softmax logit scale starting at t = 10 - the settings of big_vision's
CLIPPO config (``configs/proj/clippo/train_clippo.py``: ``pool_type="map"``, ``out_dim=768`` for
B/16, ``temperature_init=10``).
"""

from __future__ import annotations

import math

import keras

from keras_mm.models.two_tower import TwoTowerModel, l2_normalize

#: Softmax logit scale at init, t = exp(log_scale) = 10 (big_vision's CLIPPO temperature_init).
CLIPPO_LOG_SCALE_INIT = math.log(10.0)


@keras.saving.register_keras_serializable(package="keras_mm")
class CLIPPOModel(TwoTowerModel):
    """One image encoder for images and rendered text, trained with a contrastive loss.

    Args:
        encoder: a Keras model, images ``[B, H, W, 3]`` -> ``[B, D]`` (a ``ViTEncoder``); used
            for both the images and the rendered texts (one set of weights).
        loss: ``"softmax"`` (CLIP, CLIPPO's loss) or ``"sigmoid"`` (SigLIP).
        chunked: SigLIP's chunked form (sigmoid only).
        log_scale_init, bias_init: the initial logit scale log t (and bias b); None: the loss'
            defaults of ``ContrastiveLogits`` (see ``build_clippo`` for CLIPPO's t = 10).

    Inputs of ``call`` / ``fit``: ``{"image": [B, H, W, 3], "text_images": [B, H', W', 3]}``
    (float, the value range of the input pipeline; rendered text may have another size than the
    images when the encoder's position embedding allows it). Outputs: TwoTowerModel's
    ``{"image_emb": [B, D], "text_emb": [B, D], "t": [], ("b": [])}``.
    """

    # The model family named in exports and run summaries.
    family = "clippo"

    def __init__(self, encoder, loss="softmax", chunked=False, log_scale_init=None,
                 bias_init=None, **kwargs):
        super().__init__(encoder, encoder, loss=loss, chunked=chunked, lock_image=False,
                         log_scale_init=log_scale_init, bias_init=bias_init, **kwargs)

    @property
    def encoder(self):
        """The one encoder (``image_encoder is text_encoder is encoder``)."""
        return self.image_encoder

    def embed_text(self, text_images, training=False):
        """Rendered texts ``[B, H, W, 3]`` -> L2-normalised float32 embeddings ``[B, D]``."""
        return l2_normalize(self.encoder(text_images, training=training))

    def call(self, inputs, training=False):
        """``{"image": [B, H, W, 3], "text_images": [B, H, W, 3]}`` -> ``{"image_emb",
        "text_emb"}`` ``[B, D]`` each, plus the scalars ``"t"`` (and ``"b"``, sigmoid)."""
        if "text_images" not in inputs:
            raise KeyError(f"CLIPPOModel takes {{'image', 'text_images'}} (text rendered as "
                           f"images, InputConfig.render_text=True), got {sorted(inputs)}")
        return super().call({"image": inputs["image"], "text": inputs["text_images"]},
                            training=training)

    def get_config(self):
        config = super(TwoTowerModel, self).get_config()     # keras.Model's, not the towers'
        config.update({
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "loss": self.loss_type, "chunked": self.chunked,
            "log_scale_init": self.log_scale_init, "bias_init": self.bias_init,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)


def clippo_encoder_config(preset="tiny", *, image_size=None, embed_dim=None, **overrides):
    """``ViTEncoder`` kwargs of a CLIPPO encoder: the ViT preset's sizes (``tiny``, ``s16``,
    ``b16``, ``l16``), MAP pooling, a linear head to ``embed_dim`` (default: the width), then
    ``overrides``."""
    from keras_mm.encoders import presets

    config = presets.vit_config(preset)
    config.update(pool="map", output_dim=int(embed_dim or config["width"]))
    if image_size is not None:
        config["image_size"] = int(image_size)
    config.update(overrides)
    return config


def build_clippo(preset="tiny", loss="softmax", *, image_size=None, embed_dim=None,
                 encoder_overrides=None, chunked=False, log_scale_init=None, bias_init=None):
    """A CLIPPOModel from a ViT preset name (``keras_mm.encoders.presets``).

    ``image_size``: of the images and of the rendered texts (default: the preset's, 64 for
    ``tiny``, 224 otherwise). ``log_scale_init`` default: CLIPPO's t = 10 for the softmax loss,
    SigLIP's t' = log 10 (with b = -10) for sigmoid.
    """
    from keras_mm.encoders.vit import ViTEncoder

    config = clippo_encoder_config(preset, image_size=image_size, embed_dim=embed_dim,
                                   **dict(encoder_overrides or {}))
    if log_scale_init is None and loss == "softmax":
        log_scale_init = CLIPPO_LOG_SCALE_INIT
    encoder = ViTEncoder(**config, name="encoder")
    return CLIPPOModel(encoder, loss=loss, chunked=chunked, log_scale_init=log_scale_init,
                       bias_init=bias_init, name=f"clippo_{preset}")
