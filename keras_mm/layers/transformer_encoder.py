"""A stack of transformer blocks followed by a final norm: pre-LN blocks + LayerNorm (ViT /
big_vision ``Encoder``; CLIP's text transformer + ``ln_final``), or ViT-22B's parallel blocks +
an RMSNorm (``block="parallel"``)."""

from __future__ import annotations

import keras
from keras import ops

from keras_mm.layers.attention import attention_mask as make_attention_mask
from keras_mm.layers.parallel_transformer_block import ParallelTransformerBlock, make_norm
from keras_mm.layers.transformer_block import TransformerBlock

BLOCKS = ("pre_ln", "parallel")


@keras.saving.register_keras_serializable(package="keras_mm")
class TransformerEncoder(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, tokens, width]``.

    Args:
        depth: number of blocks.
        num_heads, mlp_dim, dropout, attention_dropout, qk_norm, use_qkv_bias, fused_qkv,
            attention_impl, activation, layer_norm_epsilon, remat: passed to every
            ``TransformerBlock``.
        drop_path: stochastic-depth rate of the *last* block; block ``i`` gets
            ``drop_path * i / (depth - 1)`` (the linear rule of Huang et al. 2016 / DeiT).
        final_norm: apply a norm after the last block.
        block: ``"pre_ln"`` (``TransformerBlock``, LayerNorms; the default) or ``"parallel"``
            (ViT-22B's ``ParallelTransformerBlock``: attention and MLP in parallel on one shared
            norm; all norms, the final one included, are RMSNorms without centring or bias as
            ViT-22B's). ``qk_norm`` / ``use_qkv_bias`` keep their meaning (ViT-22B: True /
            False; ``keras_mm.encoders.presets.vit22b_style`` sets all three). The config
            holds ``block`` only when it is not the default, so pre-LN configs are unchanged.

    Call args: ``x``, ``attention_mask`` (computed once, shared by all blocks),
    ``use_causal_mask``, ``training``.
    """

    def __init__(self, depth, num_heads, mlp_dim, dropout=0.0, attention_dropout=0.0,
                 drop_path=0.0, qk_norm=False, use_qkv_bias=True, fused_qkv=True,
                 attention_impl=None, activation="gelu_approximate", layer_norm_epsilon=1e-6,
                 remat=False, final_norm=True, block="pre_ln", **kwargs):
        super().__init__(**kwargs)
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        self.block = block
        self.depth = int(depth)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.drop_path = float(drop_path)
        self.qk_norm = bool(qk_norm)
        self.use_qkv_bias = bool(use_qkv_bias)
        self.fused_qkv = bool(fused_qkv)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.remat = bool(remat)
        self.final_norm = bool(final_norm)
        block_cls, extra = TransformerBlock, {}
        if block == "parallel":
            block_cls, extra = ParallelTransformerBlock, dict(norm="rms")
        self.blocks = [
            block_cls(
                self.num_heads, self.mlp_dim, dropout=self.dropout,
                attention_dropout=self.attention_dropout,
                drop_path=self.drop_path * i / max(self.depth - 1, 1), qk_norm=self.qk_norm,
                use_qkv_bias=self.use_qkv_bias, fused_qkv=self.fused_qkv,
                attention_impl=attention_impl, activation=activation,
                layer_norm_epsilon=self.layer_norm_epsilon, remat=self.remat,
                dtype=self.dtype_policy, name=f"block_{i}", **extra)
            for i in range(self.depth)]
        self.attention_impl = (self.blocks[0].attention_impl if self.blocks
                               else attention_impl)
        self.norm = (make_norm("rms" if block == "parallel" else "layer",
                               self.layer_norm_epsilon, self.dtype_policy, "norm")
                     if self.final_norm else None)

    def build(self, input_shape):
        for block in self.blocks:
            block.build(input_shape)
        if self.norm is not None:
            self.norm.build(input_shape)

    def call(self, x, attention_mask=None, use_causal_mask=False, training=None):
        if attention_mask is not None or use_causal_mask:
            # One [batch|1, 1, tokens, tokens] mask for all blocks instead of one per block.
            tokens = ops.shape(x)[1]
            attention_mask = make_attention_mask(attention_mask, use_causal_mask, tokens, tokens)
        for block in self.blocks:
            x = block(x, attention_mask=attention_mask, training=training)
        return self.norm(x) if self.norm is not None else x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
            dropout=self.dropout, attention_dropout=self.attention_dropout,
            drop_path=self.drop_path, qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias,
            fused_qkv=self.fused_qkv, attention_impl=self.attention_impl,
            activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
            remat=self.remat, final_norm=self.final_norm)
        if self.block != "pre_ln":
            config["block"] = self.block
        return config
