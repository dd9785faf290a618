"""MaMMUT (Kuo et al. 2023, "MaMMUT: A Simple Architecture for Joint Learning for MultiModal
Tasks"): one vision encoder and ONE text decoder, run twice per step.

    pass 1 (contrastive): decoder blocks, bidirectional, cross-attention OFF (the text never sees
        the image), final LayerNorm, mean over the non-pad tokens -> text embedding
    pass 2 (captioning):  the same blocks, causal, cross-attending to the image tokens in M of
        the N blocks (M ~ N / 2: ``cross_attention="every_other"``)
    L = contrastive_weight * L_con + caption_weight * L_cap          (equal weights: Sec. 4.3)

All decoder weights are shared by the two passes and the gradients of both losses add up.
``contrastive="softmax"`` is the CLIP loss over the global batch; ``"focal"`` the focal
contrastive loss of RO-ViT (Kim et al. 2023) that MaMMUT uses, p_ij = sigmoid(s_ij / tau) over
every image-text pair of the global batch (``keras_mm.losses.focal_contrastive``). The image
embedding is the encoder's pooled output projected to ``embed_dim``. Cropped positional
embeddings are an option of the image encoder (``ViTEncoder(position_crop=...)``).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers import pooling
from keras_mm.models.captioning import ContrastiveCaptionerModel, teacher_forcing
from keras_mm.models.two_tower import (contrastive_caption, embed_negatives, l2_normalize,
                                       softmax_extras)
from keras_mm.training import global_batch

CONTRASTIVE_LOSSES = ("softmax", "focal")


@keras.saving.register_keras_serializable(package="keras_mm")
class MaMMUTModel(ContrastiveCaptionerModel):
    """Image encoder + one two-pass text decoder.

    Args:
        image_encoder: a ``ViTEncoder`` (tokens for the captioning pass, pooled output for the
            contrastive embedding).
        decoder: a ``TextDecoder`` with cross-attention in some blocks (about half).
        embed_dim: width of the contrastive embeddings.
        contrastive: ``"softmax"`` or ``"focal"``.
        focal_gamma: gamma of the focal loss.
        contrastive_weight, caption_weight: loss weights (1 and 1).
        blind, label_smoothing: see ``CaptionerMixin``.
        visual_key: the batch key of the visual input (``"image"``; ``"video"`` for MaMMUT
            video, with a ``TubeViTEncoder(image_position_embedding=True)`` or a
            ``FrameAverageEncoder`` as ``image_encoder``).
    """

    family = "mammut"

    def __init__(self, image_encoder, decoder, embed_dim=None, contrastive="softmax",
                 focal_gamma=2.0, contrastive_weight=1.0, caption_weight=1.0, blind=False,
                 label_smoothing=0.0, log_scale_init=None, visual_key="image", **kwargs):
        if contrastive not in CONTRASTIVE_LOSSES:
            raise ValueError(f"contrastive must be one of {CONTRASTIVE_LOSSES}, "
                             f"got {contrastive!r}")
        super().__init__(None, None, loss="softmax", log_scale_init=log_scale_init,
                         visual_key=visual_key, **kwargs)
        if not decoder.cross_layers:
            raise ValueError("MaMMUT's decoder needs cross-attention in some blocks")
        self.image_encoder_model = image_encoder
        self.decoder = decoder
        self.embed_dim = int(embed_dim or decoder.width)
        self.contrastive = contrastive
        self.focal_gamma = float(focal_gamma)
        self.contrastive_weight = float(contrastive_weight)
        self.caption_weight = float(caption_weight)
        self.image_projection = keras.layers.Dense(self.embed_dim, use_bias=False,
                                                   name="image_projection")
        self.text_projection = keras.layers.Dense(self.embed_dim, use_bias=False,
                                                  name="text_projection")
        self._init_captioner(blind=blind, label_smoothing=label_smoothing)
        self._build_decoder(image_encoder.width)        # cross-attends to the image tokens

    # -- pieces ------------------------------------------------------------------------------
    def _image(self, images, training=False):
        pooled, tokens = self.image_encoder_model(images, training=training, return_tokens=True)
        return l2_normalize(self.image_projection(pooled)), tokens

    def caption_context(self, images, training=False):
        return self._blinded(self._image(images, training=training)[1]), None

    def contrastive_text(self, inputs, training=False):
        """Pass 1: bidirectional, no cross-attention, mean-pooled -> ``[B, D]`` normalised."""
        padding = ops.not_equal(inputs, self.decoder.pad_id)
        x = self.decoder.run_blocks(self.decoder.embed(inputs, training=training),
                                    padding_mask=padding, use_causal_mask=False,
                                    use_cross_attention=False, training=training)
        pooled = pooling.global_average(self.decoder.final_norm(x), padding)
        return l2_normalize(self.text_projection(pooled))

    # -- two-tower views ---------------------------------------------------------------------
    def embed_image(self, images, training=False):
        return self._image(images, training=training)[0]

    def embed_text(self, token_ids, training=False):
        inputs, _ = teacher_forcing(token_ids)
        return self.contrastive_text(inputs, training=training)

    def call(self, inputs, training=False):
        """{"image" (``visual_key``), "text"} -> {"image_emb", "text_emb", "logits",
        "caption_loss", "token_accuracy", "t"}; with ``text_contrastive`` (a second caption) the
        contrastive pass reads it instead of ``text``, and ``text_ids`` holds its token ids."""
        image_emb, tokens = self._image(inputs[self.visual_key], training=training)
        text_inputs, _ = teacher_forcing(inputs["text"])
        contrastive = contrastive_caption(self.embed_text, inputs, training)
        if not contrastive:
            contrastive = {"text_emb": self.contrastive_text(text_inputs, training=training)}
        logits = self.decoder(text_inputs, self._blinded(tokens), training=training)
        return {"image_emb": image_emb, "logits": logits, "t": self.logits.scale, **contrastive,
                **self.caption_terms(logits, inputs["text"]),
                **embed_negatives(self.embed_text, inputs, training)}

    def contrastive_share(self, x, y, y_pred, sample_weight=None, training=True):
        extras = softmax_extras(y_pred, self.contrastive)
        if self.contrastive == "focal":
            return global_batch.global_focal_loss(
                y_pred["image_emb"], y_pred["text_emb"], 1.0 / self.logits.scale,
                gamma=self.focal_gamma)
        return global_batch.global_softmax_loss(
            y_pred["image_emb"], y_pred["text_emb"], self.logits.log_scale,
            max_scale=self.logits.max_scale, **extras)

    def get_config(self):
        config = keras.Model.get_config(self)
        config.update({
            "image_encoder": keras.saving.serialize_keras_object(self.image_encoder_model),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "embed_dim": self.embed_dim, "contrastive": self.contrastive,
            "focal_gamma": self.focal_gamma, "contrastive_weight": self.contrastive_weight,
            "caption_weight": self.caption_weight, "blind": self.blind,
            "label_smoothing": self.label_smoothing, "log_scale_init": self.log_scale_init,
            "visual_key": self.visual_key})
        return config
