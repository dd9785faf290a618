"""A PaLI-style model (Chen et al. 2022, "PaLI: A Jointly-Scaled Multilingual Language-Image
Model"): ViT tokens and a text prompt go through an encoder-decoder text transformer; one
model, many tasks, chosen by the prompt ("caption en", "what digit is left of the 7?").

    visual = Dense(ViT(image) tokens)                              [B, S, width]
    prompt = token_embedding(prompt ids) + prompt positions        [B, P, width]
    memory = TransformerEncoder(concat(visual, prompt), padding)   [B, S + P, width]
    logits = TextDecoder(target ids, cross-attending to memory)    [B, T, vocab]

PaLI reuses mT5's encoder-decoder and feeds it the ViT tokens as a prefix of the prompt; here
both transformers are trained from scratch, and encoder and decoder share the token embedding
(as T5). Batches: {"image", "prompt" [B, P] ids (no BOS needed), "text" [B, L] target ids with
BOS/EOS}.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding
from keras_mm.layers.transformer_encoder import TransformerEncoder
from keras_mm.models.captioning import CaptionOnlyModel


@keras.saving.register_keras_serializable(package="keras_mm")
class PaLIModel(CaptionOnlyModel):
    """ViT + prompt encoder + text decoder.

    Args:
        image_encoder: a ``ViTEncoder`` (tokens).
        decoder: a ``TextDecoder`` cross-attending in every block.
        encoder_depth: blocks of the multimodal encoder (heads / MLP as the decoder's).
        max_prompt_len: longest prompt P.
        blind, label_smoothing: see ``CaptionerMixin`` (blind zeroes the visual tokens only).
    """

    family = "pali"

    def __init__(self, image_encoder, decoder, encoder_depth=2, max_prompt_len=16, blind=False,
                 label_smoothing=0.0, **kwargs):
        super().__init__(**kwargs)
        self.image_encoder = image_encoder
        self.decoder = decoder
        self.encoder_depth = int(encoder_depth)
        self.max_prompt_len = int(max_prompt_len)
        self.visual_projection = keras.layers.Dense(decoder.width, name="visual_projection")
        self.prompt_position = LearnedPositionEmbedding(self.max_prompt_len,
                                                        name="prompt_position")
        self.encoder = TransformerEncoder(
            self.encoder_depth, decoder.heads, decoder.mlp_dim, dropout=decoder.dropout,
            layer_norm_epsilon=decoder.layer_norm_epsilon, name="encoder")
        self._init_captioner(blind=blind, label_smoothing=label_smoothing)
        self._build_decoder(decoder.width)              # cross-attends to the encoder output

    def caption_context(self, images, training=False, prompt=None):
        """images ``[B, H, W, 3]``, prompt ``[B, P]`` ids -> (memory ``[B, S + P, width]``,
        mask ``[B, S + P]``)."""
        if prompt is None:
            raise ValueError("the PaLI-style model needs a prompt (token ids [B, P])")
        _, tokens = self.image_encoder(images, training=training, return_tokens=True)
        visual = self._blinded(self.visual_projection(tokens))
        prompt = ops.cast(prompt, "int32")
        text = self.prompt_position(self.decoder.token_embedding(prompt))
        x = ops.concatenate([visual, ops.cast(text, visual.dtype)], axis=1)
        mask = ops.concatenate([ops.ones(ops.shape(visual)[:2], dtype="bool"),
                                ops.not_equal(prompt, self.decoder.pad_id)], axis=1)
        return self.encoder(x, attention_mask=mask, training=training), mask

    def call(self, inputs, training=False):
        """{"image", "prompt", "text"} -> {"logits", "caption_loss", "token_accuracy"}."""
        logits = self.caption_logits(inputs["image"], inputs["text"], training=training,
                                     prompt=inputs["prompt"])
        return {"logits": logits, **self.caption_terms(logits, inputs["text"])}

    def get_config(self):
        config = super().get_config()
        config.update({
            "image_encoder": keras.saving.serialize_keras_object(self.image_encoder),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "encoder_depth": self.encoder_depth, "max_prompt_len": self.max_prompt_len,
            "blind": self.blind, "label_smoothing": self.label_smoothing})
        return config
