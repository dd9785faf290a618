"""CapPa (Tschannen et al. 2023, "Image Captioners Are Scalable Vision Learners Too"): a plain
encoder-decoder captioner, trained autoregressively and, on a fraction of the examples (75% by
default), with parallel prediction: every decoder input is replaced by a mask token, the causal
mask is dropped, and the decoder predicts all caption tokens at once from the image alone. This
forces the image encoder to carry the caption (the decoder cannot lean on the text prefix).

Both kinds of example share one decoder pass: the self-attention mask is per example (causal +
padding for autoregressive rows; all positions, including padding, for parallel rows: at
inference a parallel decode sees only mask tokens, with no length hint). Zero-shot
classification scores each class's caption by its likelihood (``score_texts``).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.models.captioning import CaptionOnlyModel, teacher_forcing


@keras.saving.register_keras_serializable(package="keras_mm")
class CapPaModel(CaptionOnlyModel):
    """ViT encoder -> (projected tokens) -> text decoder cross-attending in every block.

    Args:
        image_encoder: a ``ViTEncoder`` (its tokens are the decoder's context).
        decoder: a ``TextDecoder`` with ``extra_tokens >= 1`` (the first extra id is the mask
            token).
        parallel_fraction: fraction of each batch trained with parallel prediction (0.75).
        blind, label_smoothing: see ``CaptionerMixin``.
    """

    family = "cappa"

    def __init__(self, image_encoder, decoder, parallel_fraction=0.75, blind=False,
                 label_smoothing=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        if decoder.extra_tokens < 1:
            raise ValueError("CapPa's decoder needs extra_tokens >= 1 (the mask token)")
        if not 0.0 <= float(parallel_fraction) <= 1.0:
            raise ValueError(f"parallel_fraction must be in [0, 1], got {parallel_fraction}")
        self.image_encoder = image_encoder
        self.decoder = decoder
        self.mask_id = decoder.vocab_size
        self.parallel_fraction = float(parallel_fraction)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self._init_captioner(blind=blind, label_smoothing=label_smoothing)
        self._build_decoder(image_encoder.width)        # cross-attends to the image tokens

    def caption_context(self, images, training=False):
        _, tokens = self.image_encoder(images, training=training, return_tokens=True)
        return self._blinded(tokens), None

    def parallel_inputs(self, inputs, parallel):
        """Decoder inputs and self-attention mask for rows chosen for parallel prediction.

        inputs ``[B, T]`` ids, parallel ``[B]`` bool -> ``(ids [B, T], mask [B, 1, T, T])``:
        parallel rows become all mask tokens attending everywhere; the others keep their ids
        with a causal + padding mask."""
        t = ops.shape(inputs)[1]
        parallel = ops.cast(parallel, "bool")
        ids = ops.where(parallel[:, None], ops.full_like(inputs, self.mask_id), inputs)
        causal = ops.greater_equal(ops.arange(t)[:, None], ops.arange(t)[None, :])  # [T, T]
        keys = ops.not_equal(inputs, self.decoder.pad_id)[:, None, :]               # [B, 1, T]
        autoregressive = ops.logical_and(causal[None], keys)                        # [B, T, T]
        mask = ops.logical_or(autoregressive, parallel[:, None, None])
        return ids, mask[:, None]

    def call(self, inputs, training=False):
        """{"image", "text"} -> {"logits" [B, T, V], "caption_loss", "token_accuracy"}; in
        training a random ``parallel_fraction`` of the rows use parallel prediction."""
        context, _ = self.caption_context(inputs["image"], training=training)
        text_inputs, _ = teacher_forcing(inputs["text"])
        if training and self.parallel_fraction > 0:
            draw = keras.random.uniform((ops.shape(text_inputs)[0],), seed=self.seed_generator)
            ids, mask = self.parallel_inputs(text_inputs, draw < self.parallel_fraction)
            logits = self.decoder(ids, context, padding_mask=mask, use_causal_mask=False,
                                  training=training)
        else:
            logits = self.decoder(text_inputs, context, training=training)
        return {"logits": logits, **self.caption_terms(logits, inputs["text"])}

    def parallel_decode(self, images, max_length=None):
        """One decoder pass over mask tokens -> argmax ids ``[B, max_length]`` (PAD after the
        first EOS): CapPa's parallel decoding."""
        context, _ = self.caption_context(images)
        length = int(max_length or self.decoder.max_len)
        ids = ops.full((ops.shape(context)[0], length), self.mask_id, dtype="int32")
        logits = self.decoder(ids, context, padding_mask=ops.ones_like(ids, dtype="bool"),
                              use_causal_mask=False)
        tokens = ops.cast(ops.argmax(logits, axis=-1), "int32")
        return pad_after_eos(tokens, self.decoder.eos_id, self.decoder.pad_id)

    def get_config(self):
        config = super().get_config()
        config.update({
            "image_encoder": keras.saving.serialize_keras_object(self.image_encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "parallel_fraction": self.parallel_fraction, "blind": self.blind,
            "label_smoothing": self.label_smoothing, "seed": self.seed})
        return config


def pad_after_eos(tokens, eos_id, pad_id=0):
    """``[B, T]`` ids -> the same with every position after the first EOS set to ``pad_id``."""
    is_eos = ops.cast(ops.equal(tokens, eos_id), "int32")
    seen_before = ops.cumsum(is_eos, axis=1) - is_eos                   # EOS strictly before
    return ops.where(seen_before > 0, ops.full_like(tokens, pad_id), tokens)
