"""CoCa (Yu et al. 2022, "Contrastive Captioners are Image-Text Foundation Models").

Algorithm 1 of the paper::

    img_feature = vit_encoder(image)                              [B, S, C]
    con_feature = attentional_pooling(img_feature, con_query)     [B, 1, D]
    cap_feature = attentional_pooling(img_feature, cap_query)     [B, N, D]
    ids = concat(text.ids, cls_token_id)
    unimodal_out = lm_transformers(embed(ids), mask, cross_attn=None)       (first n_uni blocks)
    multimodal_out = lm_transformers(unimodal_out[:, :-1], mask, cross_attn=cap_feature)
    cls_token_feature = layer_norm(unimodal_out)[:, -1:]
    L = lambda_con * L_con(con_feature, cls_token_feature) + lambda_cap * L_cap(multimodal_out)

with lambda_con = 1.0 and lambda_cap = 2.0 (Sec. 4.1). The decoder is one
:class:`~keras_mm.decoders.text_decoder.TextDecoder` of ``n_uni + n_multi`` blocks with
cross-attention in the last ``n_multi``; the cls token is an input-only extra token id. Because
the unimodal blocks are causal, appending cls changes no other position, so generation runs the
whole stack without it. The contrastive half is the two-tower one (global batch, CLIP softmax by
default): ``CoCaModel`` is a ``TwoTowerModel`` whose towers are views of this model, so zero-shot,
retrieval and the embedding / classify export signatures work unchanged.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.attentional_pooler import AttentionalPooler
from keras_mm.models.captioning import ContrastiveCaptionerModel, teacher_forcing
from keras_mm.models.two_tower import contrastive_caption, embed_negatives, l2_normalize


@keras.saving.register_keras_serializable(package="keras_mm")
class CoCaModel(ContrastiveCaptionerModel):
    """Image encoder + attentional poolers + unimodal / multimodal text decoder.

    Args:
        image_encoder: a ``ViTEncoder`` (its tokens ``[B, S, C]`` are used).
        decoder: a ``TextDecoder`` with ``extra_tokens >= 1`` (the first extra id is cls) and
            cross-attention exactly in its last ``depth - unimodal_layers`` blocks.
        unimodal_layers: n_uni, the blocks without cross-attention.
        embed_dim: width of the contrastive embeddings.
        num_caption_queries: N, the captioning pooler's queries.
        pooler_heads: heads of both poolers.
        loss: contrastive loss ``"softmax"`` (CoCa) or ``"sigmoid"``.
        contrastive_weight, caption_weight: lambda_con, lambda_cap.
        blind: zero the image context of the captioning half (baseline).
        label_smoothing: of the captioning loss.
    """

    family = "coca"

    def __init__(self, image_encoder, decoder, unimodal_layers, embed_dim=None,
                 num_caption_queries=64, pooler_heads=8, loss="softmax",
                 contrastive_weight=1.0, caption_weight=2.0, blind=False, label_smoothing=0.0,
                 log_scale_init=None, bias_init=None, **kwargs):
        super().__init__(None, None, loss=loss, log_scale_init=log_scale_init,
                         bias_init=bias_init, **kwargs)
        self.image_encoder_model = image_encoder
        self.decoder = decoder
        self.unimodal_layers = int(unimodal_layers)
        expected = tuple(range(self.unimodal_layers, decoder.depth))
        if tuple(decoder.cross_layers) != expected:
            raise ValueError(f"CoCa's decoder needs cross-attention in blocks {expected} "
                             f"(the last {decoder.depth - self.unimodal_layers}), "
                             f"got {decoder.cross_layers}")
        if decoder.extra_tokens < 1:
            raise ValueError("CoCa's decoder needs extra_tokens >= 1 (the cls token)")
        self.cls_id = decoder.vocab_size
        self.embed_dim = int(embed_dim or decoder.width)
        self.num_caption_queries = int(num_caption_queries)
        self.pooler_heads = int(pooler_heads)
        self.contrastive_weight = float(contrastive_weight)
        self.caption_weight = float(caption_weight)
        self.contrastive_pooler = AttentionalPooler(1, self.pooler_heads, self.embed_dim,
                                                    name="contrastive_pooler")
        self.caption_pooler = AttentionalPooler(self.num_caption_queries, self.pooler_heads,
                                                decoder.width, name="caption_pooler")
        self.cls_norm = keras.layers.LayerNormalization(epsilon=decoder.layer_norm_epsilon,
                                                        name="cls_norm")
        self.text_projection = keras.layers.Dense(self.embed_dim, use_bias=False,
                                                  name="text_projection")
        self._init_captioner(blind=blind, label_smoothing=label_smoothing)
        self._build_decoder(decoder.width)              # the captioning pooler's width

    # -- pieces -----------------------------------------------------------------------------
    def image_tokens(self, images, training=False):
        """``[B, H, W, 3] -> [B, S, C]`` encoder tokens."""
        _, tokens = self.image_encoder_model(images, training=training, return_tokens=True)
        return tokens

    def caption_context(self, images, training=False):
        tokens = self.image_tokens(images, training=training)
        return self._blinded(self.caption_pooler(tokens)), None

    def _with_cls(self, inputs):
        cls = ops.full((ops.shape(inputs)[0], 1), self.cls_id, dtype="int32")
        return ops.concatenate([inputs, cls], axis=1)                      # [B, L]

    def _text_pass(self, inputs, caption_context=None, training=False):
        """Unimodal blocks on ``inputs + cls``; then, given a context, the multimodal blocks.
        Returns ``(text embedding [B, D] float32 (not normalised), logits or None)``."""
        ids = self._with_cls(inputs)
        padding = ops.not_equal(ids, self.decoder.pad_id)
        x = self.decoder.embed(ids, training=training)
        uni = self.decoder.run_blocks(x, padding_mask=padding, training=training,
                                      stop=self.unimodal_layers)
        text_emb = self.text_projection(self.cls_norm(uni[:, -1]))
        logits = None
        if caption_context is not None:
            multi = self.decoder.run_blocks(uni[:, :-1], caption_context,
                                            padding_mask=padding[:, :-1], training=training,
                                            start=self.unimodal_layers)
            logits = self.decoder.logits(multi)
        return ops.cast(text_emb, "float32"), logits

    @property
    def max_caption_length(self):
        return self.decoder.max_len - 1          # the last position is the cls token's

    # -- two-tower views ---------------------------------------------------------------------
    def embed_image(self, images, training=False):
        tokens = self.image_tokens(images, training=training)
        return l2_normalize(self.contrastive_pooler(tokens)[:, 0])

    def embed_text(self, token_ids, training=False):
        inputs, _ = teacher_forcing(token_ids)
        return l2_normalize(self._text_pass(inputs, training=training)[0])

    def call(self, inputs, training=False):
        """{"image", "text"} -> {"image_emb", "text_emb", "logits" [B, L-1, V], "t"(, "b")}.
        With ``text_contrastive`` (a second caption), ``text_emb`` is that caption's and
        ``text_ids`` its token ids; ``text`` is still the one captioned."""
        tokens = self.image_tokens(inputs["image"], training=training)
        image_emb = l2_normalize(self.contrastive_pooler(tokens)[:, 0])
        context = self._blinded(self.caption_pooler(tokens))
        text_inputs, _ = teacher_forcing(inputs["text"])
        text_emb, logits = self._text_pass(text_inputs, context, training=training)
        out = {"image_emb": image_emb, "text_emb": l2_normalize(text_emb), "logits": logits,
               "t": self.logits.scale, **self.caption_terms(logits, inputs["text"]),
               **embed_negatives(self.embed_text, inputs, training),
               **contrastive_caption(self.embed_text, inputs, training)}
        if self.logits.bias is not None:
            out["b"] = ops.cast(self.logits.bias, "float32")
        return out

    def get_config(self):
        config = keras.Model.get_config(self)
        config.update({
            "image_encoder": keras.saving.serialize_keras_object(self.image_encoder_model),
            "decoder": keras.saving.serialize_keras_object(self.decoder),
            "unimodal_layers": self.unimodal_layers, "embed_dim": self.embed_dim,
            "num_caption_queries": self.num_caption_queries,
            "pooler_heads": self.pooler_heads, "loss": self.loss_type,
            "contrastive_weight": self.contrastive_weight,
            "caption_weight": self.caption_weight, "blind": self.blind,
            "label_smoothing": self.label_smoothing, "log_scale_init": self.log_scale_init,
            "bias_init": self.bias_init})
        return config
