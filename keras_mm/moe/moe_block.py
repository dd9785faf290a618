"""Pre-LayerNorm transformer block whose MLP is a sparse mixture of experts (V-MoE / LIMoE)::

    x = x + drop_path(dropout(attn(LN(x))))
    x = x + drop_path(dropout(moe_mlp(LN(x))))

the block of ``keras_mm.layers.transformer_block.TransformerBlock`` (same sublayers, names,
options, dropout-seed handling and rematerialisation) with ``MoeMlp`` in place of ``Mlp``. Tokens
that an expert's capacity drops get 0 from the MoE branch and go on unchanged through the residual.

It is a sibling of ``TransformerBlock``, not a subclass: ``TransformerBlock.__init__`` builds a
dense ``Mlp`` (with a seed variable when dropout is on) that a subclass would have to carry unused,
and its ``compute_output_shape`` describes one tensor where this block may return
``(y, routing)``. Called with ``return_routing=False`` (the default) it is a drop-in replacement
for ``TransformerBlock`` (same call arguments, same output).

``moe_layer_indices`` says which blocks of an encoder are MoE blocks.
"""

from __future__ import annotations

import keras

from keras_mm.layers.attention import MultiHeadAttention
from keras_mm.layers.dropout import drop_path, dropout
from keras_mm.layers.transformer_block import REMAT_BACKENDS
from keras_mm.moe.moe_mlp import MoeMlp


def moe_layer_indices(depth, every=None, last=None):
    """Indices (0-based, sorted) of the blocks of a ``depth``-block encoder that are MoE blocks.

    Exactly one of:
        every: every ``every``-th block, counted so the *last* block is always one:
            ``{i : i % every == every - 1}``. V-MoE's "Every-2" (Riquelme et al. 2021, Sec. 3.1,
            sparse layers in every other block, the odd ones) is ``every=2`` (for depth 12:
            1, 3, 5, 7, 9, 11, as V-MoE's B/16 configs ``layers=(1, 3, ..., 11)``). LIMoE builds
            on V-MoE's every-other-block layout; this is the default a LIMoE model should use.
            ``every=1``: all blocks.
        last: the last ``last`` blocks (V-MoE's "Last-n" variants, sparse layers only near the
            top, cheaper): ``range(depth - last, depth)``.
    """
    depth = int(depth)
    if (every is None) == (last is None):
        raise ValueError("give exactly one of every= and last=")
    if every is not None:
        every = int(every)
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        return [i for i in range(depth) if i % every == every - 1]
    last = int(last)
    if not 0 <= last <= depth:
        raise ValueError(f"last must be in [0, depth={depth}], got {last}")
    return list(range(depth - last, depth))


@keras.saving.register_keras_serializable(package="keras_mm")
class MoeTransformerBlock(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, tokens, width]`` (and the routing, on request).

    Args:
        num_heads: attention heads.
        mlp_dim: hidden width of each expert.
        num_experts, num_selected, capacity_factor, eval_capacity_factor, group_size, bpr,
            noise_std: see ``keras_mm.moe.moe_mlp.MoeMlp``.
        dropout, attention_dropout, drop_path, qk_norm, use_qkv_bias, fused_qkv, attention_impl,
            activation, layer_norm_epsilon, remat: as ``TransformerBlock`` (``dropout`` also
            acts inside the experts; ``remat`` recomputes the whole block, router included,
            in the backward pass with the same noise and dropout seeds).

    Call args:
        x: ``[batch, tokens, width]``.
        attention_mask, use_causal_mask: as ``TransformerBlock``.
        training: dropout, drop-path, router noise, training capacity.
        token_mask: optional ``[batch, tokens]`` (1 = real token) for the MoE: padding tokens
            take no expert slot (their attention is governed by ``attention_mask``).
        return_routing: also return the MoE routing dict (see ``MoeMlp``).

    Returns:
        ``y``, or ``(y, routing)`` with ``return_routing=True``.
    """

    def __init__(self, num_heads, mlp_dim, num_experts, num_selected=1, capacity_factor=1.0,
                 eval_capacity_factor=None, group_size=256, bpr=True, noise_std=0.0,
                 dropout=0.0, attention_dropout=0.0, drop_path=0.0, qk_norm=False,
                 use_qkv_bias=True, fused_qkv=True, attention_impl=None,
                 activation="gelu_approximate", layer_norm_epsilon=1e-6, remat=False, **kwargs):
        super().__init__(**kwargs)
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
        self.norm1 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm1")
        self.attention = MultiHeadAttention(
            self.num_heads, qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias,
            fused_qkv=self.fused_qkv, dropout=self.attention_dropout,
            attention_impl=attention_impl, dtype=self.dtype_policy, name="attention")
        self.attention_impl = self.attention.attention_impl
        self.norm2 = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=self.dtype_policy, name="norm2")
        self.moe = MoeMlp(
            num_experts, self.mlp_dim, num_selected=num_selected,
            capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
            group_size=group_size, bpr=bpr, noise_std=noise_std, activation=activation,
            dropout=self.dropout, dtype=self.dtype_policy, name="moe")
        rates = dict(attention=self.attention_dropout, attention_out=self.dropout,
                     moe=self.dropout or self.moe.noise_std, mlp_out=self.dropout,
                     drop_path_attention=self.drop_path, drop_path_mlp=self.drop_path)
        self._seed_names = [name for name, rate in rates.items() if rate]
        self.seed_generator = keras.random.SeedGenerator() if self._seed_names else None

    def build(self, input_shape):
        self.norm1.build(input_shape)
        self.attention.build(input_shape)
        self.norm2.build(input_shape)
        self.moe.build(input_shape)

    def _draw_seeds(self, training):
        """Seed tensors for every random op of one call (outside any rematerialised code)."""
        if not training or not self._seed_names:
            return {}
        return {name: self.seed_generator.next() for name in self._seed_names}

    def call(self, x, attention_mask=None, use_causal_mask=False, training=None,
             token_mask=None, return_routing=False):
        seeds = self._draw_seeds(training)

        def forward(x):
            y = self.attention(self.norm1(x), attention_mask=attention_mask,
                               use_causal_mask=use_causal_mask, training=training,
                               seed=seeds.get("attention"))
            if seeds:
                y = drop_path(dropout(y, self.dropout, seeds.get("attention_out")),
                              self.drop_path, seeds.get("drop_path_attention"))
            x = x + y
            y, routing = self.moe(self.norm2(x), training=training, token_mask=token_mask,
                                  seed=seeds.get("moe"), return_routing=True)
            if seeds:
                y = drop_path(dropout(y, self.dropout, seeds.get("mlp_out")),
                              self.drop_path, seeds.get("drop_path_mlp"))
            return x + y, routing

        if self.remat and keras.backend.backend() in REMAT_BACKENDS:
            y, routing = keras.remat(forward)(x)
        else:
            y, routing = forward(x)
        return (y, routing) if return_routing else y

    def get_config(self):
        config = super().get_config()
        moe = self.moe
        config.update(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, num_experts=moe.num_experts,
            num_selected=moe.num_selected, capacity_factor=moe.capacity_factor,
            eval_capacity_factor=moe.eval_capacity_factor, group_size=moe.group_size,
            bpr=moe.bpr, noise_std=moe.noise_std, dropout=self.dropout,
            attention_dropout=self.attention_dropout, drop_path=self.drop_path,
            qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias, fused_qkv=self.fused_qkv,
            attention_impl=self.attention_impl, activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon, remat=self.remat)
        return config
