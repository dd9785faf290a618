"""Transformer text decoder over token ids with optional cross-attention to a context (image
tokens, attentional-pooler queries, an encoder's output), and incremental decoding with a key /
value cache for the in-graph searches of :mod:`keras_mm.decoders.search`.

Where the cross-attention layers go (``cross_attention``):

  ``"all"``          every block (CapPa, PaLI, CoCa's multimodal part when it is the whole stack)
  ``"none"``         no block (a language model; the blind baseline)
  ``"every_other"``  blocks 1, 3, 5, ... (MaMMUT: M = N / 2 of N)
  ``"last_M"``       the last M blocks (CoCa: unimodal blocks first, multimodal last)
  ``"first_M"``      the first M blocks
  ``"0,2,5"``        the listed blocks

Token ids follow keras_mm's tokenizer (PAD 0, BOS 1, EOS 2). ``extra_tokens`` adds input-only
ids ``vocab_size .. vocab_size + extra_tokens - 1`` (CoCa's cls token, CapPa's mask token): they
have embeddings but are never predicted, so the logits stay ``[..., vocab_size]``.
"""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.decoders import search
from keras_mm.decoders.decoder_block import DecoderBlock
from keras_mm.layers.learned_position_embedding import LearnedPositionEmbedding

SEARCH_METHODS = ("greedy", "beam", "sample")


def cross_attention_layers(spec, depth):
    """The sorted block indices with cross-attention for a placement ``spec`` (see the module
    docstring) in a decoder of ``depth`` blocks."""
    depth = int(depth)
    if isinstance(spec, (list, tuple)):
        layers = [int(i) for i in spec]
    elif spec == "all":
        layers = list(range(depth))
    elif spec == "none":
        layers = []
    elif spec == "every_other":
        layers = list(range(1, depth, 2))
    elif isinstance(spec, str) and spec.startswith(("last_", "first_")):
        where, _, count = spec.partition("_")
        if not count.isdigit() or int(count) > depth:
            raise ValueError(f"cross_attention {spec!r}: need {where}_M with 0 <= M <= {depth}")
        m = int(count)
        layers = list(range(depth - m, depth)) if where == "last" else list(range(m))
    elif isinstance(spec, str) and all(p.strip().isdigit() for p in spec.split(",")):
        layers = [int(p) for p in spec.split(",")]
    else:
        raise ValueError(f"cross_attention must be 'all', 'none', 'every_other', 'last_M', "
                         f"'first_M' or a list of block indices, got {spec!r}")
    if any(i < 0 or i >= depth for i in layers):
        raise ValueError(f"cross_attention {spec!r}: block indices must be in [0, {depth})")
    return tuple(sorted(set(layers)))


