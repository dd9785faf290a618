"""Parallel transformer block of ViT-22B (Dehghani et al. 2023, Sec. 2; GPT-J / PaLM)::

    y = x + drop_path(dropout(attn(N(x))) + dropout(mlp(N(x))))

with ONE normalisation ``N`` shared by both branches (so the attention's QKV projection and the
MLP's first dense layer read the same input and can be fused into one matmul), and the other
ViT-22B choices as defaults:

* QK normalisation: queries and keys are normalised over ``head_dim`` before the dot product;
* no biases on the QKV projections (the attention's output projection and both MLP dense layers
  keep theirs: "unlike PaLM, we use bias terms for the (in- and out-) MLP dense layers");
* "all LayerNorms were applied without bias and centering" (following PaLM, citing Zhang &
  Sennrich 2019): no bias *and no mean subtraction*, i.e. RMSNorm, ``x / sqrt(mean(x^2) + eps)
  * scale`` (``keras.layers.RMSNormalization``) - for ``N`` and for the QK norms
  (``norm="rms"``). ``norm="layer"`` uses ordinary LayerNorms (centred, with bias) instead.

Drop-path drops the whole residual update (both branches together: the block has one residual
branch). Rematerialisation works as in ``TransformerBlock`` (dropout seeds drawn outside the
recomputed function).
"""

from __future__ import annotations

import keras

from keras_mm.layers.attention import MultiHeadAttention
from keras_mm.layers.dropout import drop_path, dropout
from keras_mm.layers.mlp import Mlp
from keras_mm.layers.transformer_block import REMAT_BACKENDS

NORMS = ("rms", "layer")


def make_norm(norm, epsilon, dtype=None, name=None):
    """``"rms"``: ``keras.layers.RMSNormalization`` (scale only, no centring, no bias);
    ``"layer"``: ``keras.layers.LayerNormalization`` (centred, scale and bias)."""
    if norm == "rms":
        return keras.layers.RMSNormalization(epsilon=epsilon, dtype=dtype, name=name)
    if norm == "layer":
        return keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name=name)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


@keras.saving.register_keras_serializable(package="keras_mm")
class _RMSQKAttention(MultiHeadAttention):
    """``MultiHeadAttention`` whose QK norms are RMSNorms (no centring, no bias) instead of
    LayerNorms: ViT-22B's QK normalisation with its "LayerNorms without bias and centering".
    Same arguments, weights (but ``scale`` instead of ``gamma``/``beta`` in the QK norms) and
    call as ``MultiHeadAttention``."""

    def __init__(self, num_heads, qk_norm=True, **kwargs):
        super().__init__(num_heads, qk_norm=False, **kwargs)
        self.qk_norm = bool(qk_norm)
        if self.qk_norm:
            self.query_norm = make_norm("rms", self.layer_norm_epsilon, self.dtype_policy,
                                        "query_norm")
            self.key_norm = make_norm("rms", self.layer_norm_epsilon, self.dtype_policy,
                                      "key_norm")


@keras.saving.register_keras_serializable(package="keras_mm")
class ParallelTransformerBlock(keras.layers.Layer):
    """``[batch, tokens, width] -> [batch, tokens, width]``, ViT-22B's parallel block.

    Args:
        num_heads, mlp_dim: attention heads and MLP hidden width.
        dropout: rate on each branch's output (and inside the MLP).
        attention_dropout: rate on the attention probabilities.
        drop_path: stochastic-depth rate of the block's residual update.
        qk_norm: normalise queries and keys (default True, ViT-22B).
        use_qkv_bias: biases on the QKV projections (default False, ViT-22B).
        norm: ``"rms"`` (default: no centring, no bias, ViT-22B) or ``"layer"``; used for the
            shared pre-norm and the QK norms.
        fused_qkv, attention_impl: see ``MultiHeadAttention``.
        activation: of the MLP.
        layer_norm_epsilon: of all norms.
        remat: recompute the block's activations in the backward pass (``keras.remat``).

    Call args: ``x``, ``attention_mask``, ``use_causal_mask``, ``training`` (as
    ``TransformerBlock``).
    """

    def __init__(self, num_heads, mlp_dim, dropout=0.0, attention_dropout=0.0, drop_path=0.0,
                 qk_norm=True, use_qkv_bias=False, norm="rms", fused_qkv=True,
                 attention_impl=None, activation="gelu_approximate", layer_norm_epsilon=1e-6,
                 remat=False, **kwargs):
        super().__init__(**kwargs)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.drop_path = float(drop_path)
        self.qk_norm = bool(qk_norm)
        self.use_qkv_bias = bool(use_qkv_bias)
        self.norm_type = norm
        self.fused_qkv = bool(fused_qkv)
        self.activation = activation
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.remat = bool(remat)
        self.norm = make_norm(norm, self.layer_norm_epsilon, self.dtype_policy, "norm")
        attention_cls = _RMSQKAttention if norm == "rms" else MultiHeadAttention
        self.attention = attention_cls(
            self.num_heads, qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias,
            fused_qkv=self.fused_qkv, dropout=self.attention_dropout,
            attention_impl=attention_impl, layer_norm_epsilon=self.layer_norm_epsilon,
            dtype=self.dtype_policy, name="attention")
        self.attention_impl = self.attention.attention_impl
        self.mlp = Mlp(self.mlp_dim, activation=activation, dropout=self.dropout,
                       dtype=self.dtype_policy, name="mlp")
        self._rates = dict(attention=self.attention_dropout, attention_out=self.dropout,
                           mlp_hidden=self.dropout, mlp_out=self.dropout,
                           drop_path=self.drop_path)
        self.seed_generator = (keras.random.SeedGenerator()
                               if any(self._rates.values()) else None)

    def build(self, input_shape):
        self.norm.build(input_shape)
        self.attention.build(input_shape)
        self.mlp.build(input_shape)

    def _draw_seeds(self, training):
        """Seed tensors for every random op of one call (outside any rematerialised code)."""
        if not training or self.seed_generator is None:
            return {}
        return {name: self.seed_generator.next() for name, rate in self._rates.items() if rate}

    def call(self, x, attention_mask=None, use_causal_mask=False, training=None):
        seeds = self._draw_seeds(training)

        def forward(x):
            h = self.norm(x)                                    # shared by both branches
            a = self.attention(h, attention_mask=attention_mask,
                               use_causal_mask=use_causal_mask, training=training,
                               seed=seeds.get("attention"))
            m = self.mlp(h, training=training, seed=seeds.get("mlp_hidden"))
            if seeds:
                a = dropout(a, self.dropout, seeds.get("attention_out"))
                m = dropout(m, self.dropout, seeds.get("mlp_out"))
                return x + drop_path(a + m, self.drop_path, seeds.get("drop_path"))
            return x + a + m

        if self.remat and keras.backend.backend() in REMAT_BACKENDS:
            return keras.remat(forward)(x)
        return forward(x)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, dropout=self.dropout,
            attention_dropout=self.attention_dropout, drop_path=self.drop_path,
            qk_norm=self.qk_norm, use_qkv_bias=self.use_qkv_bias, norm=self.norm_type,
            fused_qkv=self.fused_qkv, attention_impl=self.attention_impl,
            activation=self.activation, layer_norm_epsilon=self.layer_norm_epsilon,
            remat=self.remat)
        return config