@keras.saving.register_keras_serializable(package="keras_mm")
class TextDecoder(keras.layers.Layer):
    """Token ids ``[batch, L]`` (+ a context ``[batch, S, C]``) -> logits ``[batch, L, vocab]``
    (float32).

    Args:
        vocab_size: predicted vocabulary (the tokenizer's).
        max_len: longest sequence (learned position embeddings; the longest decode).
        width, depth, heads, mlp_dim: transformer sizes.
        cross_attention: placement of cross-attention blocks (module docstring).
        tie_embeddings: logits = final tokens x token embeddings^T (+ a bias); False: a separate
            output projection.
        extra_tokens: input-only token ids after the vocabulary (cls / mask tokens).
        pad_id, bos_id, eos_id: special ids.
        dropout, attention_dropout, qk_norm, use_qkv_bias, fused_qkv, attention_impl,
            activation, layer_norm_epsilon: of every :class:`DecoderBlock`.
    """

    def __init__(self, vocab_size, max_len=32, width=512, depth=6, heads=8, mlp_dim=2048,
                 cross_attention="all", tie_embeddings=True, extra_tokens=0, pad_id=0,
                 bos_id=1, eos_id=2, dropout=0.0, attention_dropout=0.0, qk_norm=False,
                 use_qkv_bias=True, fused_qkv=True, attention_impl=None,
                 activation="gelu_approximate", layer_norm_epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.max_len = int(vocab_size), int(max_len)
        self.width, self.depth, self.heads = int(width), int(depth), int(heads)
        self.mlp_dim = int(mlp_dim)
        self.cross_attention = (list(cross_attention) if isinstance(cross_attention, (list, tuple))
                                else cross_attention)
        self.cross_layers = cross_attention_layers(cross_attention, self.depth)
        self.tie_embeddings = bool(tie_embeddings)
        self.extra_tokens = int(extra_tokens)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.dropout, self.attention_dropout = float(dropout), float(attention_dropout)
        self.qk_norm, self.use_qkv_bias = bool(qk_norm), bool(use_qkv_bias)
        self.fused_qkv = bool(fused_qkv)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        policy = self.dtype_policy
        self.token_embedding = keras.layers.Embedding(
            self.vocab_size + self.extra_tokens, self.width,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=policy, name="token_embedding")
        self.position_embedding = LearnedPositionEmbedding(self.max_len, dtype=policy,
                                                           name="position_embedding")
        self.embedding_dropout = keras.layers.Dropout(self.dropout, dtype=policy,
                                                      name="embedding_dropout")
        self.blocks = [
            DecoderBlock(self.heads, self.mlp_dim, cross_attention=i in self.cross_layers,
                         dropout=self.dropout, attention_dropout=self.attention_dropout,
                         qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias,
                         fused_qkv=self.fused_qkv, attention_impl=attention_impl,
                         activation=activation, layer_norm_epsilon=self.layer_norm_epsilon,
                         dtype=policy, name=f"block_{i}")
            for i in range(self.depth)]
        self.attention_impl = self.blocks[0].attention_impl if self.blocks else attention_impl
        self.final_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="final_norm")
        self.output_projection = (None if self.tie_embeddings else keras.layers.Dense(
            self.vocab_size, dtype=policy, name="output_projection"))

    def build(self, token_ids_shape, context_shape=None):
        batch = token_ids_shape[0]
        x_shape = (batch, self.max_len, self.width)
        self.token_embedding.build((batch, self.max_len))
        self.position_embedding.build(x_shape)
        for block in self.blocks:
            block.build(x_shape, context_shape)
        self.final_norm.build(x_shape)
        if self.tie_embeddings:
            self.output_bias = self.add_weight(name="output_bias", shape=(self.vocab_size,),
                                               initializer="zeros")
        else:
            self.output_projection.build(x_shape)

    # -- pieces (models that need the inside of the stack, like CoCa, call these) -------------
    def embed(self, token_ids, training=None):
        """``[b, L]`` ids -> ``[b, L, width]`` token + position embeddings."""
        x = self.token_embedding(ops.cast(token_ids, "int32"))
        return self.embedding_dropout(self.position_embedding(x), training=training)

    def run_blocks(self, x, context=None, padding_mask=None, use_causal_mask=True,
                   context_mask=None, use_cross_attention=True, training=None, start=0,
                   stop=None):
        """Blocks ``start .. stop - 1`` on ``x [b, L, width]``; see :class:`DecoderBlock`."""
        for block in self.blocks[start:stop]:
            x = block(x, context, attention_mask=padding_mask, use_causal_mask=use_causal_mask,
                      context_mask=context_mask, use_cross_attention=use_cross_attention,
                      training=training)
        return x

    def logits(self, x):
        """Final LayerNorm and output projection: ``[b, L, width] -> [b, L, vocab]`` float32."""
        x = self.final_norm(x)
        if self.tie_embeddings:
            table = ops.convert_to_tensor(self.token_embedding.embeddings)[:self.vocab_size]
            table = ops.cast(table, x.dtype)
            logits = ops.matmul(x, ops.transpose(table)) + ops.cast(self.output_bias, x.dtype)
        else:
            logits = self.output_projection(x)
        return ops.cast(logits, "float32")

    def call(self, token_ids, context=None, padding_mask=None, use_causal_mask=True,
             context_mask=None, use_cross_attention=True, training=None):
        """``padding_mask`` ``[b, L]`` (True = a real token) defaults to ``ids != pad_id``."""
        if padding_mask is None:
            padding_mask = ops.not_equal(ops.cast(token_ids, "int32"), self.pad_id)
        x = self.embed(token_ids, training=training)
        x = self.run_blocks(x, context, padding_mask, use_causal_mask, context_mask,
                            use_cross_attention, training)
        return self.logits(x)

    # -- incremental decoding ----------------------------------------------------------------
    def init_state(self, batch_size, context=None, context_mask=None):
        """The decoding state for :meth:`step`: an empty key / value cache ``[b, max_len,
        heads, head_dim]`` per block, the cross-attention keys / values of ``context``
        (computed once) and ``context_mask``. A dict of tensors with leading dim ``b``."""
        if self.cross_layers and context is None:
            raise ValueError("this decoder cross-attends: decoding needs a context")
        if not self.built:
            self.build((None, self.max_len), None if context is None else tuple(context.shape))
        head_dim = self.width // self.heads
        dtype = self.compute_dtype
        if context is not None:
            context = ops.cast(context, dtype)
        state = {}
        for i, block in enumerate(self.blocks):
            zeros = ops.zeros((batch_size, self.max_len, self.heads, head_dim), dtype)
            state[f"key_{i}"], state[f"value_{i}"] = zeros, zeros
            if block.cross_attention:
                state[f"context_key_{i}"], state[f"context_value_{i}"] = (
                    block.context_key_values(context))
        if context_mask is not None and self.cross_layers:
            state["context_mask"] = ops.cast(context_mask, "bool")
        return state

    def step(self, tokens, state, index):
        """``tokens [b]`` at position ``index`` -> ``(logits [b, vocab] float32, state)``:
        the prediction for position ``index + 1``, equal to :meth:`call` on the whole prefix."""
        x = self.token_embedding(ops.cast(tokens, "int32")[:, None])          # [b, 1, width]
        position = ops.slice(ops.convert_to_tensor(self.position_embedding.embeddings),
                             (ops.cast(index, "int32"), 0), (1, self.width))
        x = x + ops.cast(position, x.dtype)[None]
        state = dict(state)
        for i, block in enumerate(self.blocks):
            context_kv = ((state[f"context_key_{i}"], state[f"context_value_{i}"])
                          if block.cross_attention else ())
            x, state[f"key_{i}"], state[f"value_{i}"] = block.step(
                x, state[f"key_{i}"], state[f"value_{i}"], index, context_kv,
                state.get("context_mask"))
        return self.logits(x)[:, 0], state

    def decode(self, context=None, context_mask=None, *, batch_size=None, method="greedy",
               max_length=None, beam_size=4, length_penalty=0.6, temperature=1.0, top_k=0,
               seed=None):
        """Generates token ids ``[b, max_length]`` (without BOS; PAD after EOS) with an in-graph
        search (:mod:`keras_mm.decoders.search`): ``"greedy"``, ``"beam"`` (GNMT length
        penalty) or ``"sample"`` (temperature, top-k). ``batch_size`` defaults to the context's.
        """
        if method not in SEARCH_METHODS:
            raise ValueError(f"method must be one of {SEARCH_METHODS}, got {method!r}")
        max_length = min(int(max_length or self.max_len), self.max_len)
        if batch_size is None:
            if context is None:
                raise ValueError("give batch_size when decoding without a context")
            batch_size = ops.shape(context)[0]
        common = dict(max_length=max_length, bos_id=self.bos_id, eos_id=self.eos_id,
                      pad_id=self.pad_id)
        if method == "beam":
            state = search.tile_for_beams(self.init_state(batch_size, context, context_mask),
                                          beam_size)
            tokens, _ = search.beam_search(self.generation_step, state, batch_size=batch_size,
                                           beam_size=beam_size, length_penalty=length_penalty,
                                           **common)
            return tokens
        state = self.init_state(batch_size, context, context_mask)
        if method == "sample":
            return search.sample(self.generation_step, state, batch_size=batch_size,
                                 temperature=temperature, top_k=top_k, seed=seed, **common)
        return search.greedy_search(self.generation_step, state, batch_size=batch_size,
                                    **common)

    def generation_step(self, tokens, state, index):
        """:meth:`step` with PAD and BOS ruled out: they are never caption tokens (the loss masks
        PAD labels, so nothing teaches the model not to predict it)."""
        logits, state = self.step(tokens, state, index)
        banned = ops.one_hot(ops.convert_to_tensor([self.pad_id, self.bos_id]), self.vocab_size)
        banned = ops.max(banned, axis=0)                                     # [vocab]
        return ops.where(banned[None] > 0, -1e9, logits), state

    def compute_output_shape(self, token_ids_shape, context_shape=None):
        return tuple(token_ids_shape) + (self.vocab_size,)

    def get_config(self):
        config = super().get_config()
        config.update(
            vocab_size=self.vocab_size, max_len=self.max_len, width=self.width,
            depth=self.depth, heads=self.heads, mlp_dim=self.mlp_dim,
            cross_attention=self.cross_attention, tie_embeddings=self.tie_embeddings,
            extra_tokens=self.extra_tokens, pad_id=self.pad_id, bos_id=self.bos_id,
            eos_id=self.eos_id, dropout=self.dropout,
            attention_dropout=self.attention_dropout, qk_norm=self.qk_norm,
            use_qkv_bias=self.use_qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=self.attention_impl, activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon)
        return config
